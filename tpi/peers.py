"""The ranks that share one machine meeting through files in a folder they all see.

Owns: ``Peers``, a numbered barrier (``meet``) and an exchange of small JSON lists (``share``)
among the ranks of one machine (LocalCluster's), which use them at start so that each measures
the CPU/GPU split with the machine loaded as it is when all of them serve, and so that they agree
on what they measured. Does not know: the model, the split, the network (ranks on other machines
never meet here).
"""

from __future__ import annotations

import json
import os
import sys
import time

POLL_S = 0.002  # seconds between looks at the folder while waiting


class Peers:
    """Rank `rank` of the `n` ranks that meet in `folder` (None: a rank with no peers here, alone
    from the start: ``meet`` returns at once, ``share`` gives its own values). Every rank must call
    ``meet`` and ``share`` in the same order (the k-th call of each meets the k-th of the others).
    A rank whose peers do not all arrive within `timeout` seconds says so on stderr and goes on
    alone from then on: a peer that failed to start must not hold the others."""

    def __init__(self, folder: str | os.PathLike | None, rank: int, n: int = 1, timeout: float = 0.0):
        if folder is not None and (n < 1 or not 0 <= rank < n):
            raise ValueError(f"rank {rank} of {n} peers: expected 0 <= rank < n")
        self.folder, self.rank, self.n, self.timeout = folder and os.fspath(folder), rank, n, timeout
        self.alone = folder is None or n == 1
        self._count = 0

    def _path(self, name: str, rank: int) -> str:
        return os.path.join(self.folder, f"{name}.rank{rank}")

    def meet(self, what: str = "measuring") -> bool:
        """Wait until every peer has reached its own call of the same number; False (and alone
        from now on) if they did not within the timeout. `what` names the wait in that message."""
        if self.alone:
            return False
        self._count += 1
        name = f"meet{self._count}"
        open(self._path(name, self.rank), "w").close()
        deadline = time.monotonic() + self.timeout
        while any(not os.path.exists(self._path(name, r)) for r in range(self.n)):
            if time.monotonic() > deadline:
                print(f"rank {self.rank}: {what} alone: the other ranks of this machine were not ready within "
                      f"{self.timeout:.0f}s", file=sys.stderr, flush=True)
                self.alone = True
                return False
            time.sleep(POLL_S)
        return True

    def share(self, values: list[float]) -> list[list[float]]:
        """Every rank's `values` (this rank's first), once all have given theirs; alone: this
        rank's only. A peer's list that is not a list of len(values) numbers is left out."""
        if self.alone:
            return [values]
        name = f"share{self._count + 1}"
        with open(self._path(name, self.rank) + ".tmp", "w") as f:
            json.dump(values, f)
        os.replace(self._path(name, self.rank) + ".tmp", self._path(name, self.rank) + ".json")
        if not self.meet("sharing"):
            return [values]
        out = [values]
        for r in range(self.n):
            if r == self.rank:
                continue
            try:
                with open(self._path(name, r) + ".json") as f:
                    theirs = json.load(f)
            except (OSError, ValueError):
                continue
            if (isinstance(theirs, list) and len(theirs) == len(values)
                    and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in theirs)):
                out.append([float(v) for v in theirs])
        return out
