"""A UDP probe for one end of a lab path: run one per node with ``ip netns exec``.

    python -m lab.probe --peer 198.18.2.10 --port 47000 --rate 200 --out RUN_DIR/demo/probe-mn1.jsonl

It sends ``rate`` datagrams per second to ``peer:port`` (sequence number + send time) and
receives the peer's datagrams on the same port. Every datagram received is written as one
JSON line ``{"seq": N, "sent": T, "recv": T}`` (times in seconds since the epoch; all the
lab's namespaces share the host clock, so both ends and the daemons' logs are comparable).
The last line is ``{"summary": true, "sent": N, "received": M, ...}``. It stops on SIGTERM or
SIGINT, or after ``--duration`` seconds, and writes its ``--ready`` file once it is sending.
Pure standard library: it must start fast inside any namespace.
"""

from __future__ import annotations

import argparse
import json
import selectors
import signal
import socket
import struct
import time
from pathlib import Path

FORMAT = struct.Struct("!4sQd")  # magic, sequence number, send time
MAGIC = b"MVPR"
DEFAULT_PORT = 47000


def run(peer: str, port: int, rate: float, out: Path, duration: float, ready: Path | None) -> None:
    stop = False

    def on_signal(_signo: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    # A large send buffer: datagrams queued behind an unresolved neighbour (e.g. the MN's
    # stale default router right after a move) are charged to the socket until the kernel
    # gives up on them; with the default buffer every further send fails with EAGAIN for
    # seconds, which would measure the socket, not the path. (FORCE needs root; fall back.)
    try:
        sock.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_SNDBUFFORCE", 32), 8 << 20)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
    sock.bind(("0.0.0.0", port))
    sock.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    interval = 1.0 / rate
    out.parent.mkdir(parents=True, exist_ok=True)
    seq = 0
    received = 0
    send_errors = 0
    send_blocked = 0
    started = time.monotonic()
    next_send = started
    with open(out, "w", buffering=1 << 16) as f:
        if ready is not None:
            ready.write_text(str(time.time()))
        while not stop and time.monotonic() - started < duration:
            now = time.monotonic()
            if now >= next_send:
                try:
                    sock.sendto(FORMAT.pack(MAGIC, seq, time.time()), (peer, port))
                except BlockingIOError:  # send buffer full: the datagram never left
                    send_blocked += 1
                except OSError:  # e.g. no route while the MN is between agents: count, go on
                    send_errors += 1
                seq += 1
                next_send += interval
                if next_send < now - 1.0:  # we fell far behind (machine busy): do not burst
                    next_send = now + interval
                continue
            for _key, _ in sel.select(timeout=max(0.0, next_send - now)):
                while True:
                    try:
                        data = sock.recv(2048)
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:  # e.g. ICMP unreachable reported on the socket
                        continue
                    recv = time.time()
                    if len(data) < FORMAT.size or data[:4] != MAGIC:
                        continue
                    _, rseq, sent = FORMAT.unpack_from(data)
                    received += 1
                    f.write(f'{{"seq": {rseq}, "sent": {sent:.6f}, "recv": {recv:.6f}}}\n')
                    if received == 1:
                        f.flush()  # the first arrival shows at once: the path is up end to end
        f.write(json.dumps({"summary": True, "sent": seq, "received": received, "send_errors": send_errors,
                            "send_blocked": send_blocked,
                            "rate": rate, "peer": peer, "port": port}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--peer", required=True)
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--rate", type=float, default=200.0, help="datagrams per second")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--duration", type=float, default=600.0, help="safety stop, seconds")
    parser.add_argument("--ready", type=Path, default=None)
    args = parser.parse_args()
    run(args.peer, args.port, args.rate, args.out, args.duration, args.ready)


if __name__ == "__main__":
    main()
