"""``LocalCluster``: every rank, the master included, as its own process on 127.0.0.1.

Owns: splitting into the cache, spawning the master and the workers (spawned, not forked), the
ports they bind (chosen by the OS), driving the master over its control channel, and tearing it
all down on exit, also when the body raises, so no child outlives the cluster. Does not know:
the model math or the wire protocol between ranks.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import msgpack
import numpy as np
import torch
import zmq

from tpi.comm.security import Curve, KeyPair
from tpi.errors import TpiError
from tpi.master import MasterOptions, master_process, report_errors
from tpi.options import CommOptions, RankOptions, from_keywords
from tpi.split import Quant, split_cached
from tpi.stats import Health, RankStats
from tpi.worker import WorkerOptions, worker_process


class ClusterError(TpiError, RuntimeError):
    """The cluster failed a request or could not start; the message says which rank and why."""


def _worker_entry(opts: WorkerOptions, ports, published, error_path: str) -> None:
    """Spawned worker: wait for the master to publish its port (unless opts.master is known), then serve."""
    with report_errors(error_path):
        if published is not None:
            if not published.wait(opts.comm.join_timeout):
                raise SystemExit(f"rank {opts.rank}: the master never published its port")
            opts = dataclasses.replace(opts, master=f"tcp://127.0.0.1:{ports[0]}")
        worker_process(opts)


class RankProcesses:
    """Spawned rank processes (not forked: torch may already run threads) and a folder with the
    files where each reports a fatal error (LocalCluster's ranks also meet there before measuring
    the CPU/GPU split, forward.MemoryOptions.measure_peers); `stop` ends them all, politely first."""

    def __init__(self) -> None:
        self.ctx = mp.get_context("spawn")
        self.procs: dict[int, mp.Process] = {}
        self.err_dir = tempfile.mkdtemp(prefix="tpi-ranks-")

    def err_path(self, rank: int) -> str:
        return os.path.join(self.err_dir, f"rank{rank}.err")

    def spawn(self, rank: int, target, *args) -> None:
        p = self.ctx.Process(target=target, args=(*args, self.err_path(rank)), daemon=True, name=f"tpi-rank{rank}")
        p.start()
        self.procs[rank] = p

    def spawn_worker(self, opts: WorkerOptions, ports=None, published=None) -> None:
        """A worker connecting to opts.master, or to the port the master publishes in `ports`."""
        self.spawn(opts.rank, _worker_entry, opts, ports, published)

    def end(self, rank: int) -> None:
        """Kill rank `rank`'s process if it still runs, and forget it and its error file."""
        p = self.procs.pop(rank, None)
        if p is not None and p.is_alive():
            p.kill()
        if p is not None:
            p.join(10)
        if os.path.exists(self.err_path(rank)):
            os.remove(self.err_path(rank))

    def check(self, ranks=None) -> None:
        """Raise ClusterError naming the first of `ranks` (default all) that has exited, and why."""
        for rank in list(self.procs) if ranks is None else ranks:
            p = self.procs[rank]
            if p.exitcode is not None:
                path = self.err_path(rank)
                why = open(path).read() if os.path.exists(path) else "no error was reported"
                raise ClusterError(f"rank {rank} (pid {p.pid}) exited with code {p.exitcode}: {why}")

    def stop(self, grace: float = 5.0) -> None:
        deadline = time.monotonic() + grace
        for p in self.procs.values():
            p.join(max(0.0, deadline - time.monotonic()))
        for p in self.procs.values():
            if p.is_alive():
                p.terminate()
                p.join(2)
            if p.is_alive():
                p.kill()
                p.join(2)
        self.procs.clear()
        shutil.rmtree(self.err_dir, ignore_errors=True)


class LocalCluster:
    """Every rank of a cluster as its own process on this machine; the caller drives the master."""

    def __init__(self, model: str | os.PathLike, world_size: int = 1, ratios: Sequence[float] | str | None = None,
                 dtype: str = "float32", *, quant: str | None = None, group_size: int = 32, quant_head: bool = False,
                 cache_dir: str | os.PathLike | None = None, progress: bool = False,
                 worker_cache_dir: str | os.PathLike | None = None, curve: bool = False,
                 options: RankOptions | None = None, comm: CommOptions | None = None, **keywords):
        """`model`: a Hugging Face folder or a .gguf file. `quant`: the weights' format: None keeps the
        checkpoint's (a folder's floats, a GGUF file's types), "float" dequantizes to `dtype`, "int8"
        or "int4" quantize a float checkpoint's projections in groups of `group_size` input columns
        (the embedding and LM head too with `quant_head`); `compute` ("exact" or "fast", the default)
        is how quantized weights are multiplied. `options` and `comm`: every rank's options
        (tpi/options.py); `keywords` set single fields of them (options.KEYWORDS): threads,
        max_context, compute, memory_budget (one for every rank, or a list
        with one per rank), window, drop_page_cache, stream_all, verify_shards, device,
        gpu_memory_budget, offload_mode, offload_share, offload_tune, offload_prefetch, collective
        (star, ring, tree, gloo or auto), payload (float32, float16, bfloat16, q8 or q8_64; None: the
        model's dtype), step_timeout, start_timeout (how long ranks wait for each other to start),
        lost_timeout (a rank silent this long is declared lost). `worker_cache_dir`: workers read no
        split folder but fetch their shards from the master into <worker_cache_dir>/rank<R> (kept
        there for the next start), as on separate machines. `curve`: encrypt and authenticate the
        links between ranks with fresh CURVE keys."""
        self.rank_opts, self.comm = from_keywords(world_size, options, comm, **keywords)
        if curve and self.comm.master_collective != "star":
            raise ClusterError(f"collective {self.comm.collective!r} runs over links without CURVE: use the star "
                               "with curve")
        self.worker_cache_dir = worker_cache_dir
        self._keys = [KeyPair.generate() for _ in range(world_size)] if curve else None
        self.model_dir, self.world_size, self.ratios, self.dtype = Path(model), world_size, ratios, dtype
        self.quant = Quant.of(quant, group_size, quant_head)
        self.cache_dir, self.progress = cache_dir, progress
        self.shard_dir: Path | None = None
        self.ranks: RankProcesses | None = None
        self._ctx: zmq.Context | None = None
        self._sock: zmq.Socket | None = None
        self.master_address: str | None = None
        self._rid = 0

    @property
    def start_timeout(self) -> float:
        return self.comm.join_timeout

    # -- lifecycle ---------------------------------------------------------------------------------
    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> None:
        self.shard_dir = split_cached(self.model_dir, self.world_size, self.ratios, self.dtype,
                                      self.cache_dir, self.progress, self.quant)
        self.ranks = RankProcesses()
        if self.world_size > 1:  # ranks that measure the CPU/GPU offload do it together: they share this host
            self.rank_opts = [dataclasses.replace(o, peers=(self.ranks.err_dir, self.world_size))
                              for o in self.rank_opts]
        self._spawn_master("tcp://127.0.0.1:0")
        for rank in range(1, self.world_size):  # they start while the master loads: they wait for its port
            self.ranks.spawn_worker(self._worker_options(rank, ""), self._ports, self._published)
        self._connect(watch_all=True)

    def _comm(self, rank: int) -> CommOptions:
        """Rank `rank`'s communication options: with `curve`, its own keys and its peers' public keys."""
        if self._keys is None:
            return self.comm
        if rank == 0:
            curve = Curve(self._keys[0], allowed=tuple(k.public for k in self._keys[1:]))
        else:
            curve = Curve(self._keys[rank], master_public=self._keys[0].public)
        return dataclasses.replace(self.comm, curve=curve)

    def _worker_options(self, rank: int, master: str) -> WorkerOptions:
        fetch_dir = None if self.worker_cache_dir is None else os.path.join(self.worker_cache_dir, f"rank{rank}")
        return WorkerOptions(master, rank, None if fetch_dir else str(self.shard_dir), self.rank_opts[rank],
                             self._comm(rank), parent_pid=os.getpid(), cache_dir=fetch_dir)

    def _spawn_master(self, bind: str) -> None:
        self._ports, self._published = self.ranks.ctx.Array("i", 2), self.ranks.ctx.Event()
        mopts = MasterOptions(str(self.shard_dir), bind, self.rank_opts[0], self._comm(0), parent_pid=os.getpid())
        self.ranks.spawn(0, master_process, mopts, self._ports, self._published)

    def _connect(self, watch_all: bool) -> None:
        """Wait for the master to publish its ports, connect the control channel, wait until ready."""
        deadline = time.monotonic() + self.start_timeout
        while not self._published.wait(0.2):
            self.ranks.check()
            if time.monotonic() > deadline:
                raise ClusterError(f"the master did not start within {self.start_timeout:.0f}s")
        self.master_address = f"tcp://127.0.0.1:{self._ports[0]}" if self.world_size > 1 else None
        if self._sock is not None:
            self._sock.close(0)
            self._ctx.term()
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(f"tcp://127.0.0.1:{self._ports[1]}")
        self._request({"op": "ready"}, timeout=self.start_timeout, watch_all=watch_all)

    # -- faults --------------------------------------------------------------------------------------
    def health(self) -> Health:
        """As the master sees it: the worker ranks not connected now and why, the connected ones' pids."""
        event, _ = self._request({"op": "health"})
        return Health.from_dict(event)

    def restart_worker(self, rank: int, timeout: float | None = None) -> None:
        """Kill worker `rank` if it still runs, start a new process for it, and wait until it has
        rejoined the running master (the master and the other workers are not restarted)."""
        if not 1 <= rank < self.world_size:
            raise ClusterError(f"rank {rank} is not a worker rank of this cluster (1..{self.world_size - 1})")
        self.ranks.end(rank)
        self.ranks.spawn_worker(self._worker_options(rank, self.master_address))
        pid = self.ranks.procs[rank].pid
        deadline = time.monotonic() + (timeout or self.start_timeout)
        while self.health().pids.get(rank) != pid:
            self.ranks.check([rank])
            if time.monotonic() > deadline:
                raise ClusterError(f"rank {rank} did not rejoin within {timeout or self.start_timeout:.0f}s")
            time.sleep(0.1)  # the master answers `health` at once; this paces the asking

    def restart_master(self) -> None:
        """Kill the master if it still runs and start a new one on the same worker port; the
        workers, which keep trying to reconnect, rejoin it without being restarted."""
        port = self._ports[0]
        self.ranks.end(0)
        self._spawn_master(f"tcp://127.0.0.1:{port}")
        self._connect(watch_all=False)

    def close(self) -> None:
        """Stop every rank: ask the master to shut down, then terminate or kill what remains."""
        master = self.ranks.procs.get(0) if self.ranks else None
        if self._sock is not None and master is not None and master.is_alive():
            try:
                self._sock.send(msgpack.packb({"op": "shutdown"}))
                self._sock.poll(2000)
            except zmq.ZMQError:
                pass
        if self.ranks is not None:
            self.ranks.stop()
            self.ranks = None
        if self._sock is not None:
            self._sock.close(0)
            self._ctx.term()
            self._sock = self._ctx = None

    @property
    def pids(self) -> dict[int, int]:
        """Rank -> process id, master included."""
        return {r: p.pid for r, p in self.ranks.procs.items()} if self.ranks else {}

    @property
    def worker_pids(self) -> dict[int, int]:
        return {r: pid for r, pid in self.pids.items() if r != 0}

    # -- requests ----------------------------------------------------------------------------------
    def _events(self, req: dict, timeout: float | None = None, watch_all: bool = False
                ) -> Iterator[tuple[dict, list]]:
        """Send a request; yield its reply events. Watches the master (every rank during start-up)."""
        if self._sock is None:
            raise ClusterError("the cluster is not running: use it inside `with LocalCluster(...)` or call start()")
        self._rid += 1
        self._sock.send(msgpack.packb({**req, "rid": self._rid}))
        limit = timeout or self.comm.step_timeout * 2 + 30
        while True:
            deadline = time.monotonic() + limit
            while not self._sock.poll(200):
                self.ranks.check(None if watch_all else [0])
                if time.monotonic() > deadline:
                    raise ClusterError(f"no answer from the master within {limit:.0f}s")
            frames = self._sock.recv_multipart()
            event = msgpack.unpackb(frames[0], raw=False)
            if event.get("rid") != self._rid:
                continue  # the late answer to a request we gave up on
            if event.get("event") == "error":
                raise ClusterError(f"{event.get('type')}: {event.get('message')}")
            yield event, frames[1:]
            if event.get("event") not in ("token",):
                return

    def _request(self, req: dict, timeout: float | None = None, watch_all: bool = False) -> tuple[dict, list]:
        return next(iter(self._events(req, timeout, watch_all)))

    def stats(self) -> list[RankStats]:
        """One record per rank, master first: peak_rss_bytes (VmHWM), bytes_read, stall_s, compute_s,
        allreduce_s since start, the residency (pinned and streamed blocks, window), the offload."""
        return [RankStats.from_wire(r) for r in self._request({"op": "stats"})[0]["ranks"]]

    def forward(self, input_ids: Sequence[int]) -> torch.Tensor:
        """Prefill logits of a fresh sequence: float32 [len(input_ids), vocab]."""
        event, frames = self._request({"op": "forward", "ids": [int(i) for i in input_ids]})
        return torch.from_numpy(np.frombuffer(frames[0], dtype=np.float32).copy()).view(*event["shape"])

    def generate(self, input_ids: Sequence[int], max_new_tokens: int = 64, *, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 stop: Sequence[str] = ()) -> list[int]:
        """New token ids (the EOS id included when generation ends on it)."""
        return self.generate_full(input_ids, max_new_tokens, temperature=temperature, top_k=top_k,
                                  top_p=top_p, seed=seed, stop=stop)["ids"]

    def generate_full(self, input_ids: Sequence[int] | None = None, max_new_tokens: int = 64, **kw) -> dict:
        """Like generate, but returns the master's whole record: ids, text, finish_reason, timings."""
        *_, (event, _) = self.stream(input_ids, max_new_tokens, _stream=False, **kw)
        return event

    def stream(self, input_ids: Sequence[int] | None = None, max_new_tokens: int = 64, *,
               prompt: str | None = None, messages: list[dict[str, str]] | None = None,
               temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
               seed: int | None = None, stop: Sequence[str] = (), ignore_eos: bool = False, _stream: bool = True
               ) -> Iterator[tuple[dict, list]]:
        """Events as they come: {"event": "token", "ids", "text"} ..., then {"event": "done", ...}."""
        req = {"op": "generate", "max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k,
               "top_p": top_p, "seed": seed, "stop": list(stop), "stream": _stream, "ignore_eos": ignore_eos}
        if input_ids is not None:
            req["ids"] = [int(i) for i in input_ids]
        elif messages is not None:
            req["messages"] = messages
        else:
            req["prompt"] = prompt
        yield from self._events(req)
