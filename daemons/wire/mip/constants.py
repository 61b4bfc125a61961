"""Mobile IPv4 code points (RFC 5944, RFC 3012, RFC 2794, RFC 3115, RFC 3024) and our own
vendor constants.  Every number the daemons need lives here."""

from __future__ import annotations

from enum import IntEnum, IntFlag

MIP_UDP_PORT = 434

# --- message types (UDP 434) -------------------------------------------------------------
MSG_REGISTRATION_REQUEST = 1
MSG_REGISTRATION_REPLY = 3
MSG_EXPERIMENTAL = 255  # RFC 4064 section 3: Experimental Message (carries our binding messages)

# --- ICMP (Router Discovery, RFC 1256 / RFC 5944 section 2) -----------------------------
ICMP_ROUTER_ADVERTISEMENT = 9
ICMP_ROUTER_SOLICITATION = 10
ADV_CODE_ROUTES = 0  # the agent also routes common traffic
ADV_CODE_MOBILITY_ONLY = 16  # "does not route common traffic" (RFC 5944 section 2.1)

# --- registration extension types --------------------------------------------------------
EXT_MN_HA_AUTH = 32
EXT_MN_FA_AUTH = 33
EXT_FA_HA_AUTH = 34
EXT_GEN_AUTH = 36  # Generalized Mobile IP Authentication (RFC 3012), long format
EXT_MN_AAA_AUTH = EXT_GEN_AUTH  # alias: the MN-AAA authentication is type 36 subtype 1
EXT_CVSE = 38  # Critical Vendor/Organization Specific Extension (RFC 3115), long format
EXT_NAI = 131  # Mobile Node NAI (RFC 2794)
EXT_MN_FA_CHALLENGE = 132  # MN-FA Challenge (RFC 3012)
EXT_NVSE = 134  # Normal Vendor/Organization Specific Extension (RFC 3115)

GEN_AUTH_SUBTYPE_MN_AAA = 1  # RFC 3012 section 6

# --- advertisement extension types (inside ICMP router advertisements) ------------------
ADV_EXT_PADDING = 0  # one-byte padding, no length field
ADV_EXT_MOBILITY_AGENT = 16
ADV_EXT_PREFIX_LENGTHS = 19
ADV_EXT_CHALLENGE = 24  # RFC 3012 section 2

# --- reserved SPIs (RFC 3012 section 9) ---------------------------------------------------
CHAP_SPI = 2
HMAC_CHAP_SPI = 3  # RFC 4721; not implemented (see auth.py)

AUTHENTICATOR_LEN = 16  # HMAC-MD5 / MD5 output

# --- our vendor data (RFC 3115 CVSE/NVSE) -------------------------------------------------
VENDOR_ID = 32473  # documentation enterprise number, RFC 5612
VENDOR_TYPE_VPN_INFO = 1
VENDOR_TYPE_PREVIOUS_FA = 2
VENDOR_TYPE_SERVICE_UPDATE = 3
VENDOR_TYPE_LOCAL_ANSWER = 4  # NVSE: the MN-AAAF authenticator of an intra-domain move (localanswer.py)

# --- route optimisation / smooth handoff (draft-ietf-mobileip-optim semantics) -------------
# Carried in the RFC 4064 Experimental Message (type 255) under Vendor-Id 32473, told apart by
# the subtype octet; the draft's own types 16-19 now belong to RFC 4857 / RFC 4881.
BINDING_SUBTYPE_UPDATE = 1
BINDING_SUBTYPE_ACKNOWLEDGE = 2
BINDING_SUBTYPE_REQUEST = 3
BINDING_SUBTYPE_WARNING = 4
# Binding messages are authenticated agent-to-agent (HA -> CN-GW, new FA -> previous FA):
# the RFC 5944 Foreign-Home Authentication extension framing (SPI + HMAC-MD5), the SPI
# selecting the binding security association of the two peers.
EXT_BINDING_AUTH = EXT_FA_HA_AUTH


class RRQFlag(IntFlag):
    """Flags octet of a Registration Request (RFC 5944 section 3.3)."""

    S = 0x80  # simultaneous bindings
    B = 0x40  # broadcast datagrams
    D = 0x20  # decapsulation by mobile node (co-located care-of address)
    M = 0x10  # minimal encapsulation
    G = 0x08  # GRE encapsulation
    r = 0x04  # reserved, sent as zero
    T = 0x02  # reverse tunnelling requested (RFC 3024)
    x = 0x01  # reserved, sent as zero


class BUFlag(IntFlag):
    """Flags octet of a Binding Update (draft-ietf-mobileip-optim): the four high bits;
    the four low bits are reserved (sent as zero, rejected when set)."""

    A = 0x80  # acknowledge requested
    I = 0x40  # noqa: E741  # identification present (set by the codec iff identification is given)
    M = 0x20  # minimal encapsulation
    G = 0x10  # GRE encapsulation


class BindingStatus(IntEnum):
    """Status of a Binding Acknowledge: 0 accepted, 128-255 rejected.  128-139 mirror the
    meaning of the RFC 5944 home-agent reply codes; 160-162 are ours (VPN info / paths)."""

    ACCEPTED = 0
    REASON_UNSPECIFIED = 128
    ADMINISTRATIVELY_PROHIBITED = 129
    INSUFFICIENT_RESOURCES = 130
    AUTHENTICATION_FAILED = 131  # binding authentication extension missing or wrong
    IDENTIFICATION_MISMATCH = 133  # replay protection failed
    POORLY_FORMED_UPDATE = 134
    ENCAPSULATION_UNAVAILABLE = 139  # M/G requested but not supported
    VPN_INFO_MISSING = 160  # no VPN-info CVSE (vendor 32473, type 1) where one is required
    VPN_INFO_UNSUPPORTED = 161  # VPN info not understood (e.g. unknown ESP suite)
    PATH_SETUP_FAILED = 162  # the IPsec path could not be installed
    VPN_KEYS_REFUSED = 163  # the path's sealed keys do not open (not under our seal key, or tampered)

    @property
    def accepted(self) -> bool:
        return self.value == 0


class AdvFlag(IntFlag):
    """16-bit flags field of the Mobility Agent Advertisement extension (RFC 5944 2.1.1)."""

    R = 0x8000  # registration required
    B = 0x4000  # busy
    H = 0x2000  # home agent
    F = 0x1000  # foreign agent
    M = 0x0800  # minimal encapsulation
    G = 0x0400  # GRE encapsulation
    r = 0x0200  # reserved, sent as zero
    T = 0x0100  # reverse tunnelling (RFC 3024)
    U = 0x0080  # UDP tunnelling (RFC 3519)
    X = 0x0040  # registration revocation (RFC 3543)
    I = 0x0020  # noqa: E741  # regional registration (RFC 4857)


class ReplyCode(IntEnum):
    """Registration Reply codes (RFC 5944 section 3.4, plus RFC 3024, RFC 2794, RFC 3012)."""

    # successful
    ACCEPTED = 0
    ACCEPTED_NO_SIMULTANEOUS_BINDINGS = 1
    # denied by the foreign agent
    FA_REASON_UNSPECIFIED = 64
    FA_ADMINISTRATIVELY_PROHIBITED = 65
    FA_INSUFFICIENT_RESOURCES = 66
    FA_MN_FAILED_AUTHENTICATION = 67
    FA_HA_FAILED_AUTHENTICATION = 68
    FA_LIFETIME_TOO_LONG = 69
    FA_POORLY_FORMED_REQUEST = 70
    FA_POORLY_FORMED_REPLY = 71
    FA_ENCAPSULATION_UNAVAILABLE = 72
    FA_RESERVED_UNAVAILABLE = 73  # formerly "VJ compression unavailable"
    FA_REVERSE_TUNNEL_UNAVAILABLE = 74  # RFC 3024
    FA_REVERSE_TUNNEL_MANDATORY = 75  # RFC 3024: 'T' bit not set
    FA_MN_TOO_DISTANT = 76  # RFC 3024
    FA_INVALID_CARE_OF_ADDRESS = 77
    FA_REGISTRATION_TIMEOUT = 78
    FA_DELIVERY_STYLE_NOT_SUPPORTED = 79  # RFC 3024
    FA_HOME_NETWORK_UNREACHABLE = 80
    FA_HA_HOST_UNREACHABLE = 81
    FA_HA_PORT_UNREACHABLE = 82
    FA_HA_UNREACHABLE = 88
    FA_MISSING_NAI = 97  # RFC 2794
    FA_MISSING_HOME_AGENT = 98  # RFC 2794
    FA_MISSING_HOME_ADDRESS = 99  # RFC 2794
    FA_UNKNOWN_CHALLENGE = 104  # RFC 3012
    FA_MISSING_CHALLENGE = 105  # RFC 3012
    FA_STALE_CHALLENGE = 106  # RFC 3012
    # denied by the home agent
    HA_REASON_UNSPECIFIED = 128
    HA_ADMINISTRATIVELY_PROHIBITED = 129
    HA_INSUFFICIENT_RESOURCES = 130
    HA_MN_FAILED_AUTHENTICATION = 131
    HA_FA_FAILED_AUTHENTICATION = 132
    HA_IDENTIFICATION_MISMATCH = 133
    HA_POORLY_FORMED_REQUEST = 134
    HA_TOO_MANY_BINDINGS = 135
    HA_UNKNOWN_HA_ADDRESS = 136
    HA_REVERSE_TUNNEL_UNAVAILABLE = 137  # RFC 3024
    HA_REVERSE_TUNNEL_MANDATORY = 138  # RFC 3024
    HA_ENCAPSULATION_UNAVAILABLE = 139  # RFC 3024

    @property
    def accepted(self) -> bool:
        return self.value in (0, 1)

    @property
    def denied_by_fa(self) -> bool:
        return 64 <= self.value <= 127

    @property
    def denied_by_ha(self) -> bool:
        return 128 <= self.value <= 255
