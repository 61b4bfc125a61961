"""Per-key locks: serialise per key, run keys in parallel, and forget keys nobody uses."""

from __future__ import annotations

import asyncio

from daemons.runtime.tasks import KeyedLocks


def test_serialised_per_key_and_forgotten_after() -> None:
    async def main() -> None:
        locks = KeyedLocks()
        order: list[str] = []

        async def work(key: str, tag: str, pause: float) -> None:
            async with locks.hold(key):
                order.append(f"{tag}+")
                await asyncio.sleep(pause)
                order.append(f"{tag}-")

        await asyncio.gather(work("a", "a1", 0.02), work("a", "a2", 0), work("b", "b1", 0))
        # a2 waited for a1; b1 did not wait for anyone.
        assert order.index("a1-") < order.index("a2+")
        assert order.index("b1-") < order.index("a1-")
        assert len(locks) == 0
        for i in range(1000):  # made-up keys leave nothing behind
            async with locks.hold(f"bogus{i}@nowhere"):
                pass
        assert len(locks) == 0
        try:
            async with locks.hold("a"):
                raise RuntimeError("boom")
        except RuntimeError:
            pass
        assert len(locks) == 0

    asyncio.run(main())
