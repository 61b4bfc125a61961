"""VPN paths: the model, the one path API with its backends, and the MAVPN control section.

- ``path``: the path model (``VpnPath``, ``SecurityService``, ``Qos``, ...) and the path API
  every backend implements (``PathBackend``), with what a backend can do (``Capability``).
- ``factory``: the one place that maps a backend's name to its code (``auto`` probing, the
  process a backend needs on its node).
- ``xfrm/``: the kernel backend (manually keyed SAs and policies over NETLINK_XFRM);
  ``strongswan/``: the charon backend (IKEv2 over VICI, kernel-libipsec).
- ``qos``: per-user HTB classes with tc, shared by both backends.
- ``vpninfo``: the VPN-Info service profile (the MA protocol processing section of claim 9);
  ``mavpn``: the MAVPN control section that turns it into installed paths; ``keys``: key
  material for paths.
"""
