"""The Diameter engine (RFC 6733 base protocol, RFC 3539 transport profile) on asyncio TCP.

Everything a Diameter node does with peers and messages, and nothing of Mobile IP; the
codec (messages, AVPs, dictionary: no I/O) is :mod:`daemons.wire.diameter`.

* :mod:`.node` — :class:`~daemons.diameter.node.DiameterNode`, the facade the daemons use
  (peers, routes, handlers, hooks, ``request``), and ``wait_for_peers``;
* :mod:`.peer` — the peer table and peer state machine: dialling, CER/CEA, election, DPR/DPA;
* :mod:`.watchdog` — DWR/DWA, SUSPECT/down, failover of pending requests with the T flag;
* :mod:`.routing` — realm routing, relaying with Route-Record, answers back, the
  duplicate-answer cache, and the public forward and answer hooks (their contract);
* :mod:`.dispatch` — requests to handlers by (application, command) or to the relay;
* :mod:`.local` — the node's identity, settings, counters and one-message send/receive;
* :mod:`.connection` — one framed TCP connection and its pending requests;
* :mod:`.errors` — ``DiameterError`` (answer with a Result-Code) and the unavailability errors.
"""
