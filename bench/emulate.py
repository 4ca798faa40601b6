"""ms/token of 3 ranks of the embedded model under `tpi emulate`, across link delays and rates,
beside the network's floor.

One emulated cluster (``tpi.emulate.Emulation``, what `tpi emulate` runs) serves the whole sweep:
its links are reshaped between measurements (``Network.set_link``), and each round visits every
(rate, delay) setting once, in a new random order each round (common.rounds), so that the
machine's slow drifts hit every setting alike. Per setting and round:
- a probe: a 2304-byte message from rank 0's namespace to rank 1's and a 2304-byte answer, over
  TCP, the median of 30: what one allreduce's traffic costs on the emulated links, no compute;
- one greedy generation of --tokens tokens through the master's HTTP API (ignore_eos). ms/token
  is the server's own time between tokens (the change of the tpi_time_per_output_token_seconds
  histogram over the request: decode only, prefill excluded), and the allreduce time per call is
  rank 0's (tpi_allreduce_seconds).
The table quotes medians over --rounds rounds, after one warm-up generation.

The floor: two allreduces per layer, each at least a round trip and its bytes at the link rate,
    floor = 2 x layers x (2 x delay + bytes x 8 / rate),
bytes = 2 x hidden x 4 = 4608 for one token in float32: a rank's partial (hidden x 4 bytes) up to
the master and the sum (as many bytes) back. Not counted: headers, compute, and the star's fan-in
(the master's link carries world_size - 1 partials in and as many sums out, so at a low rate a star
pays more than this floor).

Every rank runs 1 torch thread; the ranks share this machine's cores, so compute adds alike to every
setting, and measured/floor shows how much of a token is network.

    python bench/emulate.py              # full sweep (needs root and iproute2), about 10 minutes
    python bench/emulate.py --quick      # smoke run

Writes the table to stdout and bench/out/emulate.md, and bench/out/emulate.png. Does not know:
tpi's internals beyond `tpi emulate` and the HTTP API.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
from common import EMBEDDED_PROMPT_IDS, OUT_DIR, rounds, save_plot, table, write_report
from prometheus_client.parser import text_string_to_metric_families

from tpi.cluster_config import Link, parse_cluster_config
from tpi.emulate import Emulation, check_prerequisites

PROBE_PORT, PROBE_BYTES, PROBE_REPS = 7000, 2304, 30
ECHO = """
import socket, sys
s = socket.create_server((sys.argv[1], int(sys.argv[2])))
while True:
    c, _ = s.accept()
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with c:
        while (d := c.recv(1 << 16)):
            c.sendall(d)
"""
PING = """
import socket, statistics, sys, time
n, reps = int(sys.argv[3]), int(sys.argv[4])
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
times = []
for _ in range(reps):
    t = time.perf_counter()
    c.sendall(b"x" * n)
    got = 0
    while got < n:
        got += len(c.recv(1 << 16))
    times.append(time.perf_counter() - t)
print(statistics.median(times))
"""


@dataclass
class Row:
    rate: str
    delay_ms: float
    layers: int
    hidden: int
    probe_ms: list[float]
    allreduce_ms: list[float]
    ms_per_token: list[float]

    @property
    def bytes_per_allreduce(self) -> int:
        return 2 * self.hidden * 4

    @property
    def floor_ms(self) -> float:
        rate_bps = Link(rate=self.rate).rate_bps
        return 2 * self.layers * (2 * self.delay_ms + 1000 * self.bytes_per_allreduce * 8 / rate_bps)


def _metrics(url: str) -> dict[tuple[str, str | None], float]:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {(s.name, s.labels.get("rank")): s.value for fam in text_string_to_metric_families(text)
            for s in fam.samples}


def _generate(url: str, model: str, tokens: int) -> tuple[float, float]:
    """(decode ms/token, rank 0's ms per allreduce) of one greedy generation."""
    before = _metrics(url)
    r = httpx.post(f"{url}/v1/completions", timeout=600, json={
        "model": model, "prompt": EMBEDDED_PROMPT_IDS, "max_tokens": tokens, "temperature": 0, "ignore_eos": True})
    r.raise_for_status()
    after = _metrics(url)

    def delta(name: str, rank: str | None = None) -> float:
        return after[(name, rank)] - before.get((name, rank), 0.0)

    ms_tok = 1000 * delta("tpi_time_per_output_token_seconds_sum") / delta("tpi_time_per_output_token_seconds_count")
    ms_ar = 1000 * delta("tpi_allreduce_seconds_sum", "0") / delta("tpi_allreduce_seconds_count", "0")
    return ms_tok, ms_ar


class Probe:
    """An echo server in one namespace; `rtt_ms` pings it from another."""

    def __init__(self, emu: Emulation):
        server, client = emu.network.nodes[1], emu.network.nodes[0]
        self.address, self.client_ns = server.address, client.netns
        self.server = subprocess.Popen(["ip", "netns", "exec", server.netns, sys.executable, "-c", ECHO,
                                        server.address, str(PROBE_PORT)])

    def rtt_ms(self) -> float:
        deadline = time.monotonic() + 20
        while True:
            res = subprocess.run(["ip", "netns", "exec", self.client_ns, sys.executable, "-c", PING, self.address,
                                  str(PROBE_PORT), str(PROBE_BYTES), str(PROBE_REPS)],
                                 capture_output=True, text=True, timeout=120)
            if res.returncode == 0:
                return 1000 * float(res.stdout)
            if time.monotonic() > deadline:  # the first call may come before the server listens
                raise RuntimeError(f"probe failed: {res.stderr.strip()}")
            time.sleep(0.2)

    def close(self) -> None:
        self.server.kill()
        self.server.wait(10)


def wait_ready(emu: Emulation, timeout: float = 900) -> str:
    """Poll /health until every worker has joined (they fetch their shards first); the model id."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if emu.wait(0) is not None:
            raise RuntimeError("a rank exited before the cluster formed: see bench/out/emulate.log")
        try:
            if httpx.get(f"{emu.master_url}/health", timeout=2).status_code == 200:
                return httpx.get(f"{emu.master_url}/v1/models", timeout=10).json()["data"][0]["id"]
        except httpx.HTTPError:
            pass
        time.sleep(1)  # polling a port that is not open yet: nothing to wait on
    raise RuntimeError(f"the emulated cluster did not answer within {timeout:.0f}s")


def run(args: argparse.Namespace) -> tuple[list[Row], str]:
    """The rows in setting order, and how the delays were applied (netem or the delay proxy)."""
    from tpi.embedded import default_model_dir

    hf = json.loads((default_model_dir() / "config.json").read_text())
    settings = [(rate, d) for rate in args.rates for d in args.delays]
    rows = {s: Row(s[0], s[1], hf["num_hidden_layers"], hf["hidden_size"], [], [], []) for s in settings}
    cfg = parse_cluster_config({
        "name": "bench-emulate", "model": "embedded", "dtype": "float32", "join_timeout": 900,
        "master": {"port": 5555, "http_port": 8000, "threads": 1},
        "workers": [{"rank": r, "threads": 1} for r in range(1, args.world_size)],
        "link": {"delay": "0ms", "rate": args.rates[0]}}, "bench")
    OUT_DIR.mkdir(exist_ok=True)
    with open(OUT_DIR / "emulate.log", "w") as log, Emulation(cfg, out=log) as emu:
        print(emu.describe(), flush=True)
        model = wait_ready(emu)
        probe = Probe(emu)
        try:
            _generate(emu.master_url, model, args.tokens)  # one warm-up generation for all settings
            runs = {s: setting_run(emu, model, probe, rows[s], args.tokens) for s in settings}
            rounds(runs, args.rounds, warmup=0, report=lambda k, s, _: print(
                f"round {k + 1}/{args.rounds} {s[0]:>8} {s[1]:g} ms: {rows[s].ms_per_token[-1]:7.1f} ms/token, "
                f"allreduce {rows[s].allreduce_ms[-1]:.2f} ms, probe {rows[s].probe_ms[-1]:.2f} ms", flush=True))
        finally:
            probe.close()
        delay_with = {"netem": "netem", "proxy": "tpi's delay proxy (no netem here)"}.get(emu.network.delay_with,
                                                                                        "nothing (no delay)")
    return [rows[s] for s in settings], delay_with


def setting_run(emu: Emulation, model: str, probe: Probe, row: Row, tokens: int) -> Callable[[], None]:
    """A rounds run of one setting: the links reshaped, the probe, one generation, kept in `row`."""
    def run() -> None:
        emu.network.set_link(Link(delay=f"{row.delay_ms:g}ms", rate=row.rate))
        rtt = probe.rtt_ms()
        ms_tok, ms_ar = _generate(emu.master_url, model, tokens)
        row.probe_ms.append(rtt)
        row.ms_per_token.append(ms_tok)
        row.allreduce_ms.append(ms_ar)

    return run


def emulate_table(rows: list[Row], args: argparse.Namespace, delay_with: str) -> str:
    med = statistics.median
    r0 = rows[0]
    lines = [
        f"# tpi emulate: {args.world_size} ranks of SmolLM2-135M ({r0.layers} layers, hidden {r0.hidden}, float32)",
        "",
        f"{platform.node()}, {os.cpu_count()} cores, 1 torch thread per rank; {args.tokens} tokens per generation, "
        f"medians of {args.rounds} rounds; delay applied by {delay_with}.",
        f"floor = 2 x {r0.layers} layers x (2 x delay + {r0.bytes_per_allreduce} B x 8 / rate) "
        f"({r0.bytes_per_allreduce} B: a {r0.hidden * 4} B partial up and the {r0.hidden * 4} B sum back); "
        "probe: round trip of 2304 B each way between two namespaces; "
        "added by the delay: ms/token minus that of the same rate at delay 0, beside the floor's delay part "
        f"2 x {r0.layers} x 2 x delay.",
        "",
    ]
    base = {r.rate: med(r.ms_per_token) for r in rows if r.delay_ms == 0}
    cells = []
    for r in rows:
        ms = med(r.ms_per_token)
        added = f"{ms - base[r.rate]:.1f}" if r.delay_ms > 0 and r.rate in base else "-"
        cells.append([r.rate, f"{r.delay_ms:g}", f"{med(r.probe_ms):.2f}", f"{med(r.allreduce_ms):.2f}", f"{ms:.1f}",
                      f"{r.floor_ms:.1f}", f"{ms / r.floor_ms:.2f}", added, f"{4 * r.layers * r.delay_ms:.0f}"])
    cols = ["rate", "one-way delay ms", "probe RTT ms", "allreduce ms/call", "ms/token", "floor ms/token",
            "measured/floor", "added by the delay ms/token", "floor's delay part"]
    return "\n".join([*lines, table(cols, cells, "lrrrrrrrr")]) + "\n"


def plot(rows: list[Row], path: Path) -> bool:
    """ms/token against the delay, one line per rate, the floors dashed."""
    def draw(axes: list) -> None:
        ax = axes[0]
        for i, rate in enumerate(dict.fromkeys(r.rate for r in rows)):
            rs = [r for r in rows if r.rate == rate]
            x = [r.delay_ms for r in rs]
            ax.plot(x, [statistics.median(r.ms_per_token) for r in rs], "o-", color=f"C{i}", label=f"measured, {rate}")
            ax.plot(x, [r.floor_ms for r in rs], "--", color=f"C{i}", label=f"floor, {rate}")
        ax.set(xlabel="one-way link delay (ms)", ylabel="decode ms/token", ylim=(0, None),
               title=f"tpi emulate: {rows[0].layers}-layer SmolLM2-135M on 3 ranks")
        ax.legend(fontsize=8)

    return save_plot(path, draw, panel_size=(6.5, 4.2))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--delays", default="0,1,2,5", help="one-way delays in ms (default %(default)s)")
    p.add_argument("--rates", default="100mbit,1gbit", help="link rates (default %(default)s)")
    p.add_argument("--tokens", type=int, default=24, help="new tokens per generation (default %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="rounds over every setting (default %(default)s)")
    p.add_argument("--world-size", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="smoke run: delays 0,2, 1gbit, 8 tokens, 1 round")
    args = p.parse_args()
    if args.quick:
        args.delays, args.rates, args.tokens, args.rounds = "0,2", "1gbit", 8, 1
    args.delays = [float(d) for d in args.delays.split(",")]
    args.rates = args.rates.split(",")
    check_prerequisites()
    rows, delay_with = run(args)
    text = emulate_table(rows, args, delay_with)
    print()
    print(text)
    write_report(OUT_DIR, "emulate.md", text)
    plot(rows, OUT_DIR / "emulate.png")


if __name__ == "__main__":
    main()
