"""Diameter code points: header flags, applications, vendors, Result-Codes, AVP enums.

Sources: RFC 6733 (base), RFC 4004 (Mobile IPv4 application), RFC 7155 (Origin-AAA-Protocol),
RFC 4006 (5030 DIAMETER_USER_UNKNOWN). Our own vendor AVPs are under VENDOR_MIPVPN
(32473, the documentation enterprise number of RFC 5612); see docs/protocol.md.
"""

from __future__ import annotations

import enum

DIAMETER_PORT = 3868  # Diameter over TCP (IANA "diameter")
DIAMETER_TLS_PORT = 5658  # Diameter over TLS from the first byte (IANA "diameters", RFC 6733 §2.1)
VERSION = 1
HEADER_LENGTH = 20

# Message header flags (RFC 6733 §3)
FLAG_REQUEST = 0x80
FLAG_PROXIABLE = 0x40
FLAG_ERROR = 0x20
FLAG_RETRANSMIT = 0x10

# AVP flags (RFC 6733 §4.1)
AVP_FLAG_VENDOR = 0x80
AVP_FLAG_MANDATORY = 0x40
AVP_FLAG_PROTECTED = 0x20

VENDOR_IETF = 0
VENDOR_MIPVPN = 32473  # RFC 5612 documentation enterprise number

APP_COMMON = 0  # Diameter common messages (CER/DWR/DPR)
APP_MOBILE_IPV4 = 2  # RFC 4004
APP_RELAY = 0xFFFFFFFF

# Command codes (RFC 6733 §3.1; RFC 4004 §5 for AMR/AMA and HAR/HAA)
CMD_CAPABILITIES_EXCHANGE = 257  # CER/CEA
CMD_RE_AUTH = 258  # RAR/RAA
CMD_AA_MOBILE_NODE = 260  # AMR/AMA (RFC 4004)
CMD_HOME_AGENT_MIP = 262  # HAR/HAA (RFC 4004)
CMD_ABORT_SESSION = 274  # ASR/ASA
CMD_SESSION_TERMINATION = 275  # STR/STA
CMD_DEVICE_WATCHDOG = 280  # DWR/DWA
CMD_DISCONNECT_PEER = 282  # DPR/DPA


class ResultCode(enum.IntEnum):
    """Result-Code AVP values (RFC 6733 §7.1, RFC 4004 §6, RFC 4006)."""

    DIAMETER_MULTI_ROUND_AUTH = 1001
    DIAMETER_SUCCESS = 2001
    DIAMETER_LIMITED_SUCCESS = 2002
    # protocol errors: answer has the E bit set
    DIAMETER_COMMAND_UNSUPPORTED = 3001
    DIAMETER_UNABLE_TO_DELIVER = 3002
    DIAMETER_REALM_NOT_SERVED = 3003
    DIAMETER_TOO_BUSY = 3004
    DIAMETER_LOOP_DETECTED = 3005
    DIAMETER_REDIRECT_INDICATION = 3006
    DIAMETER_APPLICATION_UNSUPPORTED = 3007
    DIAMETER_INVALID_HDR_BITS = 3008
    DIAMETER_INVALID_AVP_BITS = 3009
    DIAMETER_UNKNOWN_PEER = 3010
    # transient failures
    DIAMETER_AUTHENTICATION_REJECTED = 4001
    DIAMETER_OUT_OF_SPACE = 4002
    DIAMETER_ELECTION_LOST = 4003
    DIAMETER_ERROR_MIP_REPLY_FAILURE = 4005  # RFC 4004
    DIAMETER_ERROR_HA_NOT_AVAILABLE = 4006  # RFC 4004
    DIAMETER_ERROR_BAD_KEY = 4007  # RFC 4004
    DIAMETER_ERROR_MIP_FILTER_NOT_SUPPORTED = 4008  # RFC 4004
    # permanent failures
    DIAMETER_AVP_UNSUPPORTED = 5001
    DIAMETER_UNKNOWN_SESSION_ID = 5002
    DIAMETER_AUTHORIZATION_REJECTED = 5003
    DIAMETER_INVALID_AVP_VALUE = 5004
    DIAMETER_MISSING_AVP = 5005
    DIAMETER_RESOURCES_EXCEEDED = 5006
    DIAMETER_CONTRADICTING_AVPS = 5007
    DIAMETER_AVP_NOT_ALLOWED = 5008
    DIAMETER_AVP_OCCURS_TOO_MANY_TIMES = 5009
    DIAMETER_NO_COMMON_APPLICATION = 5010
    DIAMETER_UNSUPPORTED_VERSION = 5011
    DIAMETER_UNABLE_TO_COMPLY = 5012
    DIAMETER_INVALID_BIT_IN_HEADER = 5013
    DIAMETER_INVALID_AVP_LENGTH = 5014
    DIAMETER_INVALID_MESSAGE_LENGTH = 5015
    DIAMETER_INVALID_AVP_BIT_COMBO = 5016
    DIAMETER_NO_COMMON_SECURITY = 5017
    DIAMETER_ERROR_NO_FOREIGN_HA_SERVICE = 5024  # RFC 4004
    DIAMETER_ERROR_END_TO_END_MIP_KEY_ENCRYPTION = 5025  # RFC 4004
    DIAMETER_USER_UNKNOWN = 5030  # RFC 4006

    @property
    def is_success(self) -> bool:
        return 2000 <= self < 3000

    @property
    def is_protocol_error(self) -> bool:
        return 3000 <= self < 4000


def is_protocol_error(code: int) -> bool:
    """3xxx codes: the answer carries the E bit (RFC 6733 §7.1.3)."""
    return 3000 <= code < 4000


class DisconnectCause(enum.IntEnum):
    REBOOTING = 0
    BUSY = 1
    DO_NOT_WANT_TO_TALK_TO_YOU = 2


class AuthRequestType(enum.IntEnum):
    AUTHENTICATE_ONLY = 1
    AUTHORIZE_ONLY = 2
    AUTHORIZE_AUTHENTICATE = 3


class AuthSessionState(enum.IntEnum):
    STATE_MAINTAINED = 0
    NO_STATE_MAINTAINED = 1


class ReAuthRequestType(enum.IntEnum):
    AUTHORIZE_ONLY = 0
    AUTHORIZE_AUTHENTICATE = 1


class TerminationCause(enum.IntEnum):
    DIAMETER_LOGOUT = 1
    DIAMETER_SERVICE_NOT_PROVIDED = 2
    DIAMETER_BAD_ANSWER = 3
    DIAMETER_ADMINISTRATIVE = 4
    DIAMETER_LINK_BROKEN = 5
    DIAMETER_AUTH_EXPIRED = 6
    DIAMETER_USER_MOVED = 7
    DIAMETER_SESSION_TIMEOUT = 8


class RedirectHostUsage(enum.IntEnum):
    DONT_CACHE = 0
    ALL_SESSION = 1
    ALL_REALM = 2
    REALM_AND_APPLICATION = 3
    ALL_APPLICATION = 4
    ALL_HOST = 5
    ALL_USER = 6


class SessionServerFailover(enum.IntEnum):
    REFUSE_SERVICE = 0
    TRY_AGAIN = 1
    ALLOW_SERVICE = 2
    TRY_AGAIN_ALLOW_SERVICE = 3


class InbandSecurityId(enum.IntEnum):
    NO_INBAND_SECURITY = 0
    TLS = 1


class OriginAAAProtocol(enum.IntEnum):
    RADIUS = 1


class MipFeatureVector(enum.IntFlag):
    """MIP-Feature-Vector bits (RFC 4004 §7.5)."""

    MOBILE_NODE_HOME_ADDRESS_REQUESTED = 1
    HOME_ADDRESS_ALLOCATABLE_ONLY_IN_HOME_REALM = 2
    HOME_AGENT_REQUESTED = 4
    FOREIGN_HOME_AGENT_AVAILABLE = 8
    MN_HA_KEY_REQUEST = 16
    MN_FA_KEY_REQUEST = 32
    FA_HA_KEY_REQUEST = 64
    HOME_AGENT_IN_FOREIGN_NETWORK = 128
    CO_LOCATED_MOBILE_NODE = 256


class MipAlgorithmType(enum.IntEnum):
    HMAC_SHA_1 = 2


class MipReplayMode(enum.IntEnum):
    NONE = 1
    TIMESTAMPS = 2
    NONCES = 3


class VpnEndpointType(enum.IntEnum):
    """VPN-Endpoint-Local-Type / VPN-Endpoint-Remote-Type (vendor 32473)."""

    FA = 1
    HA = 2
    CNGW_STATIC = 3
    CNGW_DYNAMIC = 4


class VpnDistribution(enum.IntEnum):
    """VPN-Distribution (vendor 32473): when the path is set up."""

    AT_REGISTRATION = 0
    ON_TRAFFIC = 1
