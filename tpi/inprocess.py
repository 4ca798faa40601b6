"""A whole cluster in this process, one thread per rank: no processes, no sockets.

Owns: ``InProcessCluster``: the split (cached), every rank's model, rank 0's engine on a
``LocalHub`` and each worker's loop (``worker.serve_one``) on a thread of its own with a
``LocalSpoke`` (comm/local.py), and ``forward``, ``generate`` and ``stats`` as ``LocalCluster``
has them. The same engine, layer loop and worker loop as a real cluster, so that a test can tell
"the math is wrong" from "the transport is wrong" in seconds; each rank's thread runs `threads`
torch threads, as each rank's process would. Does not know: sockets, processes, HTTP.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from tpi.comm.base import Shutdown
from tpi.comm.local import LocalGroup
from tpi.config import ConfigError
from tpi.engine import Engine
from tpi.open_rank import open_rank_model
from tpi.options import RankOptions, from_keywords
from tpi.rank_model import RankModel
from tpi.sampling import SamplingParams
from tpi.split import Quant, split_cached
from tpi.stats import RankStats
from tpi.weights import Manifest
from tpi.worker import serve_one


class InProcessCluster:
    """`world_size` ranks of `model_dir` as threads of this process; `start`, then use, then `close`."""

    def __init__(self, model: str | os.PathLike, world_size: int = 1, ratios: Sequence[float] | str | None = None,
                 dtype: str = "float32", *, quant: str | None = None, group_size: int = 32, quant_head: bool = False,
                 cache_dir: str | os.PathLike | None = None, options: RankOptions | None = None, **keywords):
        """`model`, `quant`, `group_size`, `quant_head`, `options` and `keywords` as LocalCluster's
        (tpi/options.py KEYWORDS); the allreduce is the in-process star's, so `collective` and
        `payload` keep their defaults."""
        self.rank_opts, self.comm = from_keywords(world_size, options, None, **keywords)
        if self.comm.master_collective != "star" or self.comm.payload is not None:
            raise ConfigError(f"collective={self.comm.collective!r}, payload={self.comm.payload!r}: an in-process "
                              "cluster sums in float32 in rank order, as the star with the model's dtype does")
        self.model_dir, self.world_size, self.ratios, self.dtype = Path(model), world_size, ratios, dtype
        self.quant = Quant.of(quant, group_size, quant_head)
        self.cache_dir = cache_dir
        self.group: LocalGroup | None = None
        self.engine: Engine | None = None
        self.workers: list[RankModel] = []
        self._threads: list[threading.Thread] = []
        self._rank0: ThreadPoolExecutor | None = None

    def __enter__(self) -> InProcessCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> InProcessCluster:
        try:
            shard_dir = split_cached(self.model_dir, self.world_size, self.ratios, self.dtype, self.cache_dir,
                                     progress=False, quant=self.quant)
            manifest = Manifest.load(shard_dir)
            self.group = LocalGroup(self.world_size, self.comm.step_timeout)
            self.workers = [open_rank_model(shard_dir, manifest, r, self.rank_opts[r])
                            for r in range(1, self.world_size)]
            for rank, model in enumerate(self.workers, start=1):
                t = threading.Thread(target=self._serve, args=(model, rank), name=f"tpi-inprocess-{rank}", daemon=True)
                t.start()
                self._threads.append(t)
            self._rank0 = ThreadPoolExecutor(1, "tpi-inprocess-0", initializer=torch.set_num_threads,
                                             initargs=(self.rank_opts[0].threads,))
            self.engine = self._on_rank0(Engine, shard_dir, manifest, self.group.hub, self.rank_opts[0])
        except BaseException:
            self.close()
            raise
        return self

    def _serve(self, model: RankModel, rank: int) -> None:
        torch.set_num_threads(self.rank_opts[rank].threads)
        spoke = self.group.spokes[rank]
        while True:
            try:
                serve_one(model, spoke)
            except Shutdown:
                return

    def _on_rank0(self, fn, *args, **kw):
        return self._rank0.submit(fn, *args, **kw).result()

    def close(self) -> None:
        if self.group is not None:
            self.group.hub.close()  # SHUTDOWN to every worker thread
        for t in self._threads:
            t.join(30)
        for model in self.workers:
            model.close()
        if self.engine is not None:
            self.engine.close()
        if self._rank0 is not None:
            self._rank0.shutdown()
        self._threads, self.workers, self.engine, self._rank0 = [], [], None, None

    def forward(self, input_ids: Sequence[int]) -> torch.Tensor:
        """Prefill logits of a fresh sequence: float32 [len(input_ids), vocab]."""
        return self._on_rank0(self.engine.forward, input_ids)

    def generate(self, input_ids: Sequence[int], max_new_tokens: int = 64, *, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 stop: Sequence[str] = ()) -> list[int]:
        """New token ids (the EOS id included when generation ends on it)."""
        params = SamplingParams(temperature, top_k, top_p, seed)
        return self._on_rank0(self.engine.generate, input_ids, max_new_tokens, params, stop).ids

    def stats(self) -> list[RankStats]:
        return self._on_rank0(self.engine.stats)
