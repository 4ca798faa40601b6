"""`tpi` command line: parse arguments, build option objects, hand them to the library.

Subcommands: split, worker, master, run, serve, chat, launch, emulate, keys. Flags become the
library's option dataclasses in one place each (``rank_options``, ``comm_options``); an error tpi
explains (``TpiError``) is printed as one line, anything else keeps its traceback: that is a bug.
`tpi worker` imports only what a worker needs (no HTTP, tokenizer or GGUF packages). Nothing here
knows model math or the wire protocol.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import threading
import time

from tpi.errors import TpiError
from tpi.options import Collective, DType, OffloadMode, PayloadName, choices

Formatter = argparse.ArgumentDefaultsHelpFormatter


class _Deprecated(argparse.Action):
    """An old flag that still works: it sets the new flag's value and says so on stderr."""

    def __init__(self, *args, new: str, **kw):
        super().__init__(*args, **kw)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"warning: {option_string} is deprecated: use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def _add_generation(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("--prompt", help="the prompt; rendered with the chat template unless --raw")
    g.add_argument("--system", help="a system message for the chat template")
    g.add_argument("--raw", action="store_true", help="send the prompt as plain text, without the chat template")
    g.add_argument("--max-new-tokens", type=int, default=64, help="the most tokens to generate")
    g.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    g.add_argument("--top-k", type=int, help="sample from the k most likely tokens only")
    g.add_argument("--top-p", type=float, help="sample from the smallest set of tokens reaching probability p")
    g.add_argument("--seed", type=int, help="seed of the sampling, for repeatable output")
    g.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--world-size", type=int, default=3, help="ranks, the master included")
    p.add_argument("--ratios", help="each rank's share of every layer, rank 0 first, e.g. 2,1,1 or 0,1,1 "
                   "(default: equal); a rank with ratio 0 holds no share")
    p.add_argument("--dtype", default="float32", choices=choices(DType), help="the weights' dtype on every rank")


def _add_rank(p: argparse.ArgumentParser) -> None:
    """This rank's own options (RankOptions), and the timeouts every rank has."""
    g = p.add_argument_group("each rank")
    g.add_argument("--threads", type=int, default=1, help="torch threads per rank process")
    g.add_argument("--max-context", type=int, help="KV cache length (default: min(model max, 4096))")
    g.add_argument("--step-timeout", type=float, default=60.0, help="seconds to wait for a peer within a step")
    g.add_argument("--join-timeout", type=float, default=300.0, help="seconds to wait for the cluster to form")
    g.add_argument("--lost-timeout", type=float, default=3.0,
                   help="seconds of silence (heartbeats) after which a peer is declared lost")
    g = p.add_argument_group("memory")
    g.add_argument("--memory-budget", help="this device's memory for tpi, e.g. 800MB, 2GB (10^9) or 2GiB (2^30); "
                   "blocks that do not fit stream from disk (default: everything resident)")
    g.add_argument("--window", type=int, help="streamed blocks held at once, the one loading included "
                   "(default: 2, or 1 if only that fits)")
    g.add_argument("--drop-page-cache", action="store_true",
                   help="drop streamed reads from the page cache (posix_fadvise DONTNEED): measure the disk")
    g.add_argument("--stream-all", action="store_true", help="pin nothing, stream every block (for measuring)")
    g.add_argument("--no-verify", dest="verify_shards", action="store_false", help="skip the sha256 check of "
                   "each rank's shard files at start (sizes and headers are still checked): for very large models")
    g = p.add_argument_group("a GPU (experimental)")
    g.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N: with a GPU, the KV cache and the blocks "
                   "that fit --gpu-memory-budget live on it, and the rest is offloaded (--offload-mode)")
    g.add_argument("--gpu-memory-budget", help="GPU memory for tpi (default: 90%% of what is free)")
    g.add_argument("--offload-mode", choices=choices(OffloadMode), default="blocks",
                   help="how host blocks (those not on the GPU) share it: blocks: attention on the GPU from a copy, "
                   "FFN blocks and LM-head chunks computed by both at once on disjoint columns; rows: every "
                   "projection divided by output rows")
    g.add_argument("--offload-share", type=float, help="the GPU's share of the host blocks: of their bytes "
                   "(blocks) or of each projection's rows (rows); default: measured at start")
    g.add_argument("--split-mode", dest="offload_mode", action=_Deprecated, new="--offload-mode",
                   choices=choices(OffloadMode), help=argparse.SUPPRESS)
    g.add_argument("--split-ratio", dest="offload_share", type=float, action=_Deprecated, new="--offload-share",
                   help=argparse.SUPPRESS)


def _add_keys(p: argparse.ArgumentParser, role: str) -> None:
    g = p.add_argument_group("security")
    g.add_argument("--curve-key", help="this node's key file from `tpi keys`: encrypt and authenticate the links")
    if role == "worker":
        g.add_argument("--master-key", help="the master's public key (with --curve-key)")
    else:
        g.add_argument("--allow-key", action="append", default=[],
                       help="a worker's public key allowed to join (repeatable, with --curve-key)")
    g.add_argument("--insecure", action="store_true",
                   help="allow plain TCP between machines (anyone on the network can read and inject)")


def _add_collective(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("collective")
    g.add_argument("--collective", default="star", choices=choices(Collective),
                   help="the allreduce: star, ring, tree, gloo, or auto (chosen from the links measured at start)")
    g.add_argument("--payload", choices=choices(PayloadName),
                   help="partial sums on the wire (default: the model's dtype); q8: int8 with a scale per 32 values")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tpi", description="tensor-parallel inference on small devices")
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("--exit-with-stdin", action="store_true",
                        help="exit when stdin closes (how `tpi launch` ties remote processes to itself)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("split", help="split a HF checkpoint into per-rank block files", formatter_class=Formatter)
    p.add_argument("model_dir")
    p.add_argument("out_dir")
    p.add_argument("--world-size", type=int, required=True, help="ranks, the master included")
    p.add_argument("--ratios", help="per-rank shares, rank 0 first, e.g. 3,1,1 (default: equal)")
    p.add_argument("--dtype", default="float32", choices=choices(DType))

    p = sub.add_parser("worker", help="run one worker rank that connects to a master", formatter_class=Formatter)
    p.add_argument("--master", required=True, help="the master's address, tcp://HOST:PORT")
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--shards", help="a folder written by `tpi split` (default: fetch this rank's shards from "
                   "the master and keep them in --cache-dir)")
    p.add_argument("--cache-dir", help="where fetched shards are kept (default: $TPI_CACHE/fetched/rank<R>)")
    p.add_argument("--collective", choices=choices(Collective),
                   help="default: whatever the master runs; star: open no port for a ring or tree; others: refuse "
                   "a master that runs another")
    p.add_argument("--collective-host", help="the address other workers reach this one at, for a ring or tree "
                   "(default: this machine's address on its route to the master)")
    _add_rank(p)
    _add_keys(p, "worker")

    p = sub.add_parser("keys", help="make this node's CURVE key pair and print its public key",
                       formatter_class=Formatter)
    p.add_argument("--name", default="node", help="the node's name in the cluster config: master, worker1, ...")
    p.add_argument("--dir", default="~/.config/tpi/keys", help="where to write NAME.key")
    p.add_argument("--force", action="store_true", help="replace an existing key file")

    p = sub.add_parser("launch", help="start a cluster config's master here and its workers over ssh")
    p.add_argument("config", help="a cluster config, e.g. cluster_configs/home-4.yaml")
    p.add_argument("--dry-run", action="store_true", help="print the command for each machine and exit")

    p = sub.add_parser("emulate", help="run a cluster config on this machine in network namespaces with "
                       "its link's delay and rate (root and iproute2)", formatter_class=Formatter)
    p.add_argument("config", help="a cluster config, e.g. cluster_configs/compose-4.yaml")
    p.add_argument("--subnet", help="the emulated network (default: the first free 10.77.N.0/24)")
    p.add_argument("--delay-mode", default="auto", choices=["auto", "netem", "proxy"],
                   help="netem where the kernel has it (auto), or tpi's own delay proxy")

    p = sub.add_parser("master", help="run rank 0: wait for the workers, then answer prompts",
                       formatter_class=Formatter)
    p.add_argument("--shards", required=True, help="the folder written by `tpi split`")
    p.add_argument("--bind", default="tcp://0.0.0.0:5555", help="where workers connect")
    _add_rank(p)
    _add_keys(p, "master")
    _add_collective(p)
    _add_generation(p)

    p = sub.add_parser("run", help="split (cached), start master and workers on this machine, generate, stop",
                       formatter_class=Formatter)
    p.add_argument("--model", help="a HF checkpoint folder (default: the embedded SmolLM2-135M-Instruct)")
    _add_model(p)
    _add_generation(p)
    p.add_argument("--stats", action="store_true", help="print per-rank time and memory figures at the end")
    _add_rank(p)
    _add_collective(p)

    p = sub.add_parser("serve", help="run the master with an OpenAI-compatible HTTP API", formatter_class=Formatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="a HF checkpoint folder (default: the embedded SmolLM2-135M-Instruct)")
    src.add_argument("--shards", help="a folder written by `tpi split` (instead of --model)")
    _add_model(p)
    g = p.add_argument_group("HTTP")
    g.add_argument("--host", default="127.0.0.1", help="HTTP address (127.0.0.1: this machine only)")
    g.add_argument("--port", type=int, default=8000, help="HTTP port; 0 picks a free one")
    g.add_argument("--api-key", default=os.environ.get("TPI_API_KEY"),
                   help="require `Authorization: Bearer KEY` on /v1 (default: $TPI_API_KEY, else none)")
    g.add_argument("--model-name", help="the model id clients send (default: the folder's name)")
    g.add_argument("--queue-size", type=int, default=16, help="requests that may wait; more get 429")
    p.add_argument("--wait-for-workers", action="store_true",
                   help="do not start workers here: wait for `tpi worker` processes on other machines")
    p.add_argument("--bind", default="tcp://0.0.0.0:5555", help="where workers connect with --wait-for-workers")
    _add_rank(p)
    _add_keys(p, "master")
    _add_collective(p)

    p = sub.add_parser("chat", help="chat in the terminal with any OpenAI-compatible server",
                       formatter_class=Formatter)
    p.add_argument("--url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--model", help="model id (default: the server's first model)")
    p.add_argument("--api-key", default=os.environ.get("TPI_API_KEY") or os.environ.get("OPENAI_API_KEY"))
    p.add_argument("--system", help="a system message")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--max-tokens", type=int, default=512)
    return parser


# -- flags -> options ------------------------------------------------------------------------------
def rank_options(args):
    from tpi.options import MemoryOptions, OffloadOptions, RankOptions

    return RankOptions(args.threads, args.max_context,
                       MemoryOptions(args.memory_budget, args.window, args.drop_page_cache, args.stream_all,
                                     args.verify_shards),
                       OffloadOptions(args.device, args.gpu_memory_budget, args.offload_mode, args.offload_share))


def comm_options(args, role: str, address: str | None = None):
    """CommOptions from the flags; CURVE keys from --curve-key/--master-key/--allow-key, or plain
    TCP to another machine only with --insecure (and a warning). `address`: the one the keys guard."""
    from tpi.options import CommOptions

    return CommOptions(getattr(args, "collective", None), getattr(args, "payload", None), args.step_timeout,
                       args.join_timeout, args.lost_timeout, _curve(args, role, address) if address else None)


def _curve(args, role: str, address: str):
    from tpi.cluster_config import LOCAL_HOSTS
    from tpi.comm.security import Curve, KeyPair, check_public_key
    from tpi.config import ConfigError

    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")  # tcp://[::1]:5555 -> ::1
    if args.curve_key is None:
        if host not in LOCAL_HOSTS:
            if not args.insecure:
                raise ConfigError(f"{address} is not loopback: give --curve-key (see `tpi keys`) to encrypt the "
                                  f"links, or --insecure for plain TCP")
            print(f"warning: plain TCP on {address}: anyone on that network can read the hidden states and "
                  f"inject messages", file=sys.stderr)
        return None
    keys = KeyPair.load(args.curve_key)
    if role == "worker":
        if not args.master_key:
            raise ConfigError("--curve-key needs --master-key: the master's public key")
        return Curve(keys, master_public=check_public_key(args.master_key, "--master-key"))
    if not args.allow_key:
        raise ConfigError("--curve-key needs at least one --allow-key: each worker's public key")
    return Curve(keys, allowed=tuple(check_public_key(k, "--allow-key") for k in args.allow_key))


def _embedded_model() -> str:
    from tpi.embedded import converted_dir, default_model_dir

    if converted_dir() is None:
        print("preparing the embedded SmolLM2-135M-Instruct: converting its GGUF file to float32 safetensors "
              "(once; about a minute and 1.6 GB of memory) ...", file=sys.stderr, flush=True)
    return str(default_model_dir())


# -- commands --------------------------------------------------------------------------------------
def cmd_keys(args) -> None:
    from pathlib import Path

    from tpi.comm.security import KeyPair
    from tpi.config import ConfigError

    path = Path(args.dir).expanduser() / f"{args.name}.key"
    if path.exists() and not args.force:
        raise ConfigError(f"{path} exists; use --force to replace it (workers that know its public key must be "
                          f"given the new one)")
    keys = KeyPair.generate()
    secret, public = keys.save(path)
    print(f"wrote {secret} (secret, keep it on this machine) and {public}", file=sys.stderr)
    print(f"public_key: {keys.public}")


def print_stats(records: list, tokens: int) -> None:
    """Per rank: peak RSS and, per generated token, compute, weight stall, allreduce and bytes read."""
    n = max(tokens, 1)
    print(f"{'rank':>4} {'peak RSS MB':>11} {'pinned':>6} {'streamed':>8} {'window':>6} {'compute ms/tok':>14} "
          f"{'stall ms/tok':>12} {'allreduce ms/tok':>16} {'read MB/tok':>11}", file=sys.stderr)
    for r in records:
        print(f"{r.rank:>4} {r.peak_rss_bytes / 1e6:>11.0f} {r.pinned_blocks:>6} {r.streamed_blocks:>8} "
              f"{r.window:>6} {1000 * r.compute_s / n:>14.1f} {1000 * r.stall_s / n:>12.1f} "
              f"{1000 * r.allreduce_s / n:>16.1f} {r.bytes_read / 1e6 / n:>11.1f}", file=sys.stderr)


def _messages(system: str | None, prompt: str) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": prompt}]


def _print_timing(done: dict) -> None:
    n = len(done["ids"])
    ms = 1000 * done["decode_s"] / (n - 1) if n > 1 else float("nan")
    print(f"[{n} tokens, {done['finish_reason']}; TTFT {1000 * done['ttft_s']:.0f} ms, "
          f"{ms:.1f} ms/token]", file=sys.stderr)


def cmd_split(args) -> None:
    from tpi.weights import split

    m = split(args.model_dir, args.out_dir, args.world_size, args.ratios, args.dtype)
    total = sum(f["size"] for f in m["files"].values())
    print(f"wrote {len(m['files'])} block files ({total / 1e6:.1f} MB) and manifest.json to {args.out_dir}")


def cmd_worker(args) -> None:
    from tpi.worker import WorkerOptions, serve

    serve(WorkerOptions(args.master, args.rank, args.shards, rank_options(args),
                        comm_options(args, "worker", args.master), cache_dir=args.cache_dir,
                        progress=sys.stderr.isatty(), collective_host=args.collective_host))


def cmd_launch(args) -> None:
    from tpi.cluster_config import check_shares, load_cluster_config
    from tpi.launch import Launcher, dry_run, node_commands

    cfg = load_cluster_config(args.config)
    commands = node_commands(cfg)
    if args.dry_run:
        dry_run(commands)
        return
    check_shares(cfg, args.config)
    with Launcher(commands) as launcher:
        print(f"launched {cfg.name}: {cfg.world_size} rank(s); Ctrl-C stops them all", file=sys.stderr, flush=True)
        code = launcher.wait()
    if code:
        raise SystemExit(code)


def cmd_emulate(args) -> None:
    from tpi.cluster_config import check_shares, load_cluster_config
    from tpi.emulate import EmulateError, Emulation

    cfg = load_cluster_config(args.config)
    check_shares(cfg, args.config)
    signal.signal(signal.SIGHUP, lambda *_: sys.exit(129))  # a closed terminal cleans up too
    try:
        with Emulation(cfg, args.subnet, args.delay_mode) as emu:
            print(emu.describe() + "; Ctrl-C stops it", file=sys.stderr, flush=True)
            code = emu.wait()
    except EmulateError as e:
        raise SystemExit(f"tpi emulate: {e}") from None
    if code:
        raise SystemExit(code)


def cmd_master(args) -> None:
    from tpi.master import MasterNode, MasterOptions
    from tpi.sampling import SamplingParams

    node = MasterNode(MasterOptions(args.shards, args.bind, rank_options(args),
                                    comm_options(args, "master", args.bind)))
    try:
        print(f"rank 0 listening at {node.address}; waiting for {node.manifest.plan.world_size - 1} worker(s)",
              file=sys.stderr)
        engine = node.start()
        params = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
        for prompt in [args.prompt] if args.prompt else _stdin_prompts():
            ids = engine.encode(prompt) if args.raw else engine.encode_chat(_messages(args.system, prompt))
            res = engine.generate(ids, args.max_new_tokens, params, args.stop,
                                  lambda new, text: print(text, end="", flush=True))
            print(flush=True)
            _print_timing(dataclasses.asdict(res))
    finally:
        node.close()


def _stdin_prompts():
    while True:
        try:
            line = input("> ")
        except EOFError:
            return
        if line.strip():
            yield line


def cmd_run(args) -> None:
    from tpi import LocalCluster
    from tpi.config import ConfigError

    if not args.prompt:
        raise ConfigError("tpi run needs --prompt TEXT")
    model = args.model or _embedded_model()
    t0 = time.perf_counter()
    with LocalCluster(model, args.world_size, args.ratios, args.dtype, progress=True, options=rank_options(args),
                      comm=comm_options(args, "run")) as cluster:
        print(f"{args.world_size} rank process(es) ready in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        source = {"prompt": args.prompt} if args.raw else {"messages": _messages(args.system, args.prompt)}
        for event, _ in cluster.stream(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                       top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop=args.stop,
                                       **source):
            if event["event"] == "token":
                print(event["text"], end="", flush=True)
            else:
                print(flush=True)  # the answer ends its line
                _print_timing(event)
                if args.stats:
                    print_stats(cluster.stats(), len(event["ids"]))


def cmd_serve(args) -> None:
    from tpi.serve import ServeOptions, serve

    model = args.model if args.model or args.shards else _embedded_model()
    serve(ServeOptions(model, args.shards, args.world_size, args.ratios, args.dtype, args.host, args.port,
                       args.wait_for_workers, args.bind, args.api_key, args.model_name, args.queue_size,
                       rank_options(args),
                       comm_options(args, "master", args.bind if args.wait_for_workers else None)))


def cmd_chat(args) -> None:
    from tpi.chat import chat

    chat(args.url, args.model, args.api_key, args.system, args.temperature, args.max_tokens)


COMMANDS = {"split": cmd_split, "worker": cmd_worker, "master": cmd_master, "run": cmd_run, "serve": cmd_serve,
            "chat": cmd_chat, "launch": cmd_launch, "keys": cmd_keys, "emulate": cmd_emulate}


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    # SIGTERM (docker stop, timeout, kill) unwinds like Ctrl-C, so that child ranks and temp files go too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.exit_with_stdin:
        _exit_with_stdin()
    try:
        COMMANDS[args.command](args)
    except TpiError as e:  # the user's to act on: one line; anything else is a bug and keeps its traceback
        raise SystemExit(f"tpi {args.command}: {e}") from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None


def _exit_with_stdin() -> None:
    """SIGTERM ourselves (a clean unwind through sys.exit) when stdin reaches its end."""
    def watch() -> None:  # a raw read: no buffered-stream lock left held at interpreter shutdown
        try:
            while os.read(fd, 4096):
                pass
        except OSError:
            pass
        os.kill(os.getpid(), signal.SIGTERM)

    fd = sys.stdin.fileno()

    threading.Thread(target=watch, daemon=True, name="tpi-stdin-watch").start()


if __name__ == "__main__":
    main()
