"""Communication during real generation: the embedded SmolLM2-135M on 3 ranks, beside the floor.

Communication is measured per allreduce from every rank's trace (tpi/comm/trace.py, turned on with
TPI_COMM_TRACE): each call's time from the moment the last rank entered it until the last rank had
the sum, which is what the collective adds to a token, whatever the ranks' compute skew (a rank's
own time inside ``all_reduce`` also holds its wait for slower ranks' compute). The sum over a
decoded token's 2 x layers allreduces is its communication time; tables quote the median token.

Three parts, each a table:
1. Loopback, every collective (star, ring, tree, gloo): communication per decoded token against
   the floor 2 x layers x (one bare-star allreduce of one token's hidden state), the bare star
   being bench/comm.py's (3 spawned processes, raw float32, no header, no checks), measured in the
   same run; and against a loaded floor: the same bare star when every rank first computes (a
   matmul) for as long as one block took it in the generation, which is what this machine's
   scheduling makes of any allreduce between computing processes. Also the decode ms/token and
   rank 0's own time inside all_reduce per token.
2. Payloads (star, 3 ranks): float32, float16, bfloat16, q8, q8_64 against transformers' float32
   model: the largest logit error over a prompt's positions relative to the logits' scale, and
   greedy token agreement (tokens equal to transformers' at the same position; first divergence).
3. With --emulate (root, iproute2; what `tpi emulate` runs): the star on 3 network namespaces at
   1 and 5 ms one-way delay (1 Gbit/s): communication per decoded token against the floor
   2 x layers x (round trip + bytes / bandwidth), the round trip measured between two namespaces and
   bytes = a partial up and the sum back (2 x hidden x 4).

Every rank runs 1 torch thread; on one machine the ranks share its cores. All clusters of part 1
are alive at once and each round visits them in a new random order (common.rounds); so does part 3
with its delays. Writes bench/out/comm_generation.md.

    python bench/comm_generation.py                 # parts 1 and 2
    python bench/comm_generation.py --emulate       # and part 3 (root)
    python bench/comm_generation.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from common import EMBEDDED_PROMPT_IDS, OUT_DIR, RankLink, rounds, spawn_ranks, table, write_report

COLLECTIVES = ("star", "ring", "tree", "gloo")
PAYLOADS = ("float32", "float16", "bfloat16", "q8", "q8_64")
MESSAGES = [{"role": "user", "content": "Write a short story about a lighthouse keeper and a storm."}]


def bare_floor_s(hidden: int, world: int, n_rounds: int) -> float:
    """Median seconds of one bare-star allreduce of `hidden` float32 values over `world` processes."""
    from comm import bench_world  # bench/comm.py

    spec = {"sizes": [hidden], "algos": ["bare"], "iters": 200, "warmup": 20, "rounds": n_rounds, "pin": False}
    times = bench_world(world, spec)["times"][f"bare/{hidden}"]
    return statistics.median(times)


def _loaded_rank(rank: int, world: int, spec: dict, link: RankLink) -> list[tuple[float, float]]:
    """A spawned rank of `loaded_floor_s`: calibrate a matmul to its block time, then compute +
    allreduce; (entry, exit) of every allreduce."""
    from comm import BareStar  # bench/comm.py

    hidden, iters = spec["hidden"], spec["iters"]
    x = torch.randn(1, hidden)
    rows = 256
    w = torch.randn(rows, hidden)
    t0 = time.perf_counter()
    for _ in range(20):
        torch.mm(x, w.T)
    rows = max(1, int(rows * spec["block_s"][rank] / ((time.perf_counter() - t0) / 20)))
    w = torch.randn(rows, hidden)  # one block's compute, as long as the model's took on this rank
    bare = BareStar(rank, world)
    try:
        bare.connect(link.allgather(bare.address)[0])
        v, times = x.numpy().reshape(-1), []
        for _ in range(iters):
            torch.mm(x, w.T)
            t0 = time.perf_counter()
            bare.all_reduce(v)
            times.append((t0, time.perf_counter()))
        return times
    finally:
        bare.close()


def loaded_floor_s(hidden: int, world: int, block_s: list[float], iters: int = 400) -> float:
    """Median seconds from the last rank's entry to the last rank's exit of a bare-star allreduce
    when, as in generation, every rank first computes for as long as one block took it
    (`block_s[rank]`): the bare star under this machine's scheduling of computing processes."""
    times = spawn_ranks(_loaded_rank, world, {"hidden": hidden, "iters": iters, "block_s": block_s}, threads=1)
    calls = [max(t[i][1] for t in times) - max(t[i][0] for t in times) for i in range(iters // 10, iters)]
    return statistics.median(calls)


@contextmanager
def traced(directory: Path):
    """Processes started inside record their allreduces to `directory` (TPI_COMM_TRACE)."""
    from tpi.comm.trace import ENV

    old = os.environ.get(ENV)
    os.environ[ENV] = str(directory)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = old


def decode_run(cluster, ids: list[int], tokens: int) -> tuple[float, float, float, list[float]]:
    """(when it began, decode seconds per token, rank 0's seconds in all_reduce per decoded token,
    each rank's compute seconds per decoded token)."""
    t0 = time.perf_counter()
    s0 = cluster.stats()
    full = cluster.generate_full(ids, tokens, ignore_eos=True)
    s1 = cluster.stats()
    cluster.generate_full(ids, 1, ignore_eos=True)  # the same prefill alone: what decoding added
    s2 = cluster.stats()

    def decode(key: str, r: int) -> float:
        a, b, c = (getattr(s[r], key) for s in (s0, s1, s2))
        return ((b - a) - (c - b)) / (tokens - 1)

    compute = [decode("compute_s", r) for r in range(len(s0))]
    return t0, full["decode_s"] / (tokens - 1), decode("allreduce_s", 0), compute


def decode_sample(cluster, ids: list[int], tokens: int) -> Callable[[], dict]:
    """One timed generation of `cluster` as a rounds run: its time window, decode s/token, rank 0's
    all_reduce s/token and every rank's compute s/token."""
    def run() -> dict:
        t0, tok, r0, compute = decode_run(cluster, ids, tokens)
        return {"window": (t0, time.perf_counter()), "tok": tok, "r0": r0, "compute": compute}

    return run


def part_loopback(args, path: Path, ids: list[int], cfg: dict) -> str:
    from tpi import LocalCluster
    from tpi.comm import trace

    layers, hidden, world = cfg["num_hidden_layers"], cfg["hidden_size"], args.world_size
    floor = bare_floor_s(hidden, world, args.rounds)
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tpi-comm-trace-")))
        live = stack.enter_context(ExitStack())  # closed first: the clusters save their traces
        runs = {}
        for c in args.collectives:
            with traced(tmp / c):
                cluster = live.enter_context(LocalCluster(path, world_size=world, collective=c,
                                                          cache_dir=args.cache_dir))
            runs[c] = decode_sample(cluster, ids, args.tokens)
        rows = rounds(runs, args.rounds, report=lambda k, name, r: print(
            f"round {k + 1} {name}: {1000 * r['tok']:.1f} ms/token", file=sys.stderr))
        live.close()
        comm = {}
        for name, samples in rows.items():
            calls = trace.per_call(trace.load(tmp / name, world))
            comm[name] = [t for r in samples for t in trace.per_token(calls, *r["window"])]
    med = statistics.median
    ref = args.collectives[0]  # the block compute the loaded floor copies: this collective's ranks'
    block_s = [med(r["compute"][k] for r in rows[ref]) / (2 * layers) for k in range(world)]
    loaded = loaded_floor_s(hidden, world, block_s)
    floor_tok, loaded_tok = 2 * layers * floor, 2 * layers * loaded
    lines = [f"## 1. Loopback, {world} ranks: communication per decoded token", "",
             f"- floor: 2 x {layers} layers x {1e6 * floor:.0f} µs (one bare-star allreduce of {hidden} float32, "
             f"nothing else running) = {1000 * floor_tok:.2f} ms",
             f"- loaded floor: 2 x {layers} layers x {1e6 * loaded:.0f} µs (the same bare star, last rank in to last "
             f"out, when each rank first computes for as long as one block took it in generation, "
             f"{', '.join(f'{1e6 * b:.0f}' for b in block_s)} µs) = {1000 * loaded_tok:.2f} ms", ""]
    cells = [[name, f"{1000 * med(r['tok'] for r in samples):.1f}", f"{1000 * med(r['r0'] for r in samples):.2f}",
              f"{1000 * med(comm[name]):.2f}", f"{med(comm[name]) / floor_tok:.2f}x",
              f"{med(comm[name]) / loaded_tok:.2f}x"] for name, samples in rows.items()]
    cols = ["collective", "ms/token (decode)", "rank 0 in all_reduce, ms/token", "comm ms/token (last in to last out)",
            "comm / floor", "comm / loaded floor"]
    return "\n".join(lines) + "\n" + table(cols, cells, "lrrrrr")


def part_payloads(args, path: Path, ids: list[int], model) -> str:
    from tpi import LocalCluster
    from tpi.comm.payload import parse

    with torch.no_grad():
        ref_logits = model(torch.tensor([ids])).logits[0]
        ref = model.generate(torch.tensor([ids]), max_new_tokens=args.tokens, min_new_tokens=args.tokens,
                             do_sample=False)[0, len(ids):].tolist()
    scale = ref_logits.abs().max().item()
    cells = []
    for name in args.payloads:
        with LocalCluster(path, world_size=3, payload=None if name == "float32" else name,
                          cache_dir=args.cache_dir) as cluster:
            logits = cluster.forward(ids)
            got = cluster.generate_full(ids, args.tokens, ignore_eos=True)["ids"]
        err = (logits - ref_logits).abs()
        same = sum(a == b for a, b in zip(got, ref))
        first = next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), None)
        cells.append([name, parse(name).nbytes(model.config.hidden_size), f"{err.max().item() / scale:.2e}",
                      f"{err.mean().item():.2e}", f"{same}/{len(ref)}", "-" if first is None else first])
        print(f"payload {name}: {same}/{len(ref)} tokens equal", file=sys.stderr)
    title = (f"## 2. Payloads (star, 3 ranks): logits over a {len(ids)}-token prompt and {args.tokens} greedy tokens "
             "against transformers (float32)")
    cols = ["payload", "bytes per partial", "max logit error / scale", "mean logit error", "greedy tokens equal",
            "first divergence"]
    return f"{title}\n\n{table(cols, cells, 'lrrrrr')}"


def part_emulate(args, cfg: dict) -> str:
    from emulate import Probe, wait_ready  # bench/emulate.py

    from tpi.cluster_config import Link, parse_cluster_config
    from tpi.comm import trace
    from tpi.emulate import Emulation, check_prerequisites

    check_prerequisites()
    layers, hidden = cfg["num_hidden_layers"], cfg["hidden_size"]
    nbytes, rate = 2 * hidden * 4, "1gbit"
    ccfg = parse_cluster_config({
        "name": "bench-comm", "model": "embedded", "dtype": "float32", "join_timeout": 900,
        "master": {"port": 5555, "http_port": 8000, "threads": 1},
        "workers": [{"rank": r, "threads": 1} for r in (1, 2)], "link": {"delay": "0ms", "rate": rate}}, "bench")
    OUT_DIR.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tpi-comm-trace-") as tmp:
        with traced(Path(tmp)), open(OUT_DIR / "comm_emulate.log", "w") as log, Emulation(ccfg, out=log) as emu:
            model = wait_ready(emu)
            probe = Probe(emu)
            try:
                runs = {d: emulated_sample(emu, model, probe, Link(delay=f"{d:g}ms", rate=rate), args.tokens)
                        for d in args.delays}
                runs[args.delays[0]]()  # one warm-up generation for all delays
                rows = rounds(runs, args.rounds, warmup=0, report=lambda k, d, _: print(
                    f"round {k + 1} delay {d:g} ms done", file=sys.stderr))
            finally:
                probe.close()
            how = emu.network.delay_with
        calls = trace.per_call(trace.load(tmp, 3))  # saved as the ranks stopped
    med = statistics.median
    cells = []
    for d, samples in rows.items():
        rtt = med(r["rtt"] for r in samples)
        comm = med([t for r in samples for t in trace.per_token(calls, *r["window"])])
        floor = 2 * layers * (rtt + nbytes * 8 / Link(rate=rate).rate_bps)
        cells.append([f"{d:g}", f"{1000 * rtt:.2f}", f"{1000 * comm:.1f}", f"{1000 * floor:.1f}",
                      f"{comm / floor:.2f}x"])
    title = (f"## 3. `tpi emulate`, star, 3 ranks, {rate}, delay by {how}: communication per decoded token "
             f"(last in to last out)\n\nfloor = 2 x {layers} layers x (round trip + {nbytes} B / bandwidth)")
    cols = ["one-way delay ms", "round trip ms (probe)", "comm ms/token", "floor ms/token", "comm / floor"]
    return f"{title}\n\n{table(cols, cells, 'rrrrr')}"


def emulated_sample(emu, model: str, probe, link, tokens: int) -> Callable[[], dict]:
    """A rounds run of part 3: the links reshaped to `link`, the probe's round trip (s), then one
    generation of `tokens` tokens through the HTTP API and its window on the traces' clock."""
    import httpx

    def run() -> dict:
        emu.network.set_link(link)
        rtt = probe.rtt_ms() / 1000
        t0 = time.perf_counter()
        httpx.post(f"{emu.master_url}/v1/completions", timeout=900, json={
            "model": model, "prompt": EMBEDDED_PROMPT_IDS, "max_tokens": tokens, "temperature": 0,
            "ignore_eos": True}).raise_for_status()
        return {"rtt": rtt, "window": (t0, time.perf_counter())}

    return run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=24, help="new tokens per generation (default %(default)s)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--collectives", default=",".join(COLLECTIVES))
    p.add_argument("--payloads", default=",".join(PAYLOADS))
    p.add_argument("--world-size", type=int, default=3, help="ranks in part 1 (default %(default)s)")
    p.add_argument("--skip-payloads", action="store_true", help="leave part 2 out")
    p.add_argument("--emulate", action="store_true", help="part 3: needs root and iproute2")
    p.add_argument("--delays", default="1,5", help="one-way delays in ms for --emulate (default %(default)s)")
    p.add_argument("--cache-dir", help="where the per-world-size splits are kept (default: tpi's cache)")
    p.add_argument("--quick", action="store_true", help="8 tokens, 1 round, star and ring, float32 and q8")
    args = p.parse_args(argv)
    if args.quick:
        args.tokens, args.rounds, args.collectives, args.payloads = 8, 1, "star,ring", "float32,q8"
    args.collectives = args.collectives.split(",")
    args.payloads = args.payloads.split(",")
    args.delays = [float(d) for d in args.delays.split(",")]
    return args


def main(argv: list[str] | None = None) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tpi.embedded import default_model_dir

    args = parse_args(argv)
    torch.set_num_threads(1)
    path = default_model_dir()
    cfg = json.loads((path / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(path)
    ids = list(tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    head = (f"# Communication during generation: SmolLM2-135M ({cfg['num_hidden_layers']} layers, hidden "
            f"{cfg['hidden_size']}, float32)\n\n{platform.node()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"1 torch thread per rank; {args.tokens} tokens per generation, medians of {args.rounds} rounds.")
    t0 = time.monotonic()
    parts = [head, part_loopback(args, path, ids, cfg)]
    if not args.skip_payloads:
        parts.append(part_payloads(args, path, ids, model))
    parts.append(part_emulate(args, cfg) if args.emulate else
                 "## 3. `tpi emulate`: not measured in this run (pass --emulate; needs root)")
    text = "\n\n".join(parts) + "\n"
    print(text)
    write_report(OUT_DIR, "comm_generation.md", text)
    print(f"{time.monotonic() - t0:.0f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
