"""Faults and CURVE, measured: time to detect a lost worker, time to recover after a restart, and
the cost of CURVE encryption on decode speed.

Detection: a 64-token greedy generation is streamed on LocalCluster (3 ranks, 1 thread each); after
5 tokens a worker is SIGKILLed (a dead process: the master sees the connection close) or SIGSTOPped
(a hung process: libzmq's heartbeats time out after --lost-timeout); the time from the signal to
the request's error. Recovery: `restart_worker` (kill, spawn, load, rejoin) until the master has
welcomed the new process, then the first request's latency. Medians of --repeats.
CURVE: ms/token of the same generation with plain TCP and with CURVE, rounds alternating.

    python bench/faults.py [--model DIR] [--repeats 5] [--tokens 64]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import time

from tpi import ClusterError, LocalCluster
from tpi.embedded import default_model_dir

PROMPT = [1, 9690, 314, 253, 3575, 282, 4649, 47, 2]


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
            while c.health()["missing"]:
                time.sleep(0.05)
            out["rejoin_s"].append(time.monotonic() - t0)
    return out


def curve_cost(model: str, repeats: int, tokens: int) -> dict[str, list[float]]:
    out = {"plain": [], "curve": []}
    with LocalCluster(model, 3) as plain, LocalCluster(model, 3, curve=True) as curve:
        for c in (plain, curve):
            c.generate(PROMPT, 4)
        for i in range(repeats):
            for name, c in (("plain", plain), ("curve", curve))[:: 1 if i % 2 == 0 else -1]:
                done = c.generate_full(PROMPT, tokens, ignore_eos=True)
                out[name].append(1000 * done["decode_s"] / (len(done["ids"]) - 1))
    return out


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
    lines = [f"model {os.path.basename(model)}, 3 ranks x 1 thread, lost_timeout {args.lost_timeout:g} s, "
             f"medians of {args.repeats}", "", "| measure | median | min | max |", "|---|---|---|---|"]
    for k, v in det.items():
        lines.append(f"| {k} | {statistics.median(v):.2f} s | {min(v):.2f} | {max(v):.2f} |")
    p, c = statistics.median(cost["plain"]), statistics.median(cost["curve"])
    lines += ["", "| links | ms/token (median) | ratio to plain |", "|---|---|---|",
              f"| plain TCP | {p:.1f} | 1.00 |", f"| CURVE | {c:.1f} | {c / p:.2f} |"]
    text = "\n".join(lines)
    print(text)
    os.makedirs("bench/out", exist_ok=True)
    with open("bench/out/faults.md", "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
