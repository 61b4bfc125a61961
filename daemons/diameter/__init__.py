"""Diameter engine (RFC 6733): peer connections, watchdog, routing and relay. Codec: daemons.wire.diameter."""
