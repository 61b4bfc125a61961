"""NETLINK_XFRM messages (``include/uapi/linux/xfrm.h``) on pyroute2's netlink marshalling. No I/O.

pyroute2 has no XFRM family, so this module defines the kernel's structures itself, on x86-64
layout with every C padding byte an explicit field (sizes are asserted at import time).  The
sockets that carry these messages (``XfrmSocket``, ``XfrmMonitor``) live in
:mod:`daemons.vpn.xfrm.netlink`.

Three layers:

* ``Struct`` subclasses (``XfrmSelector``, ``XfrmUsersaInfo``, ...): fixed C structs, packed
  field by field; padding fields start with ``_`` and never appear in decoded dicts.
  Addresses (``xfrm_address_t``) encode from ``str``/``bytes``/``ipaddress`` objects and
  decode to the raw 16 bytes (the family lives in a sibling field).
* pyroute2 messages (``xfrm_usersa_info_msg`` ...) and attributes, registered by message
  type in ``XfrmMarshal.msg_map``; ``encode_message`` / ``decode_message`` for one message
  (anything malformed raises ``DecodeError`` and nothing else).  Key material in
  ``XFRMA_ALG_*`` attributes is carried as ``daemons.runtime.secret.Secret`` both ways, so
  decoded messages never print keys.
* The Python-side model: ``Selector``, ``SA``, ``Tmpl``, ``Policy``, ``XfrmEvent`` and their
  conversion to and from message dicts (``sa_to_msg`` / ``sa_from_msg``, ``policy_to_msg`` /
  ``policy_from_msg``, ``event_from_msg``).
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pyroute2.netlink import (
    NLM_F_REQUEST,
    NotInitialized,
    nla_base_string,
    nlmsg,
    nlmsg_atoms,
)
from pyroute2.netlink.marshal import Marshal

from daemons.runtime.secret import Secret

# --------------------------------------------------------------------------------------------
# Constants (include/uapi/linux/xfrm.h, include/uapi/linux/netlink.h, linux/in.h)

NETLINK_XFRM = 6

XFRM_MSG_NEWSA = 16
XFRM_MSG_DELSA = 17
XFRM_MSG_GETSA = 18
XFRM_MSG_NEWPOLICY = 19
XFRM_MSG_DELPOLICY = 20
XFRM_MSG_GETPOLICY = 21
XFRM_MSG_ALLOCSPI = 22
XFRM_MSG_ACQUIRE = 23
XFRM_MSG_EXPIRE = 24
XFRM_MSG_UPDPOLICY = 25
XFRM_MSG_UPDSA = 26
XFRM_MSG_POLEXPIRE = 27
XFRM_MSG_FLUSHSA = 28
XFRM_MSG_FLUSHPOLICY = 29

XFRMA_UNSPEC = 0
XFRMA_ALG_AUTH = 1
XFRMA_ALG_CRYPT = 2
XFRMA_ALG_COMP = 3
XFRMA_ENCAP = 4
XFRMA_TMPL = 5
XFRMA_SA = 6
XFRMA_POLICY = 7
XFRMA_SEC_CTX = 8
XFRMA_LTIME_VAL = 9
XFRMA_REPLAY_VAL = 10
XFRMA_REPLAY_THRESH = 11
XFRMA_ETIMER_THRESH = 12
XFRMA_SRCADDR = 13
XFRMA_COADDR = 14
XFRMA_LASTUSED = 15
XFRMA_POLICY_TYPE = 16
XFRMA_MIGRATE = 17
XFRMA_ALG_AEAD = 18
XFRMA_KMADDRESS = 19
XFRMA_ALG_AUTH_TRUNC = 20
XFRMA_MARK = 21
XFRMA_TFCPAD = 22
XFRMA_REPLAY_ESN_VAL = 23
XFRMA_SA_EXTRA_FLAGS = 24
XFRMA_PROTO = 25
XFRMA_ADDRESS_FILTER = 26
XFRMA_PAD = 27
XFRMA_OFFLOAD_DEV = 28
XFRMA_SET_MARK = 29
XFRMA_SET_MARK_MASK = 30
XFRMA_IF_ID = 31
XFRMA_MTIMER_THRESH = 32
XFRMA_SA_DIR = 33

XFRMNLGRP_ACQUIRE = 1
XFRMNLGRP_EXPIRE = 2
XFRMNLGRP_SA = 3
XFRMNLGRP_POLICY = 4

XFRM_POLICY_IN = 0
XFRM_POLICY_OUT = 1
XFRM_POLICY_FWD = 2
POLICY_DIRS = {"in": XFRM_POLICY_IN, "out": XFRM_POLICY_OUT, "fwd": XFRM_POLICY_FWD}
POLICY_DIR_NAMES = {v: k for k, v in POLICY_DIRS.items()}

XFRM_POLICY_ALLOW = 0
XFRM_POLICY_BLOCK = 1

XFRM_MODE_TRANSPORT = 0
XFRM_MODE_TUNNEL = 1
MODES = {"transport": XFRM_MODE_TRANSPORT, "tunnel": XFRM_MODE_TUNNEL}
MODE_NAMES = {v: k for k, v in MODES.items()}

XFRM_INF = 0xFFFF_FFFF_FFFF_FFFF
IPPROTO_ESP = 50
IPPROTO_AH = 51
IPSEC_PROTO_ANY = 255
UDP_ENCAP_ESPINUDP = 2

AEAD_GCM = "rfc4106(gcm(aes))"
CIPHER_CBC_AES = "cbc(aes)"
AUTH_HMAC_SHA256 = "hmac(sha256)"


class DecodeError(ValueError):
    """The one error raised when bytes do not decode as an XFRM message or structure."""


# --------------------------------------------------------------------------------------------
# Fixed C structures


def _pack_addr(value: Any) -> bytes:
    """xfrm_address_t: 16 bytes; IPv4 in the first 4, the rest zero."""
    if value is None or value == 0 or value == "":
        return bytes(16)
    if isinstance(value, bytes | bytearray):
        if len(value) in (4, 16):
            return bytes(value).ljust(16, b"\0")
        raise ValueError(f"address of {len(value)} bytes")
    addr = value if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address) \
        else ipaddress.ip_address(str(value))
    return addr.packed.ljust(16, b"\0")


def addr_text(raw: bytes, family: int) -> str:
    """Text form of a decoded xfrm_address_t for a given address family."""
    if family == socket.AF_INET6:
        return str(ipaddress.IPv6Address(bytes(raw[:16])))
    return str(ipaddress.IPv4Address(bytes(raw[:4])))


ADDR = "ADDR"  # pseudo format: xfrm_address_t


class Struct:
    """A fixed-size C structure; subclasses list ``layout`` = ((name, fmt | Struct subclass), ...).

    Formats are single ``struct`` formats with an explicit byte order (``=`` host, ``>`` network)
    and no implicit alignment: the layout spells out every padding byte as ``_padN`` fields.
    Usable as a pyroute2 field type (``encode_into`` / ``decode_from``).
    """

    layout: ClassVar[tuple[tuple[str, Any], ...]] = ()
    c_size: ClassVar[int] = 0  # the size the C compiler gives the struct on x86-64
    _size: ClassVar[int | None] = None

    @classmethod
    def size(cls) -> int:
        if cls._size is None:
            total = 0
            for _name, fmt in cls.layout:
                total += 16 if fmt == ADDR else fmt.size() if isinstance(fmt, type) else struct.calcsize(fmt)
            cls._size = total
        return cls._size

    @classmethod
    def pack(cls, value: Mapping[str, Any] | None = None) -> bytes:
        value = value or {}
        out = bytearray()
        for name, fmt in cls.layout:
            if name.startswith("_"):
                out += bytes(struct.calcsize(fmt))
                continue
            item = value.get(name)
            if fmt == ADDR:
                out += _pack_addr(item)
            elif isinstance(fmt, type):
                out += fmt.pack(item)
            elif fmt.endswith("s"):
                raw = item.encode() if isinstance(item, str) else bytes(item or b"")
                out += struct.pack(fmt, raw)
            else:
                out += struct.pack(fmt, int(item or 0))
        return bytes(out)

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview, offset: int = 0) -> dict[str, Any]:
        if len(data) - offset < cls.size():
            raise DecodeError(f"{cls.__name__}: need {cls.size()} bytes, have {len(data) - offset}")
        result: dict[str, Any] = {}
        for name, fmt in cls.layout:
            if fmt == ADDR:
                size = 16
                item: Any = bytes(data[offset:offset + 16])
            elif isinstance(fmt, type):
                size = fmt.size()
                item = fmt.unpack(data, offset)
            else:
                size = struct.calcsize(fmt)
                item = struct.unpack_from(fmt, data, offset)[0] if not fmt.endswith("x") else None
                if fmt.endswith("s"):
                    item = item.split(b"\0", 1)[0].decode("ascii", "replace")
            if not name.startswith("_"):
                result[name] = item
            offset += size
        return result

    # pyroute2 field-type protocol
    @classmethod
    def encode_into(cls, data: bytearray, offset: int, value: Any) -> int:
        raw = cls.pack(value if isinstance(value, Mapping) else None)
        data.extend(bytes(len(raw)))
        data[offset:offset + len(raw)] = raw
        return offset + len(raw)

    @classmethod
    def decode_from(cls, data: bytes | bytearray, offset: int) -> tuple[dict[str, Any], int]:
        return cls.unpack(data, offset), offset + cls.size()


class XfrmSelector(Struct):
    c_size = 56
    layout = (
        ("daddr", ADDR), ("saddr", ADDR),
        ("dport", ">H"), ("dport_mask", ">H"), ("sport", ">H"), ("sport_mask", ">H"),
        ("family", "=H"), ("prefixlen_d", "=B"), ("prefixlen_s", "=B"), ("proto", "=B"),
        ("_pad1", "3x"),
        ("ifindex", "=i"), ("user", "=I"),
    )


class XfrmId(Struct):
    c_size = 24
    layout = (("daddr", ADDR), ("spi", ">I"), ("proto", "=B"), ("_pad1", "3x"))


class XfrmLifetimeCfg(Struct):
    c_size = 64
    layout = tuple((name, "=Q") for name in (
        "soft_byte_limit", "hard_byte_limit", "soft_packet_limit", "hard_packet_limit",
        "soft_add_expires_seconds", "hard_add_expires_seconds",
        "soft_use_expires_seconds", "hard_use_expires_seconds"))


LIFETIME_INFINITE = {"soft_byte_limit": XFRM_INF, "hard_byte_limit": XFRM_INF,
                     "soft_packet_limit": XFRM_INF, "hard_packet_limit": XFRM_INF}


class XfrmLifetimeCur(Struct):
    c_size = 32
    layout = (("bytes", "=Q"), ("packets", "=Q"), ("add_time", "=Q"), ("use_time", "=Q"))


class XfrmStats(Struct):
    c_size = 12
    layout = (("replay_window", "=I"), ("replay", "=I"), ("integrity_failed", "=I"))


class XfrmUsersaInfo(Struct):
    c_size = 224
    layout = (
        ("sel", XfrmSelector), ("id", XfrmId), ("saddr", ADDR),
        ("lft", XfrmLifetimeCfg), ("curlft", XfrmLifetimeCur), ("stats", XfrmStats),
        ("seq", "=I"), ("reqid", "=I"), ("family", "=H"), ("mode", "=B"),
        ("replay_window", "=B"), ("flags", "=B"), ("_pad1", "7x"),
    )


class XfrmUserspiInfo(Struct):
    c_size = 232
    layout = (("info", XfrmUsersaInfo), ("min", "=I"), ("max", "=I"))


class XfrmUsersaId(Struct):
    c_size = 24
    layout = (("daddr", ADDR), ("spi", ">I"), ("family", "=H"), ("proto", "=B"), ("_pad1", "1x"))


class XfrmUserpolicyInfo(Struct):
    c_size = 168
    layout = (
        ("sel", XfrmSelector), ("lft", XfrmLifetimeCfg), ("curlft", XfrmLifetimeCur),
        ("priority", "=I"), ("index", "=I"), ("dir", "=B"), ("action", "=B"), ("flags", "=B"),
        ("share", "=B"), ("_pad1", "4x"),
    )


class XfrmUserpolicyId(Struct):
    c_size = 64
    layout = (("sel", XfrmSelector), ("index", "=I"), ("dir", "=B"), ("_pad1", "3x"))


class XfrmUserTmpl(Struct):
    c_size = 64
    layout = (
        ("id", XfrmId), ("family", "=H"), ("_pad1", "2x"), ("saddr", ADDR), ("reqid", "=I"),
        ("mode", "=B"), ("share", "=B"), ("optional", "=B"), ("_pad2", "1x"),
        ("aalgos", "=I"), ("ealgos", "=I"), ("calgos", "=I"),
    )


class XfrmEncapTmpl(Struct):
    c_size = 24
    layout = (("encap_type", "=H"), ("encap_sport", ">H"), ("encap_dport", ">H"), ("_pad1", "2x"),
              ("encap_oa", ADDR))


class XfrmMark(Struct):
    c_size = 8
    layout = (("v", "=I"), ("m", "=I"))


class XfrmUserpolicyType(Struct):
    c_size = 6
    layout = (("type", "=B"), ("_pad1", "1x"), ("reserved1", "=H"), ("reserved2", "=B"), ("_pad2", "1x"))


class XfrmUserAcquire(Struct):
    c_size = 280
    layout = (
        ("id", XfrmId), ("saddr", ADDR), ("sel", XfrmSelector), ("policy", XfrmUserpolicyInfo),
        ("aalgos", "=I"), ("ealgos", "=I"), ("calgos", "=I"), ("seq", "=I"),
    )


class XfrmUserExpire(Struct):
    c_size = 232
    layout = (("state", XfrmUsersaInfo), ("hard", "=B"), ("_pad1", "7x"))


class XfrmUserPolexpire(Struct):
    c_size = 176
    layout = (("pol", XfrmUserpolicyInfo), ("hard", "=B"), ("_pad1", "7x"))


class XfrmUsersaFlush(Struct):
    c_size = 1
    layout = (("proto", "=B"),)


STRUCTS: tuple[type[Struct], ...] = (
    XfrmSelector, XfrmId, XfrmLifetimeCfg, XfrmLifetimeCur, XfrmStats, XfrmUsersaInfo, XfrmUserspiInfo, XfrmUsersaId,
    XfrmUserpolicyInfo, XfrmUserpolicyId, XfrmUserTmpl, XfrmEncapTmpl, XfrmMark, XfrmUserpolicyType,
    XfrmUserAcquire, XfrmUserExpire, XfrmUserPolexpire, XfrmUsersaFlush,
)
for _cls in STRUCTS:
    assert _cls.size() == _cls.c_size, (_cls.__name__, _cls.size(), _cls.c_size)


# --------------------------------------------------------------------------------------------
# Variable-length algorithm structures (xfrm_algo, xfrm_algo_auth, xfrm_algo_aead)

ALGO_NAME_LEN = 64


def pack_algo(kind: str, value: Mapping[str, Any]) -> bytes:
    """kind: 'algo' | 'auth' (trunc_len) | 'aead' (icv_len). value: name, key (Secret), lengths in bits."""
    key = value.get("key")
    raw_key = key.reveal() if isinstance(key, Secret) else bytes(key or b"")
    name = str(value.get("name", "")).encode()
    if len(name) >= ALGO_NAME_LEN:
        raise ValueError("algorithm name too long")
    out = struct.pack("=64sI", name, len(raw_key) * 8)
    if kind == "auth":
        out += struct.pack("=I", int(value.get("trunc_len", 0)))
    elif kind == "aead":
        out += struct.pack("=I", int(value.get("icv_len", 0)))
    return out + raw_key


def unpack_algo(kind: str, data: bytes) -> dict[str, Any]:
    head = 72 if kind in ("auth", "aead") else 68
    if len(data) < head:
        raise DecodeError(f"xfrm_algo ({kind}): {len(data)} bytes, need {head}")
    name, key_bits = struct.unpack_from("=64sI", data, 0)
    result: dict[str, Any] = {"name": name.split(b"\0", 1)[0].decode("ascii", "replace")}
    if kind == "auth":
        result["trunc_len"] = struct.unpack_from("=I", data, 68)[0]
    elif kind == "aead":
        result["icv_len"] = struct.unpack_from("=I", data, 68)[0]
    key_len = (key_bits + 7) // 8
    if len(data) < head + key_len:
        raise DecodeError(f"xfrm_algo ({kind}): key of {key_bits} bits truncated")
    result["key"] = Secret(bytes(data[head:head + key_len]))
    return result


# --------------------------------------------------------------------------------------------
# pyroute2 attributes and messages


class _raw_nla(nla_base_string):
    """An attribute whose payload is coded by ``_pack`` / ``_unpack`` (value is a Python object)."""

    __slots__ = ()

    def _pack(self, value: Any) -> bytes:
        raise NotImplementedError

    def _unpack(self, data: bytes) -> Any:
        raise NotImplementedError

    def encode(self) -> None:
        value = self.value
        if value is NotInitialized:  # pyroute2 merges a dict value into the nla itself
            value = {k: v for k, v in self.items() if k not in ("header", "attrs", "value")}
        self["value"] = self._pack(value)
        nla_base_string.encode(self)

    def decode(self) -> None:
        nla_base_string.decode(self)
        try:
            self.value = self._unpack(bytes(self["value"]))
        except (struct.error, ValueError) as exc:
            raise DecodeError(f"{type(self).__name__}: {exc}") from None
        del self["header"]


def _struct_nla(struct_cls: type[Struct]) -> type[_raw_nla]:
    class struct_nla(_raw_nla):
        __slots__ = ()

        def _pack(self, value: Any) -> bytes:
            return struct_cls.pack(value)

        def _unpack(self, data: bytes) -> Any:
            return struct_cls.unpack(data)

    struct_nla.__name__ = struct_nla.__qualname__ = f"nla_{struct_cls.__name__}"
    return struct_nla


def _algo_nla(kind: str) -> type[_raw_nla]:
    class algo_nla(_raw_nla):
        __slots__ = ()

        def _pack(self, value: Any) -> bytes:
            return pack_algo(kind, value)

        def _unpack(self, data: bytes) -> Any:
            return unpack_algo(kind, data)

    algo_nla.__name__ = algo_nla.__qualname__ = f"nla_algo_{kind}"
    return algo_nla


class _tmpl_array_nla(_raw_nla):
    """XFRMA_TMPL: an array of 64-byte xfrm_user_tmpl, not nested attributes."""

    __slots__ = ()

    def _pack(self, value: Any) -> bytes:
        return b"".join(XfrmUserTmpl.pack(t) for t in value or ())

    def _unpack(self, data: bytes) -> Any:
        size = XfrmUserTmpl.size()
        if len(data) % size:
            raise DecodeError(f"XFRMA_TMPL of {len(data)} bytes is not a multiple of {size}")
        return [XfrmUserTmpl.unpack(data, off) for off in range(0, len(data), size)]


class _addr_nla(_raw_nla):
    __slots__ = ()

    def _pack(self, value: Any) -> bytes:
        return _pack_addr(value)

    def _unpack(self, data: bytes) -> Any:
        if len(data) < 16:
            raise DecodeError("xfrm_address_t attribute shorter than 16 bytes")
        return bytes(data[:16])


class _cdata_nla(_raw_nla):
    __slots__ = ()

    def _pack(self, value: Any) -> bytes:
        return bytes(value or b"")

    def _unpack(self, data: bytes) -> Any:
        return data


class _u32_nla(_raw_nla):
    __slots__ = ()

    def _pack(self, value: Any) -> bytes:
        return struct.pack("=I", int(value))

    def _unpack(self, data: bytes) -> Any:
        if len(data) < 4:
            raise DecodeError("u32 attribute shorter than 4 bytes")
        return struct.unpack_from("=I", data)[0]


class _u64_nla(_raw_nla):
    __slots__ = ()

    def _pack(self, value: Any) -> bytes:
        return struct.pack("=Q", int(value))

    def _unpack(self, data: bytes) -> Any:
        if len(data) < 8:
            raise DecodeError("u64 attribute shorter than 8 bytes")
        return struct.unpack_from("=Q", data)[0]


class _u8_nla(_raw_nla):
    __slots__ = ()

    def _pack(self, value: Any) -> bytes:
        return struct.pack("=B", int(value))

    def _unpack(self, data: bytes) -> Any:
        if len(data) < 1:
            raise DecodeError("u8 attribute is empty")
        return data[0]


class XfrmAtoms(nlmsg_atoms):
    """Attribute classes, resolved by name from ``nla_map``."""

    __slots__ = ()
    xfrm_cdata = _cdata_nla
    xfrm_u8 = _u8_nla
    xfrm_u32 = _u32_nla
    xfrm_u64 = _u64_nla
    xfrm_address = _addr_nla
    xfrm_algo = _algo_nla("algo")
    xfrm_algo_auth = _algo_nla("auth")
    xfrm_algo_aead = _algo_nla("aead")
    xfrm_encap_tmpl = _struct_nla(XfrmEncapTmpl)
    xfrm_user_tmpl_array = _tmpl_array_nla
    xfrm_usersa_info = _struct_nla(XfrmUsersaInfo)
    xfrm_userpolicy_info = _struct_nla(XfrmUserpolicyInfo)
    xfrm_userpolicy_type = _struct_nla(XfrmUserpolicyType)
    xfrm_lifetime_cur = _struct_nla(XfrmLifetimeCur)
    xfrm_mark = _struct_nla(XfrmMark)


XFRMA_NLA_MAP = (
    (XFRMA_UNSPEC, "XFRMA_UNSPEC", "xfrm_cdata"),
    (XFRMA_ALG_AUTH, "XFRMA_ALG_AUTH", "xfrm_algo"),
    (XFRMA_ALG_CRYPT, "XFRMA_ALG_CRYPT", "xfrm_algo"),
    (XFRMA_ALG_COMP, "XFRMA_ALG_COMP", "xfrm_algo"),
    (XFRMA_ENCAP, "XFRMA_ENCAP", "xfrm_encap_tmpl"),
    (XFRMA_TMPL, "XFRMA_TMPL", "xfrm_user_tmpl_array"),
    (XFRMA_SA, "XFRMA_SA", "xfrm_usersa_info"),
    (XFRMA_POLICY, "XFRMA_POLICY", "xfrm_userpolicy_info"),
    (XFRMA_SEC_CTX, "XFRMA_SEC_CTX", "xfrm_cdata"),
    (XFRMA_LTIME_VAL, "XFRMA_LTIME_VAL", "xfrm_lifetime_cur"),
    (XFRMA_REPLAY_VAL, "XFRMA_REPLAY_VAL", "xfrm_cdata"),
    (XFRMA_REPLAY_THRESH, "XFRMA_REPLAY_THRESH", "xfrm_u32"),
    (XFRMA_ETIMER_THRESH, "XFRMA_ETIMER_THRESH", "xfrm_u32"),
    (XFRMA_SRCADDR, "XFRMA_SRCADDR", "xfrm_address"),
    (XFRMA_COADDR, "XFRMA_COADDR", "xfrm_address"),
    (XFRMA_LASTUSED, "XFRMA_LASTUSED", "xfrm_u64"),
    (XFRMA_POLICY_TYPE, "XFRMA_POLICY_TYPE", "xfrm_userpolicy_type"),
    (XFRMA_MIGRATE, "XFRMA_MIGRATE", "xfrm_cdata"),
    (XFRMA_ALG_AEAD, "XFRMA_ALG_AEAD", "xfrm_algo_aead"),
    (XFRMA_KMADDRESS, "XFRMA_KMADDRESS", "xfrm_cdata"),
    (XFRMA_ALG_AUTH_TRUNC, "XFRMA_ALG_AUTH_TRUNC", "xfrm_algo_auth"),
    (XFRMA_MARK, "XFRMA_MARK", "xfrm_mark"),
    (XFRMA_TFCPAD, "XFRMA_TFCPAD", "xfrm_u32"),
    (XFRMA_REPLAY_ESN_VAL, "XFRMA_REPLAY_ESN_VAL", "xfrm_cdata"),
    (XFRMA_SA_EXTRA_FLAGS, "XFRMA_SA_EXTRA_FLAGS", "xfrm_u32"),
    (XFRMA_PROTO, "XFRMA_PROTO", "xfrm_u8"),
    (XFRMA_ADDRESS_FILTER, "XFRMA_ADDRESS_FILTER", "xfrm_cdata"),
    (XFRMA_PAD, "XFRMA_PAD", "xfrm_cdata"),
    (XFRMA_OFFLOAD_DEV, "XFRMA_OFFLOAD_DEV", "xfrm_cdata"),
    (XFRMA_SET_MARK, "XFRMA_SET_MARK", "xfrm_u32"),
    (XFRMA_SET_MARK_MASK, "XFRMA_SET_MARK_MASK", "xfrm_u32"),
    (XFRMA_IF_ID, "XFRMA_IF_ID", "xfrm_u32"),
    (XFRMA_MTIMER_THRESH, "XFRMA_MTIMER_THRESH", "xfrm_u32"),
    (XFRMA_SA_DIR, "XFRMA_SA_DIR", "xfrm_u8"),
)


class _xfrm_msg(nlmsg, XfrmAtoms):
    __slots__ = ()
    prefix = "XFRMA_"
    nla_map = XFRMA_NLA_MAP

    def decode(self) -> None:
        nlmsg.decode(self)
        for key in [k for k in self if isinstance(k, str) and k.startswith("_")]:
            del self[key]


class xfrm_usersa_info_msg(_xfrm_msg):
    """NEWSA / UPDSA requests; NEWSA in dumps and GETSA replies."""

    __slots__ = ()
    fields = tuple((name, fmt) for name, fmt in XfrmUsersaInfo.layout)


class xfrm_userspi_info_msg(_xfrm_msg):
    """ALLOCSPI request (the reply is a NEWSA with the larval SA and its SPI)."""

    __slots__ = ()
    fields = tuple(XfrmUserspiInfo.layout)


class xfrm_usersa_id_msg(_xfrm_msg):
    """DELSA / GETSA requests (XFRMA_SRCADDR optional)."""

    __slots__ = ()
    fields = tuple(XfrmUsersaId.layout)


class xfrm_userpolicy_info_msg(_xfrm_msg):
    """NEWPOLICY / UPDPOLICY requests; NEWPOLICY in dumps and GETPOLICY replies."""

    __slots__ = ()
    fields = tuple(XfrmUserpolicyInfo.layout)


class xfrm_userpolicy_id_msg(_xfrm_msg):
    """DELPOLICY / GETPOLICY requests (a DELPOLICY event also carries it)."""

    __slots__ = ()
    fields = tuple(XfrmUserpolicyId.layout)


class xfrm_user_acquire_msg(_xfrm_msg):
    __slots__ = ()
    fields = tuple(XfrmUserAcquire.layout)


class xfrm_user_expire_msg(_xfrm_msg):
    __slots__ = ()
    fields = tuple(XfrmUserExpire.layout)


class xfrm_user_polexpire_msg(_xfrm_msg):
    __slots__ = ()
    fields = tuple(XfrmUserPolexpire.layout)


class xfrm_usersa_flush_msg(_xfrm_msg):
    __slots__ = ()
    fields = (("proto", "=B"),)


class xfrm_flushpolicy_msg(_xfrm_msg):
    __slots__ = ()
    fields = ()


def _fix_fields(cls: type[nlmsg]) -> None:
    """pyroute2 packs ADDR fields via our Struct types: replace the pseudo format by a 1-field Struct."""
    fields = []
    for name, fmt in cls.fields:
        fields.append((name, _ADDR_FIELD if fmt == ADDR else fmt))
    cls.fields = tuple(fields)


class _AddrField(Struct):
    c_size = 16
    layout = (("a", ADDR),)

    @classmethod
    def encode_into(cls, data: bytearray, offset: int, value: Any) -> int:
        raw = _pack_addr(value)
        data.extend(bytes(16))
        data[offset:offset + 16] = raw
        return offset + 16

    @classmethod
    def decode_from(cls, data: bytes | bytearray, offset: int) -> tuple[bytes, int]:
        if len(data) < offset + 16:
            raise DecodeError("truncated xfrm_address_t")
        return bytes(data[offset:offset + 16]), offset + 16


_ADDR_FIELD = _AddrField

MESSAGE_CLASSES: dict[int, type[nlmsg]] = {
    XFRM_MSG_NEWSA: xfrm_usersa_info_msg,
    XFRM_MSG_UPDSA: xfrm_usersa_info_msg,
    XFRM_MSG_DELSA: xfrm_usersa_id_msg,
    XFRM_MSG_GETSA: xfrm_usersa_id_msg,
    XFRM_MSG_NEWPOLICY: xfrm_userpolicy_info_msg,
    XFRM_MSG_UPDPOLICY: xfrm_userpolicy_info_msg,
    XFRM_MSG_DELPOLICY: xfrm_userpolicy_id_msg,
    XFRM_MSG_GETPOLICY: xfrm_userpolicy_id_msg,
    XFRM_MSG_ALLOCSPI: xfrm_userspi_info_msg,
    XFRM_MSG_ACQUIRE: xfrm_user_acquire_msg,
    XFRM_MSG_EXPIRE: xfrm_user_expire_msg,
    XFRM_MSG_POLEXPIRE: xfrm_user_polexpire_msg,
    XFRM_MSG_FLUSHSA: xfrm_usersa_flush_msg,
    XFRM_MSG_FLUSHPOLICY: xfrm_flushpolicy_msg,
}
for _msg_cls in set(MESSAGE_CLASSES.values()):
    _fix_fields(_msg_cls)

# the fixed part of each message, for strict decoding
_FIXED_SIZE: dict[type[nlmsg], int] = {
    xfrm_usersa_info_msg: XfrmUsersaInfo.size(),
    xfrm_usersa_id_msg: XfrmUsersaId.size(),
    xfrm_userspi_info_msg: XfrmUserspiInfo.size(),
    xfrm_userpolicy_info_msg: XfrmUserpolicyInfo.size(),
    xfrm_userpolicy_id_msg: XfrmUserpolicyId.size(),
    xfrm_user_acquire_msg: XfrmUserAcquire.size(),
    xfrm_user_expire_msg: XfrmUserExpire.size(),
    xfrm_user_polexpire_msg: XfrmUserPolexpire.size(),
    xfrm_usersa_flush_msg: 1,
    xfrm_flushpolicy_msg: 0,
}


class XfrmMarshal(Marshal):
    msg_map = dict(MESSAGE_CLASSES)


def encode_message(msg_type: int, value: Mapping[str, Any], flags: int = NLM_F_REQUEST, seq: int = 0,
                   pid: int = 0) -> bytes:
    """Encode one XFRM netlink message (header included) from a dict of fields and ``attrs``."""
    msg = MESSAGE_CLASSES[msg_type]()
    for key, item in value.items():
        if key != "attrs":
            msg[key] = item
    msg["attrs"] = [list(a) for a in value.get("attrs", ())]
    msg["header"]["type"] = msg_type
    msg["header"]["flags"] = flags
    msg["header"]["sequence_number"] = seq
    msg["header"]["pid"] = pid
    msg.encode()
    return bytes(msg.data)


def decode_message(data: bytes) -> nlmsg:
    """Decode exactly one XFRM netlink message; anything malformed raises ``DecodeError`` only."""
    if len(data) < 16:
        raise DecodeError("shorter than a netlink header")
    length, msg_type = struct.unpack_from("=IH", data, 0)
    if length < 16 or length > len(data):
        raise DecodeError(f"bad netlink length {length} for {len(data)} bytes")
    cls = MESSAGE_CLASSES.get(msg_type)
    if cls is None:
        raise DecodeError(f"unknown XFRM message type {msg_type}")
    if length - 16 < _FIXED_SIZE[cls]:
        raise DecodeError(f"{cls.__name__}: {length - 16} bytes, need {_FIXED_SIZE[cls]}")
    _check_nla_chain(data, 16 + ((_FIXED_SIZE[cls] + 3) & ~3), length)
    try:
        msg = cls(bytes(data[:length]))
        msg.decode()
    except DecodeError:
        raise
    except Exception as exc:  # pyroute2 raises assorted errors on hostile input
        raise DecodeError(f"{cls.__name__}: {type(exc).__name__}: {exc}") from None
    return msg


def _check_nla_chain(data: bytes, offset: int, end: int) -> None:
    """Attribute lengths must tile the message; unknown types are kept (newer kernels add some)."""
    while offset + 4 <= end:
        nla_len = struct.unpack_from("=H", data, offset)[0]
        if nla_len < 4 or offset + nla_len > end:
            raise DecodeError(f"bad attribute length {nla_len} at offset {offset}")
        offset += (nla_len + 3) & ~3
    if offset < end and end - offset < 4 and any(data[offset:end]):
        raise DecodeError("trailing garbage after attributes")


# --------------------------------------------------------------------------------------------
# Python-side model


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _net(value: str | Network) -> Network:
    return value if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network) \
        else ipaddress.ip_network(str(value), strict=False)


def family_of(addr: str) -> int:
    return socket.AF_INET6 if ipaddress.ip_address(addr).version == 6 else socket.AF_INET


_ANY4 = ipaddress.IPv4Network("0.0.0.0/0")


@dataclass(frozen=True)
class Selector:
    """Traffic selector: src/dst prefixes, optional protocol and ports."""

    src: Network = _ANY4
    dst: Network = _ANY4
    proto: int = 0
    sport: int = 0
    dport: int = 0
    ifindex: int = 0

    @classmethod
    def of(cls, src: str | Network, dst: str | Network, proto: int = 0, sport: int = 0,
           dport: int = 0) -> Selector:
        s, d = _net(src), _net(dst)
        if s.version != d.version:
            raise ValueError("selector src and dst of different families")
        return cls(s, d, proto, sport, dport)

    @property
    def family(self) -> int:
        return socket.AF_INET6 if self.src.version == 6 else socket.AF_INET

    def to_struct(self) -> dict[str, Any]:
        return {
            "daddr": self.dst.network_address, "saddr": self.src.network_address,
            "dport": self.dport, "dport_mask": 0xFFFF if self.dport else 0,
            "sport": self.sport, "sport_mask": 0xFFFF if self.sport else 0,
            "family": self.family, "prefixlen_d": self.dst.prefixlen, "prefixlen_s": self.src.prefixlen,
            "proto": self.proto, "ifindex": self.ifindex, "user": 0,
        }

    @classmethod
    def from_struct(cls, sel: Mapping[str, Any]) -> Selector:
        family = sel["family"] or socket.AF_INET
        src = ipaddress.ip_network(f"{addr_text(sel['saddr'], family)}/{sel['prefixlen_s']}", strict=False)
        dst = ipaddress.ip_network(f"{addr_text(sel['daddr'], family)}/{sel['prefixlen_d']}", strict=False)
        return cls(src, dst, sel["proto"], sel["sport"], sel["dport"], sel["ifindex"])


@dataclass(frozen=True)
class Encap:
    """ESP-in-UDP (RFC 3948): XFRMA_ENCAP with UDP_ENCAP_ESPINUDP."""

    sport: int = 4500
    dport: int = 4500
    oa: str | None = None
    type: int = UDP_ENCAP_ESPINUDP


@dataclass(frozen=True)
class SA:
    """One ESP SA (tunnel mode by default). Exactly one of ``aead`` or ``enc``(+``auth``) is set.

    Algorithms are (name, key: Secret, bits): for AEAD the ICV length, for auth the truncation
    length, for ``enc`` unused (0).  Use the ``gcm()`` / ``cbc_sha256()`` constructors.
    """

    src: str
    dst: str
    spi: int
    reqid: int = 0
    mode: str = "tunnel"
    proto: int = IPPROTO_ESP
    aead: tuple[str, Secret, int] | None = None
    enc: tuple[str, Secret, int] | None = None
    auth: tuple[str, Secret, int] | None = None
    selector: Selector | None = None
    encap: Encap | None = None
    mark: tuple[int, int] | None = None
    if_id: int | None = None
    replay_window: int = 32
    flags: int = 0
    soft_expire_s: int = 0  # soft / hard add-expires lifetime in seconds (0: none); EXPIRE events
    hard_expire_s: int = 0
    # filled in by dump/get only
    bytes: int = field(default=0, compare=False)
    packets: int = field(default=0, compare=False)
    add_time: int = field(default=0, compare=False)
    stats: Mapping[str, int] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def gcm(cls, src: str, dst: str, spi: int, key_and_salt: Secret, reqid: int = 0, **kw: Any) -> SA:
        """AES-GCM rfc4106 with a 16-byte ICV; key is the AES key (16 or 32 bytes) + 4-byte salt."""
        if len(key_and_salt) not in (20, 36):
            raise ValueError("rfc4106(gcm(aes)) needs a 16 or 32 byte key plus a 4 byte salt")
        return cls(src, dst, spi, reqid, aead=(AEAD_GCM, key_and_salt, 128), **kw)

    @classmethod
    def cbc_sha256(cls, src: str, dst: str, spi: int, enc_key: Secret, auth_key: Secret, reqid: int = 0,
                   **kw: Any) -> SA:
        """AES-CBC (16/32-byte key) + HMAC-SHA256 truncated to 128 bits."""
        if len(enc_key) not in (16, 24, 32):
            raise ValueError("cbc(aes) needs a 16, 24 or 32 byte key")
        return cls(src, dst, spi, reqid, enc=(CIPHER_CBC_AES, enc_key, 0), auth=(AUTH_HMAC_SHA256, auth_key, 128),
                   **kw)

    @property
    def family(self) -> int:
        return family_of(self.dst)

    def describe(self) -> str:
        return f"SA spi=0x{self.spi:08x} {self.src}->{self.dst}"


@dataclass(frozen=True)
class Tmpl:
    """Policy template: the SA this policy requires (tunnel endpoints, reqid)."""

    src: str
    dst: str
    reqid: int = 0
    mode: str = "tunnel"
    proto: int = IPPROTO_ESP
    spi: int = 0
    optional: bool = False


@dataclass(frozen=True)
class Policy:
    selector: Selector
    dir: str  # "in" | "out" | "fwd"
    tmpls: tuple[Tmpl, ...] = ()
    priority: int = 0
    action: str = "allow"  # | "block"
    index: int = 0
    mark: tuple[int, int] | None = None
    if_id: int | None = None

    def describe(self) -> str:
        return f"policy {self.selector.src}->{self.selector.dst} dir {self.dir}"


@dataclass(frozen=True)
class XfrmEvent:
    """A monitor event: kind is 'acquire', 'expire' (hard or soft) or 'polexpire'."""

    kind: str
    hard: bool = False
    sa: SA | None = None
    policy: Policy | None = None
    selector: Selector | None = None
    src: str | None = None
    dst: str | None = None
    seq: int = 0


def sa_to_msg(sa: SA) -> dict[str, Any]:
    family = sa.family
    sel = sa.selector.to_struct() if sa.selector is not None else {"family": family}
    value: dict[str, Any] = {
        "sel": sel,
        "id": {"daddr": sa.dst, "spi": sa.spi, "proto": sa.proto},
        "saddr": sa.src,
        "lft": {**LIFETIME_INFINITE, "soft_add_expires_seconds": sa.soft_expire_s,
                "hard_add_expires_seconds": sa.hard_expire_s},
        "curlft": None,
        "stats": None,
        "seq": 0,
        "reqid": sa.reqid,
        "family": family,
        "mode": MODES[sa.mode],
        "replay_window": sa.replay_window,
        "flags": sa.flags,
    }
    attrs: list[list[Any]] = []
    if sa.aead is not None:
        attrs.append(["XFRMA_ALG_AEAD", {"name": sa.aead[0], "key": sa.aead[1], "icv_len": sa.aead[2]}])
    if sa.enc is not None:
        attrs.append(["XFRMA_ALG_CRYPT", {"name": sa.enc[0], "key": sa.enc[1]}])
    if sa.auth is not None:
        attrs.append(["XFRMA_ALG_AUTH_TRUNC", {"name": sa.auth[0], "key": sa.auth[1], "trunc_len": sa.auth[2]}])
    if sa.encap is not None:
        attrs.append(["XFRMA_ENCAP", {"encap_type": sa.encap.type, "encap_sport": sa.encap.sport,
                                      "encap_dport": sa.encap.dport, "encap_oa": sa.encap.oa}])
    if sa.mark is not None:
        attrs.append(["XFRMA_MARK", {"v": sa.mark[0], "m": sa.mark[1]}])
    if sa.if_id is not None:
        attrs.append(["XFRMA_IF_ID", sa.if_id])
    value["attrs"] = attrs
    return value


def _attr(msg: Any, name: str) -> Any:
    for key, val in msg.get("attrs", ()):
        if key == name:
            return val
    return None


def sa_from_msg(msg: Mapping[str, Any]) -> SA:
    """Build an ``SA`` from a decoded NEWSA message (or an ``xfrm_usersa_info`` dict with ``attrs``)."""
    family = msg["family"]
    aead = _attr(msg, "XFRMA_ALG_AEAD")
    enc = _attr(msg, "XFRMA_ALG_CRYPT")
    auth = _attr(msg, "XFRMA_ALG_AUTH_TRUNC")
    if auth is None:
        plain = _attr(msg, "XFRMA_ALG_AUTH")
        if plain is not None:
            auth = {**plain, "trunc_len": 0}
    encap = _attr(msg, "XFRMA_ENCAP")
    mark = _attr(msg, "XFRMA_MARK")
    sel = msg["sel"]
    selector = Selector.from_struct(sel) if sel["family"] else None
    if selector == Selector():  # the wildcard selector: "none given"
        selector = None
    curlft = msg.get("curlft") or {}
    return SA(
        src=addr_text(msg["saddr"], family),
        dst=addr_text(msg["id"]["daddr"], family),
        spi=msg["id"]["spi"],
        reqid=msg["reqid"],
        mode=MODE_NAMES.get(msg["mode"], str(msg["mode"])),
        proto=msg["id"]["proto"],
        aead=(aead["name"], aead["key"], aead["icv_len"]) if aead else None,
        enc=(enc["name"], enc["key"], 0) if enc else None,
        auth=(auth["name"], auth["key"], auth["trunc_len"]) if auth else None,
        selector=selector,
        encap=Encap(encap["encap_sport"], encap["encap_dport"],
                    addr_text(encap["encap_oa"], family) if any(encap["encap_oa"]) else None,
                    encap["encap_type"]) if encap else None,
        mark=(mark["v"], mark["m"]) if mark else None,
        if_id=_attr(msg, "XFRMA_IF_ID"),
        replay_window=msg["replay_window"],
        flags=msg["flags"],
        soft_expire_s=(msg.get("lft") or {}).get("soft_add_expires_seconds", 0),
        hard_expire_s=(msg.get("lft") or {}).get("hard_add_expires_seconds", 0),
        bytes=curlft.get("bytes", 0),
        packets=curlft.get("packets", 0),
        add_time=curlft.get("add_time", 0),
        stats=dict(msg.get("stats") or {}),
    )


def policy_to_msg(pol: Policy) -> dict[str, Any]:
    tmpls = []
    for t in pol.tmpls:
        fam = family_of(t.dst)
        tmpls.append({
            "id": {"daddr": t.dst, "spi": t.spi, "proto": t.proto},
            "family": fam, "saddr": t.src, "reqid": t.reqid, "mode": MODES[t.mode], "share": 0,
            "optional": int(t.optional), "aalgos": 0xFFFFFFFF, "ealgos": 0xFFFFFFFF, "calgos": 0xFFFFFFFF,
        })
    attrs: list[list[Any]] = []
    if tmpls:
        attrs.append(["XFRMA_TMPL", tmpls])
    if pol.mark is not None:
        attrs.append(["XFRMA_MARK", {"v": pol.mark[0], "m": pol.mark[1]}])
    if pol.if_id is not None:
        attrs.append(["XFRMA_IF_ID", pol.if_id])
    return {
        "sel": pol.selector.to_struct(),
        "lft": LIFETIME_INFINITE,
        "curlft": None,
        "priority": pol.priority,
        "index": pol.index,
        "dir": POLICY_DIRS[pol.dir],
        "action": XFRM_POLICY_BLOCK if pol.action == "block" else XFRM_POLICY_ALLOW,
        "flags": 0,
        "share": 0,
        "attrs": attrs,
    }


def policy_from_msg(msg: Mapping[str, Any]) -> Policy:
    tmpls = []
    for t in _attr(msg, "XFRMA_TMPL") or ():
        fam = t["family"]
        tmpls.append(Tmpl(src=addr_text(t["saddr"], fam), dst=addr_text(t["id"]["daddr"], fam), reqid=t["reqid"],
                          mode=MODE_NAMES.get(t["mode"], str(t["mode"])), proto=t["id"]["proto"],
                          spi=t["id"]["spi"], optional=bool(t["optional"])))
    mark = _attr(msg, "XFRMA_MARK")
    return Policy(
        selector=Selector.from_struct(msg["sel"]),
        dir=POLICY_DIR_NAMES.get(msg["dir"], str(msg["dir"])),
        tmpls=tuple(tmpls),
        priority=msg["priority"],
        action="block" if msg["action"] == XFRM_POLICY_BLOCK else "allow",
        index=msg["index"],
        mark=(mark["v"], mark["m"]) if mark else None,
        if_id=_attr(msg, "XFRMA_IF_ID"),
    )


def event_from_msg(msg: Any) -> XfrmEvent | None:
    """Turn a decoded multicast message into an ``XfrmEvent`` (None for other types)."""
    mtype = msg["header"]["type"]
    if mtype == XFRM_MSG_ACQUIRE:
        fam = msg["policy"]["sel"]["family"] or socket.AF_INET
        pol = policy_from_msg({**msg["policy"], "attrs": msg.get("attrs", ())})
        return XfrmEvent("acquire", policy=pol, selector=Selector.from_struct(msg["sel"]),
                         src=addr_text(msg["saddr"], fam), dst=addr_text(msg["id"]["daddr"], fam), seq=msg["seq"])
    if mtype == XFRM_MSG_EXPIRE:
        state = dict(msg["state"])
        state["attrs"] = msg.get("attrs", ())
        sa = sa_from_msg(state)
        return XfrmEvent("expire", hard=bool(msg["hard"]), sa=sa, src=sa.src, dst=sa.dst)
    if mtype == XFRM_MSG_POLEXPIRE:
        pol = policy_from_msg({**msg["pol"], "attrs": msg.get("attrs", ())})
        return XfrmEvent("polexpire", hard=bool(msg["hard"]), policy=pol)
    return None
