"""`tpi` command line: parse arguments (launcher/args.py), build option objects, hand them to the library.

Subcommands: split, worker, master, run, serve, chat, launch, emulate, keys. Flags become the
library's option dataclasses in one place each (``rank_options``, ``comm_options``); an error tpi
explains (``TpiError``) is printed as one line, anything else keeps its traceback: that is a bug.
`tpi worker` imports only what a worker needs (no HTTP, tokenizer or GGUF packages). Nothing here
knows model math or the wire protocol.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
import threading
import time

from launcher.args import build_parser
from tpi.errors import TpiError

# what `pip install 'tpi[master]'` adds to a worker's install (pyproject.toml's extra, by import name)
MASTER_PACKAGES = ("transformers", "tokenizers", "safetensors", "accelerate", "gguf", "fastapi", "starlette",
                   "uvicorn", "httpx", "prometheus_client", "pydantic", "yaml")


# -- flags -> options ------------------------------------------------------------------------------
def rank_options(args):
    from tpi.options import MemoryOptions, OffloadOptions, RankOptions

    return RankOptions(args.threads, args.max_context,
                       MemoryOptions(args.memory_budget, args.window, args.drop_page_cache, args.stream_all,
                                     args.verify_shards),
                       OffloadOptions(args.device, args.gpu_memory_budget, args.offload_mode, args.offload_share),
                       compute=args.compute, prefill_chunk=args.prefill_chunk)


def quant(args):
    from tpi.split import Quant

    return Quant.of(args.quant, args.group_size, args.quant_head)


def comm_options(args, role: str, address: str | None = None):
    """CommOptions from the flags; CURVE keys from --curve-key/--master-key/--allow-key, or plain
    TCP to another machine only with --insecure (and a warning). `address`: the one the keys guard."""
    from tpi.options import CommOptions

    return CommOptions(getattr(args, "collective", None), getattr(args, "payload", None), args.step_timeout,
                       args.join_timeout, args.lost_timeout, _curve(args, role, address) if address else None)


def _curve(args, role: str, address: str):
    from tpi.comm.security import LOCAL_HOSTS, Curve, KeyPair, check_public_key
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


def _model(name: str | None) -> str:
    """--model: a folder or a .gguf file; "embedded-gguf": the embedded model's GGUF file as shipped;
    none: the embedded model converted to float32."""
    if name == "embedded-gguf":
        from tpi.embedded import gguf_path

        return str(gguf_path())
    return name or _embedded_model()


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
          f"{'stall ms/tok':>12} {'allreduce ms/tok':>16} {'read MB/tok':>11} {'weights MB':>10} format",
          file=sys.stderr)
    for r in records:
        print(f"{r.rank:>4} {r.peak_rss_bytes / 1e6:>11.0f} {r.pinned_blocks:>6} {r.streamed_blocks:>8} "
              f"{r.window:>6} {1000 * r.compute_s / n:>14.1f} {1000 * r.stall_s / n:>12.1f} "
              f"{1000 * r.allreduce_s / n:>16.1f} {r.bytes_read / 1e6 / n:>11.1f} {r.weight_bytes / 1e6:>10.1f} "
              f"{r.weight_format or 'float'}", file=sys.stderr)


def _messages(system: str | None, prompt: str) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": prompt}]


def _print_timing(done: dict) -> None:
    n = len(done["ids"])
    ms = 1000 * done["decode_s"] / (n - 1) if n > 1 else float("nan")
    print(f"[{n} tokens, {done['finish_reason']}; TTFT {1000 * done['ttft_s']:.0f} ms, "
          f"{ms:.1f} ms/token]", file=sys.stderr)


def cmd_split(args) -> None:
    from tpi.split import split

    m = split(args.model_dir, args.out_dir, args.world_size, args.ratios, args.dtype, progress=sys.stderr.isatty(),
              quant=quant(args))
    total = sum(f["size"] for f in m["files"].values())
    fmt = m.get("quant", {}).get("format", m["dtype"])
    print(f"wrote {len(m['files'])} block files ({total / 1e6:.1f} MB, {fmt}) and manifest.json to {args.out_dir}")


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
    model = _model(args.model)
    t0 = time.perf_counter()
    q = quant(args)
    with LocalCluster(model, args.world_size, args.ratios, args.dtype, quant=q.name, group_size=q.group_size,
                      quant_head=q.head, progress=True, options=rank_options(args),
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

    model = None if args.shards else _model(args.model)
    serve(ServeOptions(model, args.shards, args.world_size, args.ratios, args.dtype, args.host, args.port,
                       args.wait_for_workers, args.bind, args.api_key, args.model_name, args.queue_size,
                       rank_options(args),
                       comm_options(args, "master", args.bind if args.wait_for_workers else None), quant(args)))


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
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in MASTER_PACKAGES:
            raise
        raise SystemExit(f"tpi {args.command}: needs {e.name}, one of the master's packages (this machine installed "
                         f"a worker's): pip install 'tpi[master]'") from None
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
