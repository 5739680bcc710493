"""Which partitions this worker owns, and a fence so sinks never write for a partition it lost.

Every assignment of a partition gets a new generation number. A batch is stamped with the generations
of its partitions when it closes (`stamp`); the checkpoint writes a batch's records only inside
`hold(stamp)`, and only those of partitions whose generation is still current. `revoke` takes the same
lock, so once it returns no write for those partitions is in progress or can start: a batch that was
still in flight when its partitions were revoked or lost (drain timed out) can neither overwrite a newer
version written by the partition's next owner nor revive a note it deleted, even if the partition comes
back to this worker later (a new generation). A write holds the lock for one flush attempt (bounded by
the store's timeout), never across retries.
"""
from __future__ import annotations

import itertools
import threading
from contextlib import contextmanager
from typing import Iterable, Iterator


class Ownership:
    def __init__(self) -> None:
        self._state = threading.Lock()  # guards the generations; never held across I/O
        self._fence = threading.Lock()  # held by one write attempt; `revoke` takes it
        self._gen: dict[int, int] = {}
        self._next = itertools.count(1)

    def assign(self, partitions: Iterable[int]) -> None:
        with self._state:
            for p in partitions:
                self._gen[p] = next(self._next)

    def revoke(self, partitions: Iterable[int]) -> None:
        """Blocks until a write in progress ends; afterwards nothing is written for `partitions`."""
        with self._fence, self._state:
            for p in partitions:
                self._gen.pop(p, None)

    def owned(self) -> set[int]:
        """Never waits for a write (the polling thread calls it on every turn)."""
        with self._state:
            return set(self._gen)

    def stamp(self, partitions: Iterable[int]) -> dict[int, int]:
        """The current generation of each of `partitions` (-1: not owned now)."""
        with self._state:
            return {p: self._gen.get(p, -1) for p in partitions}

    @contextmanager
    def hold(self, stamp: dict[int, int]) -> Iterator[set[int]]:
        """The partitions of `stamp` still owned by the same assignment; revocation waits until exit."""
        with self._fence:
            with self._state:
                owned = {p for p, g in stamp.items() if g >= 0 and self._gen.get(p) == g}
            yield owned
