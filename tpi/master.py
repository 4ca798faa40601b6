"""The master node (rank 0): its communicator, its engine, and the local control channel.

Owns: ``MasterNode`` (binds the workers' port, waits for them to join, runs the engine, shuts the
workers down) and the control channel through which a local owner (``LocalCluster``, ``tpi run``)
drives a master running in its own process: msgpack requests and replies over a ZeroMQ socket on
loopback, each request validated. Does not know: HTTP, how its workers were started.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import msgpack
import torch
import zmq
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tpi.comm.base import SingleRank
from tpi.comm.files import ShardServer
from tpi.comm.hub import Hub
from tpi.engine import Engine, GenerationResult, RequestError
from tpi.errors import TpiError
from tpi.open_rank import compute_mode
from tpi.options import CommOptions, RankOptions
from tpi.sampling import SamplingParams
from tpi.weights import Manifest

log = logging.getLogger("tpi.master")


@dataclass(frozen=True)
class MasterOptions:
    shard_dir: str
    bind: str = "tcp://127.0.0.1:0"  # where workers connect
    rank_opts: RankOptions = field(default_factory=RankOptions)
    comm: CommOptions = field(default_factory=CommOptions)
    parent_pid: int | None = None


class MasterNode:
    """Rank 0: binds for workers at construction; `start` waits for them; `close` stops them."""

    def __init__(self, opts: MasterOptions):
        self.opts = opts
        torch.set_num_threads(opts.rank_opts.threads)
        self.manifest = Manifest.load(opts.shard_dir)
        cfg, world = self.manifest.config, self.manifest.plan.world_size
        self.comm = SingleRank() if world == 1 else Hub(
            opts.bind, world, self.manifest.digest, cfg.hidden_size, self.manifest.dtype, cfg.num_layers, opts.comm,
            files=ShardServer(opts.shard_dir, self.manifest), compute=compute_mode(self.manifest, opts.rank_opts),
            prefill_chunk=opts.rank_opts.prefill_chunk)
        self.address = self.comm.address
        self.engine: Engine | None = None

    def start(self, check: Callable[[], None] | None = None) -> Engine:
        """Load rank 0's weights, then wait for the workers (calling `check` while waiting)."""
        self.engine = Engine(self.opts.shard_dir, self.manifest, self.comm, self.opts.rank_opts)
        self.comm.wait_for_workers(self.opts.comm.join_timeout, check)
        return self.engine

    def close(self) -> None:
        self.comm.close()
        if self.engine is not None:
            self.engine.close()


# -- the control channel -----------------------------------------------------------------------
class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # msgpack keeps types: no "1" or True for 1
    op: Literal["generate"]
    ids: list[int] | None = None
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(0.0, ge=0)
    top_k: int | None = Field(None, ge=1)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    stop: list[str] = []
    stream: bool = False
    ignore_eos: bool = False


class ForwardRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # msgpack keeps types: no "1" or True for 1
    op: Literal["forward"]
    ids: list[int]


def pack(obj: dict[str, Any]) -> bytes:
    return msgpack.packb(obj)


Reply = Callable[..., None]


def _serve_request(engine: Engine, reply: Reply, req: dict) -> None:
    op = req.get("op")
    if op == "forward":
        r = ForwardRequest.model_validate(req)
        logits = engine.forward(r.ids)
        reply({"event": "logits", "shape": list(logits.shape)}, memoryview(logits.numpy()).cast("B"))
    elif op == "generate":
        r = GenerateRequest.model_validate(req)
        ids = r.ids if r.ids is not None else (
            engine.encode_chat(r.messages) if r.messages is not None else engine.encode(r.prompt or ""))
        on_token = (lambda new, text: reply({"event": "token", "ids": new, "text": text})) if r.stream else None
        res: GenerationResult = engine.generate(
            ids, r.max_new_tokens, SamplingParams(r.temperature, r.top_k, r.top_p, r.seed), r.stop, on_token,
            ignore_eos=r.ignore_eos)
        reply({"event": "done", "ids": res.ids, "text": res.text, "finish_reason": res.finish_reason,
               "prompt_tokens": res.prompt_tokens, "ttft_s": res.ttft_s, "decode_s": res.decode_s})
    elif op == "stats":
        reply({"event": "stats", "ranks": [r.to_wire() for r in engine.stats()]})
    elif op == "ready":
        reply({"event": "ready"})
    elif op == "health":
        reply({"event": "health", **engine.comm.health().to_dict()})
    else:
        raise RequestError(f"unknown op {str(op)[:80]!r}")


def master_process(opts: MasterOptions, ports, published: threading.Event, error_path: str) -> None:
    """Entry point of a spawned master: publish the ports, wait for the owner and the workers,
    then answer control requests until `shutdown`, the owner's exit, or a fatal error."""
    logging.basicConfig(level=logging.WARNING, format="[rank 0] %(levelname)s %(message)s")
    with report_errors(error_path):
        node = MasterNode(opts)
        ctx = zmq.Context()
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind("tcp://127.0.0.1:0")
        ports[0] = int(node.address.rsplit(":", 1)[1]) if node.address else 0
        ports[1] = int(sock.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1])
        published.set()
        try:
            _control_loop(node, sock, opts.parent_pid)
        finally:
            node.close()
            sock.close(0)
            ctx.term()


@contextmanager
def report_errors(path: str) -> Iterator[None]:
    """Write a fatal error's text to `path`, where the owner of this process reads it (and says it).
    An error tpi explains (TpiError) ends the process with code 1 and no traceback; anything else
    is a bug and keeps its traceback."""
    try:
        yield
    except TpiError as e:
        with open(path, "w") as f:
            f.write(f"{type(e).__name__}: {e}")
        raise SystemExit(1) from None
    except BaseException as e:
        if not isinstance(e, (KeyboardInterrupt, SystemExit)):
            with open(path, "w") as f:
                f.write(f"{type(e).__name__}: {e}")
        raise


def _refuse(sock: zmq.Socket, ident: bytes, why: str) -> None:
    """Answer a control message that is not a request at all (the sender learns why), and log it."""
    log.warning("refused a control message: %s", why)
    sock.send_multipart([ident, pack({"event": "error", "type": "ValueError", "message": why, "rid": None})])


def _control_loop(node: MasterNode, sock: zmq.Socket, parent_pid: int | None) -> None:
    engine = None
    while True:
        if parent_pid is not None and os.getppid() != parent_pid:
            return  # the owner is gone
        if engine is not None:
            node.comm.poll_idle()
        if not sock.poll(50 if engine is not None else 500):
            continue
        frames = sock.recv_multipart()
        ident, req = frames[0], None
        if len(frames) != 2:
            _refuse(sock, ident, f"a control request is 1 frame, got {len(frames) - 1}")
            continue
        try:
            req = msgpack.unpackb(frames[1], raw=False)
        except Exception as e:  # msgpack raises several types for garbage
            _refuse(sock, ident, f"a control request is one msgpack map; got {len(frames[1])} bytes that are not "
                                 f"msgpack ({type(e).__name__})")
            continue
        rid = req.pop("rid", None) if isinstance(req, dict) else None

        def reply(obj: dict, *extra, ident=ident, rid=rid) -> None:
            sock.send_multipart([ident, pack({**obj, "rid": rid}), *extra], copy=False)

        try:
            if not isinstance(req, dict):
                raise RequestError("a control request must be a map")
            if req.get("op") == "shutdown":
                reply({"event": "bye"})
                return
            if engine is None:
                try:
                    engine = node.start()  # loads rank 0's weights and waits for the workers
                except TpiError as e:  # the owner says it; this master cannot serve
                    reply({"event": "error", "type": type(e).__name__, "message": str(e)})
                    return
            _serve_request(engine, reply, req)
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(x) for x in err["loc"])
            message = f"{loc}={str(err.get('input'))[:80]!r}: {err['msg']}"
            log.warning("refused a control request: %s", message)
            reply({"event": "error", "type": "ValueError", "message": message})
        except Exception as e:  # reported to the owner, who raises it; the master stays up
            if isinstance(e, TpiError):
                log.warning("request failed: %s", e)
            else:  # a bug: its traceback in the log
                log.exception("request failed")
            reply({"event": "error", "type": type(e).__name__, "message": str(e)})
