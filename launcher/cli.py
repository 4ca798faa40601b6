"""`tpi` command line: parse arguments, build option objects, hand them to the library.

Subcommands: split, worker, master, run. Nothing here knows model math or the wire protocol.
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

from tpi.config import SPLIT_MODES, ConfigError


def _add_generation(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", help="the prompt; rendered with the chat template unless --raw")
    p.add_argument("--system", help="a system message for the chat template")
    p.add_argument("--raw", action="store_true", help="send the prompt as plain text, without the chat template")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 means greedy (the default)")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")


def _add_rank(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank process (default 1)")
    p.add_argument("--max-context", type=int, help="KV cache length (default: min(model max, 4096))")
    p.add_argument("--step-timeout", type=float, default=60.0, help="seconds to wait for a peer within a step")
    p.add_argument("--join-timeout", type=float, default=300.0, help="seconds to wait for the cluster to form")
    p.add_argument("--memory-budget", help="this device's memory for tpi, e.g. 800MB, 2GB (10^9) or 2GiB "
                   "(2^30); blocks that do not fit stream from disk (default: everything resident)")
    p.add_argument("--window", type=int, help="streamed blocks held at once, the one loading included "
                   "(default: 2, or 1 if only that fits)")
    p.add_argument("--drop-page-cache", action="store_true",
                   help="drop streamed reads from the page cache (posix_fadvise DONTNEED): measure the disk")
    p.add_argument("--stream-all", action="store_true", help="pin nothing, stream every block (for measuring)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N: with a GPU, the KV cache and the blocks "
                   "that fit --gpu-memory-budget live on it, and the rest is split between CPU and GPU")
    p.add_argument("--gpu-memory-budget", help="GPU memory for tpi (default: 90%% of what is free)")
    p.add_argument("--split-mode", choices=SPLIT_MODES, default="blocks",
                   help="how host blocks (those not on the GPU) are shared: blocks (default): attention on the GPU "
                   "from a copy, FFN blocks and LM-head chunks computed by both at once on disjoint columns; "
                   "rows: every projection split by output rows")
    p.add_argument("--split-ratio", type=float, help="the GPU's share of the host blocks: of their bytes (blocks) or "
                   "of each projection's rows (rows); default: measured at start")
    p.add_argument("--lost-timeout", type=float, default=3.0,
                   help="seconds of silence (heartbeats) after which a peer is declared lost (default 3)")
    p.add_argument("--curve-key", help="this node's key file from `tpi keys`: encrypt and authenticate the links")
    p.add_argument("--master-key", help="worker: the master's public key (with --curve-key)")
    p.add_argument("--allow-key", action="append", default=[],
                   help="master: a worker's public key allowed to join (repeatable, with --curve-key)")
    p.add_argument("--insecure", action="store_true",
                   help="allow plain TCP between machines (anyone on the network can read and inject)")
    p.add_argument("--no-verify", dest="verify_shards", action="store_false", help="skip the sha256 check of "
                   "each rank's shard files at start (sizes and headers are still checked): for very large models")


def _add_collective(p: argparse.ArgumentParser) -> None:
    p.add_argument("--collective", default="star", choices=["star", "ring", "tree", "gloo", "auto"],
                   help="the allreduce: star (default), ring, tree, gloo, or auto (chosen from the links measured "
                   "at start)")
    p.add_argument("--payload", choices=["float32", "float16", "bfloat16", "q8", "q8_64"],
                   help="partial sums on the wire (default: the model's dtype); q8: int8 with a scale per 32 values")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tpi", description="tensor-parallel inference on small devices")
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("--exit-with-stdin", action="store_true",
                        help="exit when stdin closes (how `tpi launch` ties remote processes to itself)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("split", help="split a HF checkpoint into per-rank block files")
    p.add_argument("model_dir")
    p.add_argument("out_dir")
    p.add_argument("--world-size", type=int, required=True)
    p.add_argument("--ratios", help="per-rank shares, rank 0 first, e.g. 3,1,1")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])

    p = sub.add_parser("worker", help="run one worker rank that connects to a master")
    p.add_argument("--master", required=True, help="the master's address, tcp://HOST:PORT")
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--shards", help="a folder written by `tpi split` (default: fetch this rank's shards from "
                   "the master and keep them in --cache-dir)")
    p.add_argument("--cache-dir", help="where fetched shards are kept (default: ~/.cache/tpi/fetched/rank<R>)")
    p.add_argument("--collective", choices=["star", "ring", "tree", "gloo", "auto"],
                   help="default: whatever the master runs; star: open no port for a ring or tree; others: refuse "
                   "a master that runs another")
    p.add_argument("--collective-host", help="the address other workers reach this one at, for a ring or tree "
                   "(default: this machine's address on its route to the master)")
    _add_rank(p)

    p = sub.add_parser("keys", help="make this node's CURVE key pair and print its public key")
    p.add_argument("--name", default="node", help="the node's name in the cluster config: master, worker1, ...")
    p.add_argument("--dir", default="~/.config/tpi/keys", help="where to write NAME.key (default %(default)s)")
    p.add_argument("--force", action="store_true", help="replace an existing key file")

    p = sub.add_parser("launch", help="start a cluster config's master here and its workers over ssh")
    p.add_argument("config", help="a cluster config, e.g. cluster_configs/home-4.yaml")
    p.add_argument("--dry-run", action="store_true", help="print the command for each machine and exit")

    p = sub.add_parser("emulate", help="run a cluster config on this machine in network namespaces with "
                       "its link's delay and rate (root and iproute2)")
    p.add_argument("config", help="a cluster config, e.g. cluster_configs/compose-4.yaml")
    p.add_argument("--subnet", help="the emulated network (default: the first free 10.77.N.0/24)")
    p.add_argument("--delay-mode", default="auto", choices=["auto", "netem", "proxy"],
                   help="netem where the kernel has it (auto), or tpi's own delay proxy")

    p = sub.add_parser("master", help="run rank 0: wait for the workers, then answer prompts")
    p.add_argument("--shards", required=True, help="the folder written by `tpi split`")
    p.add_argument("--bind", default="tcp://0.0.0.0:5555", help="where workers connect (default %(default)s)")
    _add_rank(p)
    _add_collective(p)
    _add_generation(p)

    p = sub.add_parser("run", help="split (cached), start master and workers locally, generate, stop")
    p.add_argument("--model", help="a HF checkpoint folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--world-size", type=int, default=3)
    p.add_argument("--ratios")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    _add_rank(p)
    _add_collective(p)
    _add_generation(p)
    p.add_argument("--stats", action="store_true", help="print per-rank time and memory figures at the end")

    p = sub.add_parser("serve", help="run the master with an OpenAI-compatible HTTP API")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="a HF checkpoint folder (default: the embedded SmolLM2-135M-Instruct)")
    src.add_argument("--shards", help="a folder written by `tpi split` (instead of --model)")
    p.add_argument("--world-size", type=int, default=3)
    p.add_argument("--ratios")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--host", default="127.0.0.1", help="HTTP address (default %(default)s: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port; 0 picks a free one (default %(default)s)")
    p.add_argument("--wait-for-workers", action="store_true",
                   help="do not start workers here: wait for `tpi worker` processes on other machines")
    p.add_argument("--bind", default="tcp://0.0.0.0:5555", help="where workers connect with --wait-for-workers")
    p.add_argument("--api-key", default=os.environ.get("TPI_API_KEY"),
                   help="require `Authorization: Bearer KEY` on /v1 (default: $TPI_API_KEY, else none)")
    p.add_argument("--model-name", help="the model id clients send (default: the folder's name)")
    p.add_argument("--queue-size", type=int, default=16, help="requests that may wait; more get 429")
    _add_rank(p)
    _add_collective(p)

    p = sub.add_parser("chat", help="chat in the terminal with any OpenAI-compatible server")
    p.add_argument("--url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--model", help="model id (default: the server's first model)")
    p.add_argument("--api-key", default=os.environ.get("TPI_API_KEY") or os.environ.get("OPENAI_API_KEY"))
    p.add_argument("--system", help="a system message")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--max-tokens", type=int, default=512)
    return parser


def _memory(args):
    from tpi.forward import MemoryOptions, parse_bytes

    parse_bytes(args.memory_budget)
    return MemoryOptions(args.memory_budget, args.window, args.drop_page_cache, args.stream_all, args.device,
                         args.gpu_memory_budget, args.split_mode, args.split_ratio, verify_shards=args.verify_shards)


def _curve(args, role: str, address: str):
    """CURVE settings from --curve-key/--master-key/--allow-key; plain TCP to another machine only
    with --insecure (and a warning)."""
    from tpi.cluster_config import LOCAL_HOSTS
    from tpi.comm.security import Curve, KeyPair, check_public_key

    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")  # tcp://[::1]:5555 -> ::1
    if args.curve_key is None:
        if host not in LOCAL_HOSTS:
            if not args.insecure:
                raise ValueError(f"{address} is not loopback: give --curve-key (see `tpi keys`) to encrypt the "
                                 f"links, or --insecure for plain TCP")
            print(f"warning: plain TCP on {address}: anyone on that network can read the hidden states and "
                  f"inject messages", file=sys.stderr)
        return None
    keys = KeyPair.load(args.curve_key)
    if role == "worker":
        if not args.master_key:
            raise ValueError("--curve-key needs --master-key: the master's public key")
        return Curve(keys, master_public=check_public_key(args.master_key, "--master-key"))
    if not args.allow_key:
        raise ValueError("--curve-key needs at least one --allow-key: each worker's public key")
    return Curve(keys, allowed=tuple(check_public_key(k, "--allow-key") for k in args.allow_key))


def cmd_keys(args) -> None:
    from pathlib import Path

    from tpi.comm.security import KeyPair

    path = Path(args.dir).expanduser() / f"{args.name}.key"
    if path.exists() and not args.force:
        raise ValueError(f"{path} exists; use --force to replace it (workers that know its public key must be "
                         f"given the new one)")
    keys = KeyPair.generate()
    secret, public = keys.save(path)
    print(f"wrote {secret} (secret, keep it on this machine) and {public}", file=sys.stderr)
    print(f"public_key: {keys.public}")


def print_stats(records: list[dict], tokens: int) -> None:
    """Per rank: peak RSS and, per generated token, compute, weight stall, allreduce and bytes read."""
    n = max(tokens, 1)
    print(f"{'rank':>4} {'peak RSS MB':>11} {'pinned':>6} {'streamed':>8} {'window':>6} {'compute ms/tok':>14} "
          f"{'stall ms/tok':>12} {'allreduce ms/tok':>16} {'read MB/tok':>11}", file=sys.stderr)
    for r in records:
        print(f"{r['rank']:>4} {r['peak_rss_bytes'] / 1e6:>11.0f} {r['pinned_blocks']:>6} {r['streamed_blocks']:>8} "
              f"{r['window']:>6} {1000 * r['compute_s'] / n:>14.1f} {1000 * r['stall_s'] / n:>12.1f} "
              f"{1000 * r['allreduce_s'] / n:>16.1f} {r['bytes_read'] / 1e6 / n:>11.1f}", file=sys.stderr)


def _messages(args) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": args.system}] if args.system else []
    return msgs + [{"role": "user", "content": args.prompt}]


def _print_timing(done: dict) -> None:
    n = len(done["ids"])
    ms = 1000 * done["decode_s"] / (n - 1) if n > 1 else float("nan")
    print(f"\n[{n} tokens, {done['finish_reason']}; TTFT {1000 * done['ttft_s']:.0f} ms, "
          f"{ms:.1f} ms/token]", file=sys.stderr)


def cmd_split(args) -> None:
    from tpi.weights import split

    m = split(args.model_dir, args.out_dir, args.world_size, args.ratios, args.dtype)
    total = sum(f["size"] for f in m["files"].values())
    print(f"wrote {len(m['files'])} block files ({total / 1e6:.1f} MB) and manifest.json to {args.out_dir}")


def cmd_worker(args) -> None:
    from tpi.worker import WorkerOptions, serve

    serve(WorkerOptions(args.master, args.rank, args.shards, args.threads, args.max_context,
                        args.step_timeout, args.join_timeout, memory=_memory(args), cache_dir=args.cache_dir,
                        progress=sys.stderr.isatty(), lost_timeout=args.lost_timeout,
                        curve=_curve(args, "worker", args.master), collective=args.collective,
                        collective_host=args.collective_host))


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

    node = MasterNode(MasterOptions(args.shards, args.bind, args.threads, args.max_context, args.step_timeout,
                                    args.join_timeout, memory=_memory(args), lost_timeout=args.lost_timeout,
                                    curve=_curve(args, "master", args.bind), collective=args.collective,
                                    payload=args.payload))
    try:
        print(f"rank 0 listening at {node.address}; waiting for {node.manifest.plan.world_size - 1} worker(s)",
              file=sys.stderr)
        engine = node.start()
        params = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
        prompts = [args.prompt] if args.prompt else _stdin_prompts()
        for prompt in prompts:
            ids = engine.encode(prompt) if args.raw else engine.encode_chat(
                _messages(argparse.Namespace(system=args.system, prompt=prompt)))
            res = engine.generate(ids, args.max_new_tokens, params, args.stop,
                                  lambda new, text: print(text, end="", flush=True))
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

    if not args.prompt:
        raise SystemExit("tpi run: --prompt is required")
    if args.model is None:
        from tpi.embedded import default_model_dir

        print("preparing the embedded SmolLM2-135M-Instruct (once) ...", file=sys.stderr)
        args.model = default_model_dir()
    t0 = time.perf_counter()
    mem = _memory(args)
    with LocalCluster(args.model, args.world_size, args.ratios, args.dtype, threads=args.threads,
                      max_context=args.max_context, step_timeout=args.step_timeout,
                      start_timeout=args.join_timeout, progress=True, window=mem.window,
                      memory_budget=mem.memory_budget, drop_page_cache=mem.drop_page_cache,
                      stream_all=mem.stream_all, device=mem.device, gpu_memory_budget=mem.gpu_memory_budget,
                      split_mode=mem.split_mode, split_ratio=mem.split_ratio, verify_shards=mem.verify_shards,
                      collective=args.collective,
                      payload=args.payload) as cluster:
        print(f"{args.world_size} rank process(es) ready in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        source = {"prompt": args.prompt} if args.raw else {"messages": _messages(args)}
        for event, _ in cluster.stream(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                       top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop=args.stop,
                                       **source):
            if event["event"] == "token":
                print(event["text"], end="", flush=True)
            else:
                _print_timing(event)
                if args.stats:
                    print_stats(cluster.stats(), len(event["ids"]))


def cmd_serve(args) -> None:
    from tpi.serve import ServeOptions, serve

    model = args.model
    if model is None and args.shards is None:
        from tpi.embedded import default_model_dir

        model = str(default_model_dir())
    serve(ServeOptions(model, args.shards, args.world_size, args.ratios, args.dtype, args.host, args.port,
                       args.wait_for_workers, args.bind, args.api_key, args.model_name, args.queue_size,
                       args.threads, args.max_context, args.step_timeout, args.join_timeout, _memory(args),
                       args.lost_timeout,
                       _curve(args, "master", args.bind) if args.wait_for_workers else None,
                       args.collective, args.payload))


def cmd_chat(args) -> None:
    from tpi.chat import chat

    chat(args.url, args.model, args.api_key, args.system, args.temperature, args.max_tokens)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    # SIGTERM (docker stop, timeout, kill) unwinds like Ctrl-C, so that child ranks and temp files go too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    commands = {"split": cmd_split, "worker": cmd_worker, "master": cmd_master, "run": cmd_run,
                "serve": cmd_serve, "chat": cmd_chat, "launch": cmd_launch, "keys": cmd_keys,
                "emulate": cmd_emulate}
    if args.exit_with_stdin:
        _exit_with_stdin()
    from tpi.chat import ChatError
    from tpi.cluster import ClusterError
    from tpi.comm.base import CommError

    try:
        commands[args.command](args)
    except (ConfigError, ValueError, ClusterError, CommError, ChatError) as e:
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
