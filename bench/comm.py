"""One allreduce of a hidden-state vector on loopback: tpi's star, ring, tree, gloo and a bare star.

For each world size, every rank is its own spawned process with 1 torch thread (common.spawn_ranks),
and every collective lives in those same processes at once: tpi's star (``Hub``/``Spoke`` from
tpi/comm/hub.py and spoke.py, used as a library, as the cluster uses them), the ring and the tree
(tpi/comm/ring.py, tree.py), torch.distributed's gloo (tpi/comm/gloo.py), and a bare pyzmq
star (ROUTER/DEALER, raw float32 bytes, no header, no checks, numpy sum in rank order): the
floor our star is measured against, given a numpy array and returning one; `bare_torch` is the
same bare star called as tpi's collectives are, with a torch tensor in and a torch tensor out.
After `--warmup` calls of each, the (collective, size) pairs are interleaved call by call
(common.rounds, without a settle pause), `--rounds` x `--iters` iterations of one call each, in a
new random order every iteration (the same on every rank), so that this shared machine's drifts and
bursts hit all alike and no collective always follows the same one.
Rank 0 times each call; the table quotes the median and p99 and each collective's median over
the bare star's.

Also fits the loopback link's alpha (one-way time) and bandwidth from ping-pong round trips of
64 B and 1 MiB between ranks 0 and 1 (bare sockets), and shows what tpi/comm/cost.py's model
would pick (`auto`) beside the fastest measured.

Writes the table to stdout and bench/out/comm.md, and bench/out/comm.png (median latency against
world size, one panel per vector size). Does not know: the model, the cluster.

    python bench/comm.py                      # world sizes 2,3,4,8; 2048 and 8192 values
    python bench/comm.py --quick              # smoke run
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from common import OUT_DIR, RankLink, rounds, save_plot, spawn_ranks, table, write_report

ALGOS = ("bare", "bare_torch", "star", "ring", "tree", "gloo")
TIMEOUT_MS = 60_000


class BareStar:
    """The floor: rank 0 ROUTER, workers DEALER; raw float32 bytes, no header, no validation."""

    def __init__(self, rank: int, world_size: int):
        import zmq

        self.rank, self.world_size = rank, world_size
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER if rank == 0 else zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVTIMEO, TIMEOUT_MS)
        self.address = ""
        if rank == 0:
            self.sock.bind("tcp://127.0.0.1:0")
            self.address = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        else:
            self.sock.setsockopt(zmq.IDENTITY, b"%d" % rank)
        self.idents: list[bytes] = []

    def connect(self, address: str) -> None:
        if self.rank == 0:
            self.idents = sorted((self.sock.recv_multipart()[0] for _ in range(self.world_size - 1)), key=int)
            for ident in self.idents:
                self.sock.send_multipart([ident, b"ok"])
        else:
            self.sock.connect(address)
            self.sock.send(b"hi")
            self.sock.recv()

    def all_reduce(self, x: np.ndarray) -> np.ndarray:
        if self.rank:
            self.sock.send(x)
            return np.frombuffer(self.sock.recv(), dtype=np.float32)
        got = {}
        for _ in range(self.world_size - 1):
            ident, data = self.sock.recv_multipart(copy=False)
            got[ident.bytes] = data
        acc = x.copy()
        for ident in self.idents:  # rank order
            acc += np.frombuffer(got[ident].buffer, dtype=np.float32)
        for ident in self.idents:
            self.sock.send_multipart([ident, acc])
        return acc

    def roundtrip(self, nbytes: int) -> float:
        """Rank 0: send nbytes to rank 1 and wait for them back."""
        data = bytes(nbytes)
        t0 = time.perf_counter()
        self.sock.send_multipart([self.idents[0], data])
        self.sock.recv_multipart(copy=False)
        return time.perf_counter() - t0

    def echo(self) -> None:
        """Rank 1: send back what comes until an empty message."""
        while True:
            data = self.sock.recv(copy=False)
            if len(data) == 0:
                return
            self.sock.send(data, copy=False)

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


class Ranks:
    """Every collective of one rank, built and connected in the same order on every rank."""

    def __init__(self, rank: int, world_size: int, sizes: list[int], algos: list[str]):
        from tpi.comm.gloo import GlooAllReduce
        from tpi.comm.hub import Hub
        from tpi.comm.ring import RingAllReduce
        from tpi.comm.tree import TreeAllReduce

        self.rank, self.world_size, self.algos = rank, world_size, algos
        self.bare = BareStar(rank, world_size)
        self.ring = RingAllReduce(rank, world_size) if "ring" in algos else None
        self.tree = TreeAllReduce(rank, world_size) if "tree" in algos else None
        self.gloo = GlooAllReduce(rank, world_size) if "gloo" in algos else None
        self.stars: dict[int, object] = {}
        for size in sizes if "star" in algos and rank == 0 else []:
            self.stars[size] = Hub("tcp://127.0.0.1:0", world_size, "bench", size, torch.float32, 1)
        self._sizes = sizes

    def addresses(self) -> dict[str, str]:
        out = {"bare": self.bare.address}
        out.update({f"star{s}": m.address for s, m in self.stars.items()})
        for name in ("ring", "tree", "gloo"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name).address
        return out

    def connect(self, addresses: list[dict[str, str]]) -> None:
        from tpi.comm.spoke import Spoke

        self.bare.connect(addresses[0]["bare"])
        for size in self._sizes if "star" in self.algos else []:
            if self.rank == 0:
                self.stars[size].wait_for_workers(60)
            else:
                worker = Spoke(addresses[0][f"star{size}"], self.rank, self.world_size, "bench", size,
                               torch.float32, 1)
                worker.join(60)
                self.stars[size] = worker
        for name in ("ring", "tree", "gloo"):
            if getattr(self, name) is not None:
                getattr(self, name).connect([a[name] for a in addresses])
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")  # bare_torch's sum

    def call(self, algo: str, size: int):
        """(run, reset): `run(i)` makes one allreduce of `algo` at `size` values; `reset()`, untimed,
        puts the partial's values back (the star sums a float32 partial in place, as the model's
        fresh partials may be; every collective gets the same reset, so the same cache state)."""
        from tpi.comm.wire import Tag

        gen = torch.Generator().manual_seed(self.rank)
        template = torch.randn(1, size, generator=gen)  # [1, D]: one token's hidden state
        partial = template.clone()
        reset = lambda: partial.copy_(template)  # noqa: E731
        if algo == "bare":
            x = partial.numpy().reshape(-1)
            return (lambda i: self.bare.all_reduce(x)), reset
        if algo == "bare_torch":  # the same, from and to torch tensors as the model's allreduce is
            return (lambda i: torch.from_numpy(self.bare.all_reduce(partial.numpy().reshape(-1))).view(1, size)), reset
        comm = self.stars[size] if algo == "star" else getattr(self, algo)
        return (lambda i: comm.all_reduce(partial, Tag(1, i, 0, 0))), reset

    def close(self) -> None:
        for c in [*self.stars.values(), self.ring, self.tree, self.gloo, self.bare]:
            if c is not None:
                c.close()


def rank_main(rank: int, world_size: int, spec: dict, link: RankLink) -> dict | None:
    """A spawned rank (common.spawn_ranks): build everything, exchange addresses, measure; rank 0
    returns its times and the loopback link's fit."""
    ranks = Ranks(rank, world_size, spec["sizes"], spec["algos"])
    try:
        ranks.connect(link.allgather(ranks.addresses()))
        fit = measure_loopback(ranks)
        times = run_schedule(ranks, spec)
    finally:
        ranks.close()
    return {"times": times, "link": fit} if rank == 0 else None


def measure_loopback(ranks: Ranks) -> tuple[float, float] | None:
    from tpi.comm.cost import measure_link

    bare = ranks.bare
    if ranks.rank == 0:
        link = measure_link(bare.roundtrip)
        bare.sock.send_multipart([bare.idents[0], b""])
        for ident in bare.idents:  # the others wait for this, so that nothing else reaches rank 0 meanwhile
            bare.sock.send_multipart([ident, b"go"])
        return link.alpha_s, link.bandwidth
    if ranks.rank == 1:
        bare.echo()
    bare.sock.recv()
    return None


def run_schedule(ranks: Ranks, spec: dict) -> dict[str, list[float]]:
    """Every (collective, size) warmed up, then interleaved call by call: each iteration runs one
    allreduce of each, in a fresh random order (common.rounds, seeded alike on every rank, no
    settle pause), so that this shared machine's drifts and bursts fall on all of them alike (a
    paired comparison, not one block after another) and each follows every other equally often."""
    runs = {f"{a}/{s}": timed_call(*ranks.call(a, s)) for s in spec["sizes"] for a in spec["algos"]}
    return rounds(runs, spec["rounds"] * spec["iters"], warmup=spec["warmup"], settle_s=0.0, seed=1234)


def timed_call(fn, reset) -> Callable[[], float]:
    """Seconds of one call of `fn` (its step index counting up), the partial restored after, untimed."""
    step = iter(range(1 << 62))

    def run() -> float:
        i = next(step)
        t0 = time.perf_counter()
        fn(i)
        seconds = time.perf_counter() - t0
        reset()
        return seconds

    return run


def bench_world(world_size: int, spec: dict) -> dict:
    """Rank 0's times and link fit for one world size."""
    return spawn_ranks(rank_main, world_size, spec, threads=1, pin=spec["pin"])[0]


# -- report ------------------------------------------------------------------------------------
def summarize(results: dict[int, dict], args: argparse.Namespace) -> list[dict]:
    from tpi.comm.cost import Link, choose, predict

    rows = []
    for world, res in results.items():
        link = Link(*res["link"])
        for size in args.sizes:
            row = {"world": world, "size": size}
            for algo in args.algos:
                t = np.array(res["times"][f"{algo}/{size}"]) * 1e6
                row[algo] = (float(np.median(t)), float(np.percentile(t, 99)))
            zmq_algos = [a for a in ("star", "ring", "tree") if a in args.algos]
            row["model"] = choose(world, 4 * size, link)
            row["predicted"] = {a: predict(a, world, 4 * size, link) * 1e6 for a in ("star", "ring", "tree")}
            row["fastest"] = min(zmq_algos, key=lambda a: row[a][0]) if zmq_algos else "-"
            rows.append(row)
    return rows


def comm_table(rows: list[dict], args: argparse.Namespace, links: dict[int, tuple[float, float]]) -> str:
    both = "star" in args.algos and "bare_torch" in args.algos
    cols = ["ranks", "values"]
    for a in args.algos:
        cols += [f"{a} median (p99) µs"] + ([] if a == "bare" else [f"{a}/bare"])
    cols += (["star/bare_torch"] if both else []) + ["model picks", "fastest of star/ring/tree"]
    cells = []
    for r in rows:
        row = [r["world"], r["size"]]
        for a in args.algos:
            med, p99 = r[a]
            row.append(f"{med:.0f} ({p99:.0f})")
            if a != "bare":
                row.append(f"{med / r['bare'][0]:.2f}x" if "bare" in args.algos else "-")
        if both:
            row.append(f"{r['star'][0] / r['bare_torch'][0]:.2f}x")
        cells.append(row + [r["model"], r["fastest"]])
    cores = os.cpu_count()
    pinning = f"rank r pinned to core r mod {cores}" if args.pin else "ranks not pinned"
    notes = [
        "",
        f"Loopback, {platform.processor() or platform.machine()}, {cores} cores, torch {torch.__version__}, "
        f"1 torch thread per rank, {pinning}; {args.rounds * args.iters} timed allreduces per cell (after "
        f"{args.warmup} warm-up), all cells interleaved call by call in a new random order every iteration; rank "
        "0's time per call.",
        f"World sizes above {cores} oversubscribe this machine's {cores} cores: every hop then waits for the "
        "scheduler, which punishes the collectives with more sequential hops (ring: 2(N-1), tree: 2 log2 N) "
        "far more than it would on separate devices.",
        "Loopback link fitted from ping-pong (64 B, 1 MiB) between ranks 0 and 1: " + "; ".join(
            f"N={w}: alpha {a * 1e6:.0f} µs, {b / 1e9:.2f} GB/s" for w, (a, b) in links.items()),
        "`model picks` is tpi/comm/cost.py's `auto` choice for that link (float32 payload).",
    ]
    return "\n".join([table(cols, cells), *notes])


def plot(rows: list[dict], args: argparse.Namespace, path: Path) -> bool:
    """Median latency against world size, one panel per vector size."""
    def draw(axes: list) -> None:
        for ax, size in zip(axes, args.sizes):
            sel = [r for r in rows if r["size"] == size]
            for algo in args.algos:
                ax.plot([r["world"] for r in sel], [r[algo][0] for r in sel], marker="o", label=algo)
            ax.set(title=f"allreduce of {size} float32 values (loopback)", xlabel="world size",
                   ylabel="median µs per allreduce", yscale="log")
            ax.set_xticks(sorted({r["world"] for r in sel}))
            ax.grid(alpha=0.3)
            ax.legend()

    return save_plot(path, draw, panels=len(args.sizes), panel_size=(6, 4.5))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worlds", default="2,3,4,8", help="world sizes (default %(default)s)")
    p.add_argument("--sizes", default="2048,8192", help="float32 values per allreduce (default %(default)s)")
    p.add_argument("--algos", default=",".join(ALGOS), help="collectives (default %(default)s)")
    p.add_argument("--iters", type=int, default=200, help="timed allreduces per cell and round")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-pin", dest="pin", action="store_false",
                   help="let the OS place the ranks (default: rank r on core r mod cores, with its I/O thread)")
    p.add_argument("--quick", action="store_true", help="world sizes 2,3; 50 iterations; 1 round")
    p.add_argument("--out", type=Path, default=OUT_DIR)
    args = p.parse_args(argv)
    if args.quick:
        args.worlds, args.iters, args.warmup, args.rounds = "2,3", 50, 5, 1
    args.worlds = [int(w) for w in args.worlds.split(",")]
    args.sizes = [int(s) for s in args.sizes.split(",")]
    args.algos = [a for a in args.algos.split(",") if a]
    unknown = set(args.algos) - set(ALGOS)
    if unknown or min(args.worlds) < 2:
        p.error(f"unknown collectives {sorted(unknown)} or a world size below 2")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    spec = {"sizes": args.sizes, "algos": args.algos, "iters": args.iters, "warmup": args.warmup,
            "rounds": args.rounds, "pin": args.pin}
    results = {}
    for world in args.worlds:
        t0 = time.monotonic()
        results[world] = bench_world(world, spec)
        print(f"world size {world}: {time.monotonic() - t0:.0f}s", file=sys.stderr)
    rows = summarize(results, args)
    text = comm_table(rows, args, {w: r["link"] for w, r in results.items()})
    print(text)
    write_report(args.out, "comm.md", text)
    plot(rows, args, args.out / "comm.png")


if __name__ == "__main__":
    main()
