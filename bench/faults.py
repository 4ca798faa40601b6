"""Faults and CURVE, measured: time to detect a lost worker, time to recover after a restart, and
the cost of CURVE encryption on decode speed.

Detection: a 64-token greedy generation is streamed on LocalCluster (3 ranks, 1 thread each); after
5 tokens a worker is SIGKILLed (a dead process: the master sees the connection close) or SIGSTOPped
(a hung process: libzmq's heartbeats time out after --lost-timeout); the time from the signal to
the request's error. Recovery: `restart_worker` (kill, spawn, load, rejoin) until the master has
welcomed the new process, then the first request's latency. Medians of --repeats.
CURVE: ms/token of the same generation with plain TCP and with CURVE, both clusters alive at once,
in rounds of a new random order (common.rounds).

Writes the tables to stdout and bench/out/faults.md. Does not know: tpi's internals beyond
``LocalCluster`` (worker pids, restart_worker, health).

    python bench/faults.py [--model DIR] [--repeats 5] [--tokens 64]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import time

from common import EMBEDDED_PROMPT_IDS as PROMPT
from common import OUT_DIR, rounds, table, write_report

from tpi import ClusterError, LocalCluster
from tpi.embedded import default_model_dir


def _fail_after(cluster: LocalCluster, fault, tokens: int) -> float:
    seen, t0 = 0, None
    try:
        for event, _ in cluster.stream(PROMPT, tokens, ignore_eos=True):
            if event["event"] == "token":
                seen += 1
                if seen == 5:
                    fault()
                    t0 = time.monotonic()
    except ClusterError:
        return time.monotonic() - t0
    raise RuntimeError("the generation did not fail")


def detection(model: str, repeats: int, tokens: int, lost_timeout: float) -> dict[str, list[float]]:
    out = {"kill_detect_s": [], "restart_s": [], "first_request_s": [], "stop_detect_s": [], "rejoin_s": []}
    with LocalCluster(model, 3, lost_timeout=lost_timeout) as c:
        c.generate(PROMPT, 4)
        for i in range(repeats):
            rank = 1 + i % 2
            pid = c.worker_pids[rank]
            out["kill_detect_s"].append(_fail_after(c, lambda pid=pid: os.kill(pid, signal.SIGKILL), tokens))
            t0 = time.monotonic()
            c.restart_worker(rank)
            out["restart_s"].append(time.monotonic() - t0)
            t0 = time.monotonic()
            c.generate(PROMPT, 1)
            out["first_request_s"].append(time.monotonic() - t0)
            pid = c.worker_pids[rank]
            out["stop_detect_s"].append(_fail_after(c, lambda pid=pid: os.kill(pid, signal.SIGSTOP), tokens))
            os.kill(pid, signal.SIGCONT)
            t0 = time.monotonic()
            while c.health().missing:
                time.sleep(0.05)
            out["rejoin_s"].append(time.monotonic() - t0)
    return out


def curve_cost(model: str, repeats: int, tokens: int) -> dict[str, list[float]]:
    """Decode ms/token with plain TCP and with CURVE."""
    def ms_per_token(cluster: LocalCluster):
        def run() -> float:
            done = cluster.generate_full(PROMPT, tokens, ignore_eos=True)
            return 1000 * done["decode_s"] / (len(done["ids"]) - 1)

        return run

    with LocalCluster(model, 3) as plain, LocalCluster(model, 3, curve=True) as curve:
        return rounds({"plain": ms_per_token(plain), "curve": ms_per_token(curve)}, repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--lost-timeout", type=float, default=3.0)
    args = ap.parse_args()
    model = args.model or str(default_model_dir())
    det = detection(model, args.repeats, args.tokens, args.lost_timeout)
    cost = curve_cost(model, args.repeats, args.tokens)
    p, c = statistics.median(cost["plain"]), statistics.median(cost["curve"])
    text = "\n".join([
        f"model {os.path.basename(model)}, 3 ranks x 1 thread, lost_timeout {args.lost_timeout:g} s, "
        f"medians of {args.repeats}", "",
        table(["measure", "median", "min", "max"],
              [[k, f"{statistics.median(v):.2f} s", f"{min(v):.2f}", f"{max(v):.2f}"] for k, v in det.items()]), "",
        table(["links", "ms/token (median)", "ratio to plain"],
              [["plain TCP", f"{p:.1f}", "1.00"], ["CURVE", f"{c:.1f}", f"{c / p:.2f}"]])])
    print(text)
    write_report(OUT_DIR, "faults.md", text)


if __name__ == "__main__":
    main()
