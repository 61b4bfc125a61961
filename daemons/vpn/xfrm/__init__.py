"""The xfrm path backend: ESP SAs and policies written into the kernel over NETLINK_XFRM.

- ``backend``: ``XfrmBackend``, the path API on the kernel (keys and SPIs from the AAAH, on-traffic
  paths by the kernel's ACQUIRE, QoS on the outer ESP header).
- ``netlink``: the I/O: ``XfrmSocket`` (requests), ``XfrmMonitor`` (ACQUIRE/EXPIRE events) and
  ``probe_kernel_esp`` (can this kernel carry ESP?).  The messages themselves are pure code in
  :mod:`daemons.wire.xfrm`.
"""
