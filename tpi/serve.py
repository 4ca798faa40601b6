"""`tpi serve`: the master node with its HTTP server, in this process.

Owns: putting the pieces together — the split (cached) or a given split folder, the master node,
the workers (spawned here on loopback, or awaited from other machines), the engine thread, the
FastAPI app on a socket we bind ourselves (so port 0 works and the real port is printed), and
tearing all of it down when uvicorn stops (Ctrl-C, SIGTERM). Does not know: the model math or HTTP
details.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tpi.cluster import RankProcesses
from tpi.master import MasterNode, MasterOptions
from tpi.options import CommOptions, RankOptions
from tpi.serving import EngineThread
from tpi.split import Quant, split_cached
from tpi.worker import WorkerOptions

log = logging.getLogger("tpi.serve")


@dataclass(frozen=True)
class ServeOptions:
    model: str | None = None  # a HF checkpoint folder or a .gguf file, split here (cached)
    shards: str | None = None  # or a folder written by `tpi split`
    world_size: int = 1
    ratios: str | None = None
    dtype: str = "float32"
    host: str = "127.0.0.1"
    port: int = 8000
    wait_for_workers: bool = False  # workers connect from other machines to `bind`
    bind: str = "tcp://0.0.0.0:5555"
    api_key: str | None = None
    model_name: str | None = None
    queue_size: int = 16
    rank_opts: RankOptions = field(default_factory=RankOptions)  # every rank's, the master's included
    comm: CommOptions = field(default_factory=CommOptions)  # its curve: with wait_for_workers only
    quant: Quant = field(default_factory=Quant)  # the split's weight format (with `model`)


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def serve(opts: ServeOptions) -> None:
    import uvicorn

    from tpi.server import create_app

    shard_dir = opts.shards or str(split_cached(opts.model, opts.world_size, opts.ratios, opts.dtype,
                                                quant=opts.quant))
    bind = opts.bind if opts.wait_for_workers else "tcp://127.0.0.1:0"
    comm = opts.comm if opts.wait_for_workers else dataclasses.replace(opts.comm, curve=None)
    node = MasterNode(MasterOptions(shard_dir, bind, opts.rank_opts, comm))
    world = node.manifest.plan.world_size
    ranks = RankProcesses()
    engine_thread = None
    try:
        if world > 1 and not opts.wait_for_workers:
            for rank in range(1, world):
                ranks.spawn_worker(WorkerOptions(node.address, rank, shard_dir, opts.rank_opts,
                                                 dataclasses.replace(comm, collective=None), parent_pid=os.getpid()))
        elif world > 1:
            print(f"waiting for {world - 1} worker(s) at {node.address}; start each with\n"
                  f"  tpi worker --master tcp://THIS_HOST:{node.address.rsplit(':', 1)[1]} --rank K\n"
                  f"(each fetches its shard files from here on its first start)", file=sys.stderr, flush=True)
        engine = node.start(check=ranks.check)
        engine_thread = EngineThread(engine, opts.queue_size).start()
        name = opts.model_name or Path(opts.model or shard_dir).name
        app = create_app(engine_thread, name, opts.api_key)
        sock = _listen(opts.host, opts.port)
        host, port = sock.getsockname()[:2]
        print(f"serving {name!r} on http://{host}:{port}/v1 ({world} rank(s))", file=sys.stderr, flush=True)
        uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)).run(sockets=[sock])
    finally:
        if engine_thread is not None:
            engine_thread.close()
        node.close()
        ranks.stop()
