"""Communication during real generation: the embedded SmolLM2-135M on 3 ranks, beside the floor.

Three parts, each a table:
1. Loopback, every collective (star, ring, tree, gloo): decode-time communication per token, as the
   ranks count it (``LocalCluster.stats()``: each rank's seconds inside ``all_reduce``), against the
   floor 2 x layers x (one bare-star allreduce of one token's hidden state), the bare star being
   bench/comm.py's (3 spawned processes, raw float32, no header, no checks), measured in the same run.
   Decode only: the difference between a generation of --tokens tokens and one of 1 token (same
   prompt, same prefill), over tokens - 1. A rank's time in all_reduce includes waiting for the
   other ranks' compute; the rank that arrives last waits least, so the table gives rank 0's time
   and the smallest over the ranks (the closest to pure communication).
2. Payloads (star, 3 ranks): float32, float16, bfloat16, q8, q8_64 against transformers' float32
   model: the largest logit error over a prompt's positions relative to the logits' scale, and
   greedy token agreement (tokens equal to transformers' at the same position; first divergence).
3. With --emulate (root, iproute2; what `tpi emulate` runs): the star on 3 network namespaces at
   1 and 5 ms one-way delay (1 Gbit/s): rank 0's allreduce time per decoded token against the floor
   2 x layers x (round trip + bytes / bandwidth), the round trip measured between two namespaces and
   bytes = a partial up and the sum back (2 x hidden x 4).

Every rank runs 1 torch thread; on one machine the ranks share its cores. All clusters of part 1
are alive at once and each round visits them in a rotating order. Writes bench/out/comm_generation.md.

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
import time
from contextlib import ExitStack
from pathlib import Path

import torch

OUT_DIR = Path(__file__).resolve().parent / "out"
COLLECTIVES = ("star", "ring", "tree", "gloo")
PAYLOADS = ("float32", "float16", "bfloat16", "q8", "q8_64")
MESSAGES = [{"role": "user", "content": "Write a short story about a lighthouse keeper and a storm."}]


def bare_floor_s(hidden: int, world: int, rounds: int) -> float:
    """Median seconds of one bare-star allreduce of `hidden` float32 values over `world` processes."""
    from comm import bench_world  # bench/comm.py

    spec = {"sizes": [hidden], "algos": ["bare"], "iters": 200, "warmup": 20, "rounds": rounds}
    times = bench_world(world, spec)["times"][f"bare/{hidden}"]
    return statistics.median(times)


def decode_comm(cluster, ids: list[int], tokens: int) -> tuple[list[float], float]:
    """(per rank: seconds in all_reduce per decoded token, decode seconds per token)."""
    s0 = cluster.stats()
    full = cluster.generate_full(ids, tokens, ignore_eos=True)
    s1 = cluster.stats()
    cluster.generate_full(ids, 1, ignore_eos=True)
    s2 = cluster.stats()
    per_rank = [((b["allreduce_s"] - a["allreduce_s"]) - (c["allreduce_s"] - b["allreduce_s"])) / (tokens - 1)
                for a, b, c in zip(s0, s1, s2)]
    return per_rank, full["decode_s"] / (tokens - 1)


def part_loopback(args, path: Path, ids: list[int], cfg: dict) -> str:
    from tpi import LocalCluster

    layers, hidden, world = cfg["num_hidden_layers"], cfg["hidden_size"], args.world_size
    floor = bare_floor_s(hidden, world, args.rounds)
    rows: dict[str, dict[str, list[float]]] = {c: {"r0": [], "min": [], "tok": []} for c in args.collectives}
    with ExitStack() as stack:
        clusters = {c: stack.enter_context(LocalCluster(path, world_size=world, collective=c,
                                                        cache_dir=args.cache_dir)) for c in args.collectives}
        for c in clusters.values():
            c.generate_full(ids, 4, ignore_eos=True)  # warm-up
        names = list(clusters)
        for rnd in range(args.rounds):
            for name in names[rnd % len(names):] + names[:rnd % len(names)]:
                per_rank, tok = decode_comm(clusters[name], ids, args.tokens)
                rows[name]["r0"].append(per_rank[0])
                rows[name]["min"].append(min(per_rank))
                rows[name]["tok"].append(tok)
                print(f"round {rnd + 1} {name}: comm {1000 * per_rank[0]:.1f} ms/token (rank 0)", file=sys.stderr)
    floor_tok = 2 * layers * floor
    med = statistics.median
    lines = [f"## 1. Loopback, {world} ranks: communication per decoded token (floor {1000 * floor_tok:.2f} ms = 2 x "
             f"{layers} layers x {1e6 * floor:.0f} µs, one bare-star allreduce of {hidden} float32)", "",
             "| collective | ms/token (decode) | comm ms/token, rank 0 | comm ms/token, least rank | least / floor |",
             "|---|---:|---:|---:|---:|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {1000 * med(r['tok']):.1f} | {1000 * med(r['r0']):.2f} | {1000 * med(r['min']):.2f} "
                     f"| {med(r['min']) / floor_tok:.2f}x |")
    return "\n".join(lines)


def part_payloads(args, path: Path, ids: list[int], model) -> str:
    from tpi import LocalCluster

    with torch.no_grad():
        ref_logits = model(torch.tensor([ids])).logits[0]
        ref = model.generate(torch.tensor([ids]), max_new_tokens=args.tokens, min_new_tokens=args.tokens,
                             do_sample=False)[0, len(ids):].tolist()
    scale = ref_logits.abs().max().item()
    lines = [f"## 2. Payloads (star, 3 ranks): logits over a {len(ids)}-token prompt and {args.tokens} greedy tokens "
             "against transformers (float32)", "",
             "| payload | bytes per partial | max logit error / scale | mean logit error | greedy tokens equal "
             "| first divergence |", "|---|---:|---:|---:|---:|---:|"]
    from tpi.comm.payload import parse

    for name in args.payloads:
        with LocalCluster(path, world_size=3, payload=None if name == "float32" else name,
                          cache_dir=args.cache_dir) as cluster:
            logits = cluster.forward(ids)
            got = cluster.generate_full(ids, args.tokens, ignore_eos=True)["ids"]
        err = (logits - ref_logits).abs()
        same = sum(a == b for a, b in zip(got, ref))
        first = next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), None)
        nbytes = parse(name).nbytes(model.config.hidden_size)
        lines.append(f"| {name} | {nbytes} | {err.max().item() / scale:.2e} | {err.mean().item():.2e} | "
                     f"{same}/{len(ref)} | {'-' if first is None else first} |")
        print(f"payload {name}: {same}/{len(ref)} tokens equal", file=sys.stderr)
    return "\n".join(lines)


def part_emulate(args, cfg: dict) -> str:
    import httpx
    from emulate import PROMPT_IDS, Probe, _metrics, _wait_ready  # bench/emulate.py

    from tpi.cluster_config import Link, parse_cluster_config
    from tpi.emulate import Emulation, check_prerequisites

    check_prerequisites()
    layers, hidden = cfg["num_hidden_layers"], cfg["hidden_size"]
    nbytes, rate = 2 * hidden * 4, "1gbit"
    ccfg = parse_cluster_config({
        "name": "bench-comm", "model": "embedded", "dtype": "float32", "join_timeout": 900,
        "master": {"port": 5555, "http_port": 8000, "threads": 1},
        "workers": [{"rank": r, "threads": 1} for r in (1, 2)], "link": {"delay": "0ms", "rate": rate}}, "bench")

    def comm_per_token(url: str, model: str) -> float:
        sums = []
        for tokens in (args.tokens, 1):
            before = _metrics(url)
            httpx.post(f"{url}/v1/completions", timeout=900, json={
                "model": model, "prompt": PROMPT_IDS, "max_tokens": tokens, "temperature": 0,
                "ignore_eos": True}).raise_for_status()
            key = ("tpi_allreduce_seconds_sum", "0")
            sums.append(_metrics(url)[key] - before.get(key, 0.0))
        return (sums[0] - sums[1]) / (args.tokens - 1)

    rows = {d: {"rtt": [], "comm": []} for d in args.delays}
    OUT_DIR.mkdir(exist_ok=True)
    with open(OUT_DIR / "comm_emulate.log", "w") as log, Emulation(ccfg, out=log) as emu:
        model = _wait_ready(emu)
        probe = Probe(emu)
        try:
            for rnd in range(args.rounds):
                for d in args.delays[rnd % len(args.delays):] + args.delays[:rnd % len(args.delays)]:
                    emu.network.set_link(Link(delay=f"{d:g}ms", rate=rate))
                    rows[d]["rtt"].append(probe.rtt_ms() / 1000)
                    rows[d]["comm"].append(comm_per_token(emu.master_url, model))
                    print(f"round {rnd + 1} delay {d} ms: comm {1000 * rows[d]['comm'][-1]:.1f} ms/token",
                          file=sys.stderr)
        finally:
            probe.close()
        how = emu.network.delay_with
    med = statistics.median
    lines = [f"## 3. `tpi emulate`, star, 3 ranks, {rate}, delay by {how}: rank 0's allreduce time per decoded token",
             "", f"floor = 2 x {layers} layers x (round trip + {nbytes} B / bandwidth)", "",
             "| one-way delay ms | round trip ms (probe) | comm ms/token | floor ms/token | comm / floor |",
             "|---:|---:|---:|---:|---:|"]
    for d, r in rows.items():
        floor = 2 * layers * (med(r["rtt"]) + nbytes * 8 / Link(rate=rate).rate_bps)
        lines.append(f"| {d:g} | {1000 * med(r['rtt']):.2f} | {1000 * med(r['comm']):.1f} | {1000 * floor:.1f} | "
                     f"{med(r['comm']) / floor:.2f}x |")
    return "\n".join(lines)


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
    OUT_DIR.mkdir(exist_ok=True)
    (OUT_DIR / "comm_generation.md").write_text(text)
    print(f"wrote {OUT_DIR / 'comm_generation.md'} in {time.monotonic() - t0:.0f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
