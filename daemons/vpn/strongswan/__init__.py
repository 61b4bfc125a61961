"""The strongswan path backend: one charon per node, driven over VICI, ESP in user space
(kernel-libipsec, ESP-in-UDP over the TUN device ``ipsec0``).

- ``backend``: ``StrongswanBackend``, the path API (one IKE_SA per path, its PSK the
  path's), composing the modules below.
- ``charon``: charon's configuration and launch command, the VICI session, our connection names.
- ``routes``: routing cleartext into ``ipsec0`` (kernel-libipsec does not steer by policy).
- ``addresses``: the addresses and ip rules an FA must own for kernel-libipsec.
- ``traps``: on-traffic paths (claim 5): charon's traps and the acquires kernel-libipsec does not
  raise, and the nftables trap for paths an established one shadows.
"""
