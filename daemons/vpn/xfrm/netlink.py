"""NETLINK_XFRM I/O: the request socket (``XfrmSocket``), the event monitor (``XfrmMonitor``)
and the kernel-ESP probe of the ``auto`` backend choice.

The messages themselves (structures, attributes, ``SA`` / ``Policy`` / ``Selector`` models and
their conversion) are pure code in :mod:`daemons.wire.xfrm`; this module only opens sockets
on them.  The request socket is built on pyroute2's ``NetlinkSocket`` with ``NETLINK_XFRM``
(6) and our marshal.

* ``XfrmSocket``: a small synchronous, thread-safe API (SA / policy add, update, delete, get,
  dump, flush) and ``XfrmMonitor`` for ACQUIRE/EXPIRE events (sync ``read()`` and
  ``async for``).  From asyncio, call it with ``await asyncio.to_thread(...)`` or
  ``await xs.acall(xs.add_sa, sa)`` (runs on the socket's own worker thread).
* ``probe_kernel_esp``: can this kernel install an ESP SA?

Network namespaces: the request socket is created by pyroute2 (``NetlinkSocket(netns=NAME)``),
which opens it in a short-lived child process that ``setns()``-es into ``/run/netns/NAME`` and
passes the descriptor back; the monitor socket uses the same helper
(``pyroute2.netns.create_socket``).  We pass ``flags=0``, so a missing namespace is an error
instead of being created silently.  The socket keeps its namespace for its whole life.

Kernel errors surface as ``XfrmError`` (an ``OSError`` with the kernel's errno) whose message
names the operation, ``os.strerror(errno)`` and the kernel's extended-ack text, e.g.
``add SA spi=0x00000100 198.18.0.1->198.18.0.2 failed: Protocol not supported
(kernel: Requested type not found)``.  Keys never appear in messages or reprs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import select
import socket
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import Any, TypeVar

from pyroute2 import netns as pr2_netns
from pyroute2.netlink import (
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_DUMP,
    NLM_F_EXCL,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
)
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.nlsocket import AsyncNetlinkSocket, NetlinkSocket

from daemons.runtime.secret import Secret
from daemons.wire.xfrm import (
    IPPROTO_ESP,
    IPSEC_PROTO_ANY,
    LIFETIME_INFINITE,
    MESSAGE_CLASSES,
    MODES,
    NETLINK_XFRM,
    POLICY_DIRS,
    SA,
    XFRM_MSG_ALLOCSPI,
    XFRM_MSG_DELPOLICY,
    XFRM_MSG_DELSA,
    XFRM_MSG_FLUSHPOLICY,
    XFRM_MSG_FLUSHSA,
    XFRM_MSG_GETPOLICY,
    XFRM_MSG_GETSA,
    XFRM_MSG_NEWPOLICY,
    XFRM_MSG_NEWSA,
    XFRM_MSG_UPDPOLICY,
    XFRM_MSG_UPDSA,
    XFRMNLGRP_ACQUIRE,
    XFRMNLGRP_EXPIRE,
    Policy,
    Selector,
    XfrmEvent,
    XfrmMarshal,
    event_from_msg,
    family_of,
    policy_from_msg,
    policy_to_msg,
    sa_from_msg,
    sa_to_msg,
)


class XfrmError(OSError):
    """A kernel error for one XFRM operation: errno, strerror, operation and the kernel's text."""

    def __init__(self, code: int, operation: str, kernel_text: str | None = None) -> None:
        self.operation = operation
        self.kernel_text = kernel_text or None
        message = f"{operation} failed: {os.strerror(code)}"
        if self.kernel_text:
            message += f" (kernel: {self.kernel_text})"
        super().__init__(code, message)

    def __str__(self) -> str:
        return str(self.strerror)


class AsyncXfrmNetlinkSocket(AsyncNetlinkSocket):
    marshal_class = XfrmMarshal


class XfrmNetlinkSocket(NetlinkSocket):
    """pyroute2 NetlinkSocket on NETLINK_XFRM with our marshal (ext_ack on, no netns auto-create)."""

    async_class = AsyncXfrmNetlinkSocket

    def __init__(self, netns: str | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("ext_ack", True)
        kwargs.setdefault("flags", 0)
        super().__init__(family=NETLINK_XFRM, netns=netns, **kwargs)


# --------------------------------------------------------------------------------------------
# The socket API

T = TypeVar("T")


class XfrmSocket:
    """SAs and policies in one network namespace (``netns=None``: the caller's namespace).

    Synchronous and thread-safe: every call runs on the socket's own worker thread (pyroute2's
    sync sockets are bound to the thread that made them), so it can be used from any thread,
    ``asyncio.to_thread`` included; ``await xs.acall(xs.add_sa, sa)`` does the same without a
    pool thread of the loop's default executor.
    """

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="xfrm")
        self._closed = False
        self._worker = self._pool.submit(threading.get_ident).result()
        self._sock: XfrmNetlinkSocket = self._pool.submit(XfrmNetlinkSocket, netns).result()

    # -- plumbing
    def __enter__(self) -> XfrmSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"XfrmSocket(netns={self.netns!r})"

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            self._pool.submit(self._sock.close).result()
        self._pool.shutdown(wait=True)

    def _run(self, fn: Callable[[], T]) -> T:
        if self._closed:
            raise OSError(9, "XfrmSocket is closed")
        if threading.get_ident() == self._worker:
            return fn()
        return self._pool.submit(fn).result()

    async def acall(self, method: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, lambda: method(*args, **kwargs))

    def _request(self, msg_type: int, value: Mapping[str, Any], flags: int, operation: str) -> list[Any]:
        def run() -> list[Any]:
            msg = MESSAGE_CLASSES[msg_type]()
            for key, item in value.items():
                if key != "attrs":
                    msg[key] = item
            msg["attrs"] = [list(a) for a in value.get("attrs", ())]
            try:
                replies = list(self._sock.nlm_request(msg, msg_type=msg_type, msg_flags=flags))
            except NetlinkError as exc:
                raise XfrmError(exc.code, operation, _extack_text(exc)) from None
            return [m for m in replies if m["header"]["type"] not in (NLMSG_ERROR, NLMSG_DONE)]

        return self._run(run)

    # -- SAs
    def add_sa(self, sa: SA) -> None:
        self._request(XFRM_MSG_NEWSA, sa_to_msg(sa), NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
                      f"add {sa.describe()}")

    def update_sa(self, sa: SA) -> None:
        """UPDSA: replace an existing SA (same dst/spi/proto); the kernel refuses to change algorithms."""
        self._request(XFRM_MSG_UPDSA, sa_to_msg(sa), NLM_F_REQUEST | NLM_F_ACK, f"update {sa.describe()}")

    def _sa_id(self, dst: str, spi: int, src: str | None, proto: int) -> dict[str, Any]:
        value: dict[str, Any] = {"daddr": dst, "spi": spi, "family": family_of(dst), "proto": proto, "attrs": []}
        if src is not None:
            value["attrs"].append(["XFRMA_SRCADDR", src])
        return value

    def delete_sa(self, dst: str, spi: int, src: str | None = None, proto: int = IPPROTO_ESP) -> None:
        self._request(XFRM_MSG_DELSA, self._sa_id(dst, spi, src, proto), NLM_F_REQUEST | NLM_F_ACK,
                      f"delete SA spi=0x{spi:08x} {src or '*'}->{dst}")

    def get_sa(self, dst: str, spi: int, src: str | None = None, proto: int = IPPROTO_ESP) -> SA:
        replies = self._request(XFRM_MSG_GETSA, self._sa_id(dst, spi, src, proto), NLM_F_REQUEST,
                                f"get SA spi=0x{spi:08x} {src or '*'}->{dst}")
        return sa_from_msg(replies[0])

    def dump_sas(self) -> list[SA]:
        replies = self._request(XFRM_MSG_GETSA, {}, NLM_F_REQUEST | NLM_F_DUMP, "dump SAs")
        return [sa_from_msg(m) for m in replies if m["header"]["type"] == XFRM_MSG_NEWSA]

    def alloc_spi(self, src: str, dst: str, reqid: int = 0, low: int = 0x100, high: int = 0x0FFFFFFF,
                  mode: str = "tunnel", proto: int = IPPROTO_ESP) -> int:
        """ALLOCSPI: the kernel picks a free SPI in [low, high] and holds it in a larval SA."""
        family = family_of(dst)
        value = {"info": {"sel": {"family": family}, "id": {"daddr": dst, "proto": proto}, "saddr": src,
                          "lft": LIFETIME_INFINITE, "reqid": reqid, "family": family, "mode": MODES[mode]},
                 "min": low, "max": high}
        replies = self._request(XFRM_MSG_ALLOCSPI, value, NLM_F_REQUEST, f"allocate SPI {src}->{dst}")
        return int(replies[0]["id"]["spi"])

    def flush_sas(self, proto: int = IPSEC_PROTO_ANY) -> None:
        self._request(XFRM_MSG_FLUSHSA, {"proto": proto}, NLM_F_REQUEST | NLM_F_ACK, "flush SAs")

    # -- policies
    def add_policy(self, policy: Policy) -> None:
        self._request(XFRM_MSG_NEWPOLICY, policy_to_msg(policy),
                      NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, f"add {policy.describe()}")

    def update_policy(self, policy: Policy) -> None:
        """UPDPOLICY: add or replace the policy with the same selector and direction."""
        self._request(XFRM_MSG_UPDPOLICY, policy_to_msg(policy), NLM_F_REQUEST | NLM_F_ACK,
                      f"update {policy.describe()}")

    def _policy_id(self, selector: Selector | None, dir: str, index: int, mark: tuple[int, int] | None,
                   if_id: int | None) -> dict[str, Any]:
        attrs: list[list[Any]] = []
        if mark is not None:
            attrs.append(["XFRMA_MARK", {"v": mark[0], "m": mark[1]}])
        if if_id is not None:
            attrs.append(["XFRMA_IF_ID", if_id])
        return {"sel": selector.to_struct() if selector is not None else None, "index": index,
                "dir": POLICY_DIRS[dir], "attrs": attrs}

    def delete_policy(self, selector: Selector | None, dir: str, index: int = 0,
                      mark: tuple[int, int] | None = None, if_id: int | None = None) -> None:
        """Delete by selector + direction, or by ``index`` (selector None)."""
        what = f"index {index}" if selector is None else f"{selector.src}->{selector.dst}"
        self._request(XFRM_MSG_DELPOLICY, self._policy_id(selector, dir, index, mark, if_id),
                      NLM_F_REQUEST | NLM_F_ACK, f"delete policy {what} dir {dir}")

    def get_policy(self, selector: Selector | None, dir: str, index: int = 0,
                   mark: tuple[int, int] | None = None, if_id: int | None = None) -> Policy:
        what = f"index {index}" if selector is None else f"{selector.src}->{selector.dst}"
        replies = self._request(XFRM_MSG_GETPOLICY, self._policy_id(selector, dir, index, mark, if_id),
                                NLM_F_REQUEST, f"get policy {what} dir {dir}")
        return policy_from_msg(replies[0])

    def dump_policies(self) -> list[Policy]:
        replies = self._request(XFRM_MSG_GETPOLICY, {}, NLM_F_REQUEST | NLM_F_DUMP, "dump policies")
        return [policy_from_msg(m) for m in replies if m["header"]["type"] == XFRM_MSG_NEWPOLICY]

    def flush_policies(self) -> None:
        self._request(XFRM_MSG_FLUSHPOLICY, {}, NLM_F_REQUEST | NLM_F_ACK, "flush policies")

    def flush(self) -> None:
        """Flush SAs and policies."""
        self.flush_policies()
        self.flush_sas()

    # -- events
    def monitor(self, groups: Iterable[int] = (XFRMNLGRP_ACQUIRE, XFRMNLGRP_EXPIRE)) -> XfrmMonitor:
        return XfrmMonitor(self.netns, groups)


def _extack_text(exc: NetlinkError) -> str | None:
    text = exc.args[1] if len(exc.args) > 1 else None
    if not text or not isinstance(text, str) or text == os.strerror(exc.code):
        return None
    return text


class XfrmMonitor:
    """Multicast listener for XFRM events (default groups: ACQUIRE and EXPIRE).

    ``read(timeout)`` returns the events that arrived (blocking up to ``timeout`` seconds for the
    first); ``async for event in monitor`` yields events on the running loop.
    """

    def __init__(self, netns: str | None = None,
                 groups: Iterable[int] = (XFRMNLGRP_ACQUIRE, XFRMNLGRP_EXPIRE)) -> None:
        self.netns = netns
        self.groups = tuple(groups)
        self.marshal = XfrmMarshal()
        self.sock = pr2_netns.create_socket(netns, socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_XFRM, flags=0)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.sock.bind((0, 0))
        for group in self.groups:
            self.sock.setsockopt(270, 1, group)  # SOL_NETLINK, NETLINK_ADD_MEMBERSHIP
        self.sock.setblocking(False)

    def __enter__(self) -> XfrmMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"XfrmMonitor(netns={self.netns!r}, groups={self.groups})"

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    def parse(self, data: bytes) -> list[XfrmEvent]:
        events = []
        for msg in self.marshal.parse(data):
            if msg["header"].get("error") is not None:
                continue
            event = event_from_msg(msg)
            if event is not None:
                events.append(event)
        return events

    def read(self, timeout: float | None = None) -> list[XfrmEvent]:
        ready, _, _ = select.select([self.sock], [], [], timeout)
        events: list[XfrmEvent] = []
        while ready:
            try:
                data = self.sock.recv(1 << 16)
            except BlockingIOError:
                break
            events.extend(self.parse(data))
        return events

    async def __aiter__(self) -> AsyncIterator[XfrmEvent]:
        loop = asyncio.get_running_loop()
        while True:
            data = await loop.sock_recv(self.sock, 1 << 16)
            for event in self.parse(data):
                yield event


# --------------------------------------------------------------------------------------------
# Probe for the "auto" backend

PROBE_SPI = 0x0DEC0DE1
PROBE_SRC = "198.18.255.1"
PROBE_DST = "198.18.255.2"


def probe_kernel_esp(netns: str | None = None, scratch_prefix: str = "mipvpn-probe-") -> bool | str:
    """Can this kernel install an ESP tunnel SA (rfc4106 AES-GCM)? True, or the reason why not.

    With ``netns`` given, the SA is added to and removed from that namespace (it must exist).
    Without, a scratch namespace ``<scratch_prefix><pid>`` is created and removed again.
    The reason is the ``XfrmError`` text, e.g. "add SA spi=0x0dec0de1 198.18.255.1->198.18.255.2
    failed: Function not implemented (kernel: Requested AEAD algorithm not found)".
    """
    scratch = None
    if netns is None:
        scratch = f"{scratch_prefix}{os.getpid()}"
        pr2_netns.create(scratch)
        netns = scratch
    try:
        with XfrmSocket(netns) as xs:
            sa = SA.gcm(PROBE_SRC, PROBE_DST, PROBE_SPI, Secret(bytes(range(20))))
            try:
                xs.add_sa(sa)
            except XfrmError as exc:
                return str(exc)
            xs.delete_sa(PROBE_DST, PROBE_SPI, PROBE_SRC)
            return True
    finally:
        if scratch is not None:
            pr2_netns.remove(scratch)
