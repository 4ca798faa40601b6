"""A worker rank: join the master, then run steps until told to stop.

Owns: the worker's loop (receive a step, run every layer with its two allreduces, repeat; free or
cancel sequences on request) and its process entry point. Does not know: tokenizers, text,
sampling, HTTP. It imports no transformers code, to keep small devices' memory for weights.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

import torch

from tpi.comm import collectives
from tpi.comm.base import CommError, MasterLost, Shutdown, StepAborted, WorkerChannel
from tpi.comm.spoke import Spoke
from tpi.comm.wire import Kind
from tpi.fetch import fetch_shards
from tpi.forward import run_layers
from tpi.kv_cache import CacheError
from tpi.open_rank import compute_mode, open_rank_model
from tpi.options import CommOptions, RankOptions
from tpi.rank_model import RankModel
from tpi.weights import Manifest, cache_root

log = logging.getLogger("tpi.worker")


@dataclass(frozen=True)
class WorkerOptions:
    master: str  # tcp://host:port
    rank: int
    shard_dir: str | None  # a split folder; None: fetch this rank's files from the master into cache_dir
    rank_opts: RankOptions = field(default_factory=RankOptions)
    comm: CommOptions = field(default_factory=CommOptions)
    parent_pid: int | None = None  # exit when this process is gone (LocalCluster children)
    cache_dir: str | None = None  # where fetched shards are kept (default: <tpi cache>/fetched/rank<R>)
    progress: bool = False  # a progress bar while fetching
    rejoin_timeout: float | None = None  # after losing the master, try to rejoin this long (None: forever)
    collective_host: str | None = None  # where peers reach this worker's link (default: its route to the master)


def serve(opts: WorkerOptions) -> None:
    """Load this rank's shard, join the master and serve steps until SHUTDOWN or a lost master."""
    comm_opts, rank_opts = opts.comm, opts.rank_opts
    torch.set_num_threads(rank_opts.threads)
    shard_dir, fetched = opts.shard_dir, None
    if shard_dir is None:
        fetched = fetch_shards(opts.master, opts.rank, opts.cache_dir or cache_root() / "fetched" / f"rank{opts.rank}",
                               comm_opts.join_timeout, comm_opts.step_timeout, opts.progress, comm_opts.curve)
        shard_dir = str(fetched.shard_dir)
    manifest = Manifest.load(shard_dir)
    if not 1 <= opts.rank < manifest.plan.world_size:
        raise CommError(f"rank {opts.rank} is not a worker rank of this split (1..{manifest.plan.world_size - 1})")
    if fetched is not None:  # fetch_shards has just checked every file's sha256: check the sizes, not the hashes
        rank_opts = dataclasses.replace(rank_opts, memory=dataclasses.replace(rank_opts.memory, verify_shards=False))
    model = open_rank_model(shard_dir, manifest, opts.rank, rank_opts)
    if fetched is not None:
        model.fetched_bytes = fetched.fetched_bytes
    cfg = manifest.config
    links = None if comm_opts.curve is not None else collectives.worker_links(
        opts.rank, manifest.plan.world_size, opts.master, comm_opts.collective, opts.collective_host,
        comm_opts.step_timeout, cfg.hidden_size)
    comm = Spoke(opts.master, opts.rank, manifest.plan.world_size, manifest.digest, cfg.hidden_size,
                 manifest.dtype, cfg.num_layers, comm_opts, links=links,
                 compute=compute_mode(manifest, rank_opts), prefill_chunk=rank_opts.prefill_chunk)
    stop = _watch_parent(opts.parent_pid)
    leaving = "stopped"
    try:
        comm.join(comm_opts.join_timeout)
        log.info("rank %d joined %s", opts.rank, opts.master)
        while not stop.is_set():
            try:
                serve_one(model, comm)
            except Shutdown:
                leaving = ""
                return
            except MasterLost as e:  # the master died or hung: forget its sequences, wait for it to return
                log.warning("%s; trying to rejoin", e)
                model.reset()
                comm.join(opts.rejoin_timeout)
                log.warning("rank %d rejoined %s", opts.rank, opts.master)
    except BaseException as e:  # SIGTERM (SystemExit), Ctrl-C, a fatal error: say so before leaving
        leaving = f"{type(e).__name__}: {e}" if not isinstance(e, SystemExit) else "stopped (SIGTERM)"
        raise
    finally:
        if leaving:
            comm.send_bye(leaving)
        comm.close()
        model.close()


def serve_one(model: RankModel, comm: WorkerChannel) -> None:
    """The worker's loop body: the next control message (within a second), handled: a step run
    through every layer, a sequence freed, statistics sent."""
    try:
        msg = comm.receive(timeout=1.0)
    except (Shutdown, MasterLost):
        raise
    except CommError:
        return  # idle: nothing to do, check the parent and wait again
    if msg.kind == Kind.STEP:
        _step(model, comm, msg)
    elif msg.kind in (Kind.FREE, Kind.CANCEL):
        model.cache.free(msg.seq)
    elif msg.kind == Kind.STATS:
        comm.send_stats(model.stats(comm.timing.seconds, comm.timing.calls))


def _step(model: RankModel, comm: WorkerChannel, msg) -> None:
    t0 = time.perf_counter()
    try:
        with torch.inference_mode():
            run_layers(model, comm, msg.tensor, msg.seq, msg.step, msg.start)
    except (StepAborted, CacheError) as e:
        if isinstance(e, CacheError):
            comm.send_error(str(e))
        model.cache.free(msg.seq)
        model.sched.reset()  # the step stopped half-way through the cycle of blocks
    finally:
        model.busy_s += time.perf_counter() - t0
        model.steps += 1


def _watch_parent(parent_pid: int | None) -> threading.Event:
    """An event set when `parent_pid` exits, so that a killed owner leaves no orphan workers."""
    stop = threading.Event()
    if parent_pid is None:
        return stop

    def watch() -> None:
        while not stop.wait(0.5):
            if os.getppid() != parent_pid:
                stop.set()
                os._exit(0)  # the owner is gone and the main thread may be blocked in a step

    threading.Thread(target=watch, daemon=True, name="tpi-parent-watch").start()
    return stop


def worker_process(opts: WorkerOptions) -> None:
    """Entry point of a spawned worker process."""
    logging.basicConfig(level=logging.WARNING, format=f"[rank {opts.rank}] %(levelname)s %(message)s")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # terminate(): leave through serve's cleanup
    try:
        serve(opts)
    except Shutdown:
        pass
