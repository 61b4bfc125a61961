"""Authenticators (RFC 5944 3.5.1 HMAC-MD5, RFC 3012 MN-AAA), checked against an independent
computation written here with hashlib/hmac, and against RFC 2202 HMAC-MD5 vectors."""

from __future__ import annotations

import hashlib
import hmac
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from daemons.runtime.config import SecurityAssociation
from daemons.runtime.secret import Secret
from daemons.wire.mip import (
    CHAP_SPI,
    EXT_FA_HA_AUTH,
    EXT_GEN_AUTH,
    EXT_MN_FA_AUTH,
    EXT_MN_HA_AUTH,
    HMAC_CHAP_SPI,
    DecodeError,
    FAHAAuthExtension,
    GeneralizedAuthExtension,
    MNFAAuthExtension,
    MNFAChallengeExtension,
    MNHAAuthExtension,
    NAIExtension,
    RegistrationReply,
    RegistrationRequest,
    ReplyCode,
    append_authenticator,
    authenticated,
    compute_authenticator,
    covered,
    decode_message,
    previous_fa_extension,
    registration_request,
    sign,
    strip_after,
    verify,
)

MN_HA = Secret(b"mn-ha shared secret 0123456789")
MN_AAA = Secret(b"mn-aaa secret")
MN_FA = Secret(b"mn-fa")
FA_HA = Secret(bytes(range(32)))
CHALLENGE = bytes.fromhex("0123456789abcdef")


def base_rrq(challenge: bytes = CHALLENGE) -> RegistrationRequest:
    return RegistrationRequest(
        home_address="198.18.1.10",
        home_agent="198.18.1.1",
        care_of_address="198.18.2.1",
        identification=0xDEADBEEF01234567,
        lifetime=600,
        extensions=[NAIExtension("alice@example.net"), MNFAChallengeExtension(challenge)],
    )


# independent reference implementations ------------------------------------------------
def ref_hmac(key: bytes, covered: bytes) -> bytes:
    return hmac.new(key, covered, "md5").digest()


def ref_chap(key: bytes, covered: bytes, challenge: bytes) -> bytes:
    return hashlib.md5(
        challenge[0:1] + key + hashlib.md5(covered).digest() + challenge[-237:]
    ).digest()


def short_header(t: int, spi: int) -> bytes:
    return bytes([t, 20]) + struct.pack(">I", spi)


def gen_header(spi: int) -> bytes:
    return bytes([36, 1, 0, 20]) + struct.pack(">I", spi)


# --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("key", "data", "mac"),
    [  # RFC 2202 section 2, HMAC-MD5 test cases 1, 2 and 6
        (b"\x0b" * 16, b"Hi There", "9294727a3638bb1c13f48ef8158bfc9d"),
        (b"Jefe", b"what do ya want for nothing?", "750c783e6ab0b503eaa86e310a5db738"),
        (
            b"\xaa" * 80,
            b"Test Using Larger Than Block-Size Key - Hash Key First",
            "6b1ab7fe4bd7bf8f0b62e6ce61b9d0cd",
        ),
    ],
)
def test_rfc2202_vectors(key, data, mac):
    for ext_type in (EXT_MN_HA_AUTH, EXT_MN_FA_AUTH, EXT_FA_HA_AUTH, EXT_GEN_AUTH):
        got = compute_authenticator(data, Secret(key), ext_type=ext_type, spi=256)
        assert got.hex() == mac


def full_chain() -> bytes:
    """MN signs MN-HA, MN-AAA (CHAP_SPI) and MN-FA, in that order."""
    msg = sign(base_rrq(), EXT_MN_HA_AUTH, 0x100, MN_HA)
    msg = sign(msg, EXT_GEN_AUTH, CHAP_SPI, MN_AAA)
    msg = sign(msg, EXT_MN_FA_AUTH, 0x200, MN_FA)
    return msg.encode()


def test_independent_computation_of_the_chain():
    wire = full_chain()
    fixed_and_first = base_rrq().encode()
    # MN-HA covers fixed part + NAI + challenge + its own type/len/SPI
    c1 = fixed_and_first + short_header(32, 0x100)
    a1 = ref_hmac(MN_HA.reveal(), c1)
    assert wire.startswith(c1 + a1)
    # MN-AAA (CHAP_SPI) covers everything before it incl. the MN-HA extension
    c2 = c1 + a1 + gen_header(CHAP_SPI)
    a2 = ref_chap(MN_AAA.reveal(), c2, CHALLENGE)
    assert wire.startswith(c2 + a2)
    # MN-FA covers everything, including both preceding auth extensions
    c3 = c2 + a2 + short_header(33, 0x200)
    a3 = ref_hmac(MN_FA.reveal(), c3)
    assert wire == c3 + a3
    assert verify(wire, EXT_MN_HA_AUTH, MN_HA, spi=0x100)
    assert verify(wire, EXT_GEN_AUTH, MN_AAA, spi=CHAP_SPI)
    assert verify(wire, EXT_MN_FA_AUTH, MN_FA)
    msg = decode_message(wire)
    assert msg.find(GeneralizedAuthExtension).authenticator == a2


@pytest.mark.parametrize(
    ("ext_type", "key", "end_ext"),
    [
        (EXT_MN_HA_AUTH, MN_HA, MNHAAuthExtension),
        (EXT_GEN_AUTH, MN_AAA, GeneralizedAuthExtension),
        (EXT_MN_FA_AUTH, MN_FA, MNFAAuthExtension),
    ],
)
def test_flipping_any_covered_byte_breaks_verification(ext_type, key, end_ext):
    wire = full_chain()
    msg = decode_message(wire)
    # end of the extension under test
    end = 24
    for ext in msg.extensions:
        end += len(ext.encode())
        if isinstance(ext, end_ext):
            break
    assert verify(wire, ext_type, key)
    for pos in range(end):
        for mask in (0x01, 0x80, 0xFF):
            bad = bytearray(wire)
            bad[pos] ^= mask
            try:
                ok = verify(bytes(bad), ext_type, key)
            except DecodeError:
                ok = False
            assert not ok, (pos, mask)


def test_wrong_key_spi_or_missing_extension():
    wire = full_chain()
    assert not verify(wire, EXT_MN_HA_AUTH, MN_FA)
    assert not verify(wire, EXT_MN_HA_AUTH, MN_HA, spi=0x101)
    assert not verify(wire, EXT_FA_HA_AUTH, FA_HA)  # not present
    assert not verify(base_rrq().encode(), EXT_MN_HA_AUTH, MN_HA)
    with pytest.raises(DecodeError):
        verify(wire[:-1], EXT_MN_HA_AUTH, MN_HA)
    with pytest.raises(ValueError):
        verify(wire, 131, MN_HA)  # NAI is not an auth extension


def test_chap_spi_needs_a_challenge():
    rrq = RegistrationRequest("1.1.1.1", "2.2.2.2", "3.3.3.3", 1)
    with pytest.raises(ValueError):
        sign(rrq, EXT_GEN_AUTH, CHAP_SPI, MN_AAA)
    signed = sign(rrq, EXT_GEN_AUTH, CHAP_SPI, MN_AAA, challenge=b"explicit")
    wire = signed.encode()
    assert not verify(wire, EXT_GEN_AUTH, MN_AAA)  # no challenge in the message
    assert verify(wire, EXT_GEN_AUTH, MN_AAA, challenge=b"explicit")
    assert not verify(wire, EXT_GEN_AUTH, MN_AAA, challenge=b"other")


@given(st.binary(min_size=1, max_size=255))
def test_chap_challenge_lengths(challenge):
    wire = sign(base_rrq(challenge), EXT_GEN_AUTH, CHAP_SPI, MN_AAA).encode()
    covered = wire[:-16]
    assert wire[-16:] == ref_chap(MN_AAA.reveal(), covered, challenge)
    assert verify(wire, EXT_GEN_AUTH, MN_AAA)


def test_chap_uses_least_order_237_bytes_of_long_challenges():
    challenge = bytes(range(250))
    wire = sign(base_rrq(challenge), EXT_GEN_AUTH, CHAP_SPI, MN_AAA).encode()
    inner = hashlib.md5(wire[:-16]).digest()
    expect = hashlib.md5(b"\x00" + MN_AAA.reveal() + inner + challenge[13:]).digest()
    assert wire[-16:] == expect


def test_mn_aaa_with_ordinary_spi_is_hmac_md5():
    wire = sign(base_rrq(), EXT_GEN_AUTH, 0x1000, MN_AAA).encode()
    assert wire[-16:] == ref_hmac(MN_AAA.reveal(), wire[:-16])
    assert verify(wire, EXT_GEN_AUTH, MN_AAA, spi=0x1000)


def test_hmac_chap_spi_not_implemented():
    with pytest.raises(ValueError):
        sign(base_rrq(), EXT_GEN_AUTH, HMAC_CHAP_SPI, MN_AAA)
    forged = base_rrq().with_extensions(GeneralizedAuthExtension(HMAC_CHAP_SPI, b"\x00" * 16))
    assert not verify(forged.encode(), EXT_GEN_AUTH, MN_AAA)


def test_fa_relay_flow_on_raw_bytes():
    """MN -> FA: NAI, challenge, MN-HA, MN-AAA, MN-FA.  The FA verifies MN-FA on the raw
    bytes, strips what follows MN-AAA (kept for the AAA) and appends FA-HA."""
    wire = full_chain()
    assert verify(wire, EXT_MN_FA_AUTH, MN_FA)
    relayed = append_authenticator(strip_after(wire, EXT_GEN_AUTH), EXT_FA_HA_AUTH, 7, FA_HA)
    msg = decode_message(relayed)
    assert [type(e) for e in msg.extensions] == [
        NAIExtension,
        MNFAChallengeExtension,
        MNHAAuthExtension,
        GeneralizedAuthExtension,
        FAHAAuthExtension,
    ]
    assert verify(relayed, EXT_MN_HA_AUTH, MN_HA)
    assert verify(relayed, EXT_GEN_AUTH, MN_AAA)
    assert verify(relayed, EXT_FA_HA_AUTH, FA_HA, spi=7)
    assert relayed[-16:] == ref_hmac(FA_HA.reveal(), relayed[:-16])
    assert strip_after(relayed, EXT_MN_HA_AUTH) == wire[: 24 + 19 + 10 + 22]
    with pytest.raises(ValueError):
        strip_after(base_rrq().encode(), EXT_MN_HA_AUTH)


def test_authenticated_and_covered_leave_out_what_follows_the_authenticator():
    """RFC 5944 §3.5: an authenticator covers what precedes it. What an attacker appends after
    it does not break verification (the covered bytes are intact) and must not be read:
    ``authenticated`` returns the message only as far as the authenticator."""
    wire = full_chain()  # NAI, challenge, MN-HA, MN-AAA, MN-FA
    appended = wire + previous_fa_extension("198.18.0.99").encode() + NAIExtension("mallory@x").encode()
    assert verify(appended, EXT_MN_HA_AUTH, MN_HA)  # still true: say what is covered, not only "ok"
    mine = authenticated(appended, EXT_MN_HA_AUTH, MN_HA)
    assert mine is not None and [type(e) for e in mine.extensions] == [
        NAIExtension, MNFAChallengeExtension, MNHAAuthExtension]
    assert mine.encode() == strip_after(wire, EXT_MN_HA_AUTH)  # exactly the covered bytes
    assert authenticated(appended, EXT_MN_HA_AUTH, Secret(b"wrong")) is None
    assert authenticated(appended, EXT_MN_HA_AUTH, MN_HA, spi=0xBAD) is None
    whole = authenticated(appended, EXT_MN_FA_AUTH, MN_FA)
    assert whole is not None and len(whole.extensions) == 5 == len(decode_message(appended).extensions) - 2
    # covered(): the same cut without a key (the HA looks the NAI up before it verifies).
    msg = decode_message(appended)
    assert covered(msg, EXT_MN_HA_AUTH) == mine and len(msg.extensions) == 7  # the original is left alone
    assert covered(msg, EXT_FA_HA_AUTH).extensions == []  # no such authenticator: nothing is covered
    assert covered(msg, EXT_GEN_AUTH).extensions[-1] == decode_message(wire).extensions[3]


def test_append_equals_sign():
    rrq = base_rrq()
    assert append_authenticator(rrq.encode(), EXT_MN_HA_AUTH, 5, MN_HA) == (
        sign(rrq, EXT_MN_HA_AUTH, 5, MN_HA).encode()
    )
    with pytest.raises(DecodeError):
        append_authenticator(b"\x01\x00", EXT_MN_HA_AUTH, 5, MN_HA)


def test_verification_uses_the_received_bytes_with_unknown_extensions():
    raw = base_rrq().encode() + b"\xf0\x05hello"  # unknown skippable extension
    signed = append_authenticator(raw, EXT_MN_HA_AUTH, 9, MN_HA)
    assert signed[-16:] == ref_hmac(MN_HA.reveal(), signed[:-16])
    assert verify(signed, EXT_MN_HA_AUTH, MN_HA)


def test_reply_signing():
    rrp = RegistrationReply(ReplyCode.ACCEPTED, "198.18.1.10", "198.18.1.1", 42, lifetime=600)
    wire = sign(rrp, EXT_MN_HA_AUTH, 0x100, MN_HA).encode()
    assert wire[-16:] == ref_hmac(MN_HA.reveal(), rrp.encode() + short_header(32, 0x100))
    assert verify(wire, EXT_MN_HA_AUTH, MN_HA)


def test_keys_must_be_secrets_and_stay_hidden():
    with pytest.raises(TypeError):
        compute_authenticator(b"x", b"raw key", ext_type=32, spi=1)  # type: ignore[arg-type]
    try:
        sign(
            RegistrationRequest("1.1.1.1", "2.2.2.2", "3.3.3.3", 1), EXT_GEN_AUTH, CHAP_SPI, MN_AAA
        )
    except ValueError as exc:
        assert MN_AAA.reveal().decode() not in str(exc)
    assert "secret" not in repr(sign(base_rrq(), EXT_MN_HA_AUTH, 1, MN_HA))


@given(
    st.lists(
        st.one_of(
            st.builds(NAIExtension, st.text(max_size=30)),
            st.builds(MNFAChallengeExtension, st.binary(min_size=1, max_size=64)),
        ),
        max_size=3,
    ),
    st.sampled_from([EXT_MN_HA_AUTH, EXT_MN_FA_AUTH, EXT_FA_HA_AUTH, EXT_GEN_AUTH]),
    st.integers(256, 0xFFFFFFFF),
    st.binary(min_size=1, max_size=64),
    st.data(),
)
def test_sign_verify_property(exts, ext_type, spi, key, data):
    rrq = RegistrationRequest("198.18.1.10", "198.18.1.1", "198.18.2.1", 1, extensions=exts)
    wire = sign(rrq, ext_type, spi, Secret(key)).encode()
    assert wire[-16:] == ref_hmac(key, wire[:-16])
    assert verify(memoryview(wire), ext_type, Secret(key), spi=spi)
    pos = data.draw(st.integers(0, len(wire) - 1))
    bad = bytearray(wire)
    bad[pos] ^= data.draw(st.integers(1, 255))
    try:
        assert not verify(bytes(bad), ext_type, Secret(key), spi=spi)
    except DecodeError:
        pass


def test_registration_request_builder_orders_and_covers_as_the_rfcs_say() -> None:
    """The one RRQ builder: NAI, the caller's extensions, MN-HA, challenge, MN-AAA; each
    authenticator checked here with the independent HMAC-MD5 above."""
    mn_ha, mn_aaa = SecurityAssociation(0x1000, MN_HA), SecurityAssociation(0x3000, MN_AAA)
    extra = previous_fa_extension("198.18.2.9")
    rrq = registration_request(home_address="198.18.1.10", home_agent="198.18.1.1", care_of_address="198.18.2.1",
                               identification=0xDEADBEEF01234567, lifetime=600, nai="alice@example.net",
                               extensions=[extra], mn_ha=mn_ha, challenge=CHALLENGE, mn_aaa=mn_aaa)
    assert [type(e) for e in rrq.extensions] == [NAIExtension, type(extra), MNHAAuthExtension,
                                                 MNFAChallengeExtension, GeneralizedAuthExtension]
    wire = rrq.encode()
    ha_end = len(wire) - len(rrq.extensions[-1].encode()) - len(rrq.extensions[-2].encode())
    assert wire[ha_end - 16:ha_end] == ref_hmac(MN_HA.reveal(), wire[:ha_end - 16])
    assert wire[-16:] == ref_hmac(MN_AAA.reveal(), wire[:-16])  # covers the challenge
    assert rrq.find(MNFAChallengeExtension).challenge == CHALLENGE  # type: ignore[union-attr]
    # Without a challenge (at home, or an FA without challenges): NAI and MN-HA only.
    plain = registration_request(home_address="198.18.1.10", home_agent="198.18.1.1", care_of_address="198.18.1.10",
                                 identification=1, lifetime=0, nai="alice@example.net", mn_ha=mn_ha)
    assert [type(e) for e in plain.extensions] == [NAIExtension, MNHAAuthExtension]
    assert verify(plain.encode(), EXT_MN_HA_AUTH, MN_HA, spi=0x1000)
    with pytest.raises(ValueError, match="challenge"):
        registration_request(home_address="198.18.1.10", home_agent="198.18.1.1", care_of_address="198.18.2.1",
                             identification=1, lifetime=600, nai="alice@example.net", mn_ha=mn_ha, mn_aaa=mn_aaa)
