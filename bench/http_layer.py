"""The cost of the HTTP layer: `tpi serve` with streaming chat completions against ``LocalCluster``.

Both run the embedded SmolLM2-135M-Instruct on 3 local ranks (float32, 1 torch thread per rank) and
are alive at once; each round measures, in a new random order each round (common.rounds):

  (a) HTTP, one client: a streaming chat completion (httpx) to a `tpi serve --world-size 3` child
      process, temperature 0, ``max_tokens`` N and ``ignore_eos``, so that it makes exactly N tokens;
  (b) HTTP, ``--clients`` clients at once (threads released together by a barrier), same request;
  (c) ``LocalCluster(model_dir, world_size=3).stream(messages=..., max_new_tokens=N)``, one caller.

Timed from the caller's side: TTFT = sending the request to the first content chunk (first token
event for LocalCluster); tokens/s per client = (tokens - 1) / (last chunk - first chunk); aggregate
tokens/s = all tokens / (first send to last chunk). LocalCluster is asked for exactly N tokens too
(``ignore_eos``). LocalCluster serves one
request at a time through one control channel, so it has no concurrent case: its row for several
clients repeats its single-client figures. The server also runs requests one after another (one
engine thread), so in (b) TTFT includes the wait behind earlier requests.

Writes the table to stdout and bench/out/http.md. Does not know: tpi's internals beyond the
``tpi serve`` command line, its OpenAI-style stream and ``LocalCluster``.

    python bench/http_layer.py                            # 32 new tokens, 3 rounds, 4 clients: ~5 min
    python bench/http_layer.py --new-tokens 16 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import shlex
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import httpx
from common import OUT_DIR, ROOT, command_line, exit_on_sigterm, git_revision, rounds, table, write_report

WORLD_SIZE = 3
PROMPT = "Write a long story about a dragon."
START_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 30.0
REQUEST_TIMEOUT_S = 600.0


# -- the server --------------------------------------------------------------------------------
class Server:
    """`tpi serve` as a child process; `url` once it prints where it serves. `close` always ends it:
    SIGTERM (uvicorn's graceful shutdown, then tpi stops its workers), SIGKILL after a timeout."""

    def __init__(self, args: list[str]):
        self.cmd = [sys.executable, "-m", "launcher.cli", "serve", *args]
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()  # also keeps the pipe from filling up
        self.url = ""

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.log.append(line)
            self.lines.put(line)
        self.lines.put("")  # end of file: the process has exited

    def wait_for_url(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                why = f"tpi serve printed no URL within {timeout:.0f}s:\n"
                raise RuntimeError(why + "".join(self.log)) from None
            if not line:
                raise RuntimeError(f"tpi serve exited with code {self.proc.wait()}:\n" + "".join(self.log))
            if line.startswith("serving ") and " on http://" in line:
                self.url = line.split(" on ")[1].split()[0]  # http://127.0.0.1:PORT/v1
                return self.url

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_server(stack: ExitStack, clients: int) -> Server:
    server = Server(["--world-size", str(WORLD_SIZE), "--port", "0", "--queue-size", str(max(16, clients))])
    stack.callback(server.close)  # registered before waiting: a failed start is cleaned up too
    server.wait_for_url(START_TIMEOUT_S)
    return server


# -- one request -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sample:
    """One request from the caller's side (perf_counter seconds)."""

    sent: float
    first: float  # first token (content chunk)
    last: float  # last token
    tokens: int
    engine_ttft_s: float | None = None  # what the engine itself reports (LocalCluster only)
    engine_decode_s: float | None = None

    @property
    def ttft_s(self) -> float:
        return self.first - self.sent

    @property
    def tokens_per_s(self) -> float:
        return (self.tokens - 1) / (self.last - self.first) if self.tokens > 1 else float("nan")


def chat_body(model: str, new_tokens: int) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": PROMPT}], "stream": True,
            "temperature": 0, "max_tokens": new_tokens, "ignore_eos": True,
            "stream_options": {"include_usage": True}}


def http_request(client: httpx.Client, url: str, body: dict,
                 barrier: threading.Barrier | None = None) -> Sample:
    """One streaming chat completion; times of the content chunks as they arrive."""
    if barrier is not None:
        barrier.wait()
    times: list[float] = []
    tokens = None
    sent = time.perf_counter()
    with client.stream("POST", f"{url}/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {resp.read().decode()}")
        for line in resp.iter_lines():
            now = time.perf_counter()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if "error" in chunk:
                raise RuntimeError(f"the stream failed: {chunk['error']}")
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if any(c["delta"].get("content") for c in chunk["choices"]):
                times.append(now)
    if tokens != body["max_tokens"] or not times:
        raise RuntimeError(f"{tokens} tokens in {len(times)} content chunks; "
                           f"expected {body['max_tokens']} tokens")
    return Sample(sent, times[0], times[-1], tokens)


def http_concurrent(client: httpx.Client, url: str, body: dict, clients: int) -> list[Sample]:
    """`clients` requests sent at once from as many threads."""
    barrier = threading.Barrier(clients)
    with ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(http_request, client, url, body, barrier) for _ in range(clients)]
        return [f.result() for f in futures]


def cluster_request(cluster, new_tokens: int) -> Sample:
    """One streamed generation through LocalCluster's control channel."""
    times: list[float] = []
    done: dict = {}
    sent = time.perf_counter()
    for event, _ in cluster.stream(messages=[{"role": "user", "content": PROMPT}], max_new_tokens=new_tokens,
                                   ignore_eos=True):
        now = time.perf_counter()
        if event["event"] == "token" and event["ids"]:
            times.append(now)
        elif event["event"] == "done":
            done = event
    made = len(done.get("ids", ()))
    if made < 2 or not times:
        raise RuntimeError(f"LocalCluster made {made} token(s); tokens/s needs at least 2")
    return Sample(sent, times[0], times[-1], len(done["ids"]), done["ttft_s"], done["decode_s"])


# -- rounds ------------------------------------------------------------------------------------
@dataclass
class Route:
    """One measured path x clients and its rounds; each round is a list of per-client samples."""

    path: str  # "HTTP" or "LocalCluster"
    clients: int
    run: Callable[[], list[Sample]]
    rounds: list[list[Sample]] = field(default_factory=list)

    @property
    def samples(self) -> list[Sample]:
        return [s for r in self.rounds for s in r]

    def ttft_ms(self, fn=statistics.median) -> float:
        return 1000 * fn(s.ttft_s for s in self.samples)

    def tokens_per_s(self) -> float:
        return statistics.median(s.tokens_per_s for s in self.samples)

    def aggregate(self) -> float:
        """Median over rounds of all tokens / (first send to last token)."""
        return statistics.median(sum(s.tokens for s in r) / (max(s.last for s in r) - min(s.sent for s in r))
                                 for r in self.rounds)

    def tokens(self) -> str:
        counts = sorted({s.tokens for s in self.samples})
        return ", ".join(map(str, counts))


def measure(paths: list[Route], repeats: int) -> None:
    """Every path in rounds (common.rounds: a warm-up each, then a new random order each round)."""
    def report(k: int, name: str, samples: list[Sample]) -> None:
        ttft = ", ".join(f"{1000 * s.ttft_s:.0f}" for s in samples)
        tps = ", ".join(f"{s.tokens_per_s:.2f}" for s in samples)
        print(f"  round {k + 1} {name}: TTFT {ttft} ms; {tps} tokens/s", flush=True)

    got = rounds({f"{p.path} x {p.clients}": p.run for p in paths}, repeats, report=report)
    for p, samples in zip(paths, got.values()):
        p.rounds = samples


# -- report ------------------------------------------------------------------------------------
def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}"


def http_table(http1: Route, httpk: Route, lc: Route) -> str:
    cols = ["path", "clients", "TTFT median ms", "TTFT max ms", "tokens/s per client", "aggregate tokens/s",
            "tokens per request", "HTTP/LC TTFT", "HTTP/LC tokens/s per client", "HTTP/LC aggregate"]
    cells = []
    for p in (http1, httpk):
        ratios = [_ratio(p.ttft_ms(), lc.ttft_ms()), _ratio(p.tokens_per_s(), lc.tokens_per_s()),
                  _ratio(p.aggregate(), lc.aggregate())]
        cells.append(["HTTP", p.clients, f"{p.ttft_ms():.0f}", f"{p.ttft_ms(max):.0f}", f"{p.tokens_per_s():.2f}",
                      f"{p.aggregate():.2f}", p.tokens(), *ratios])
    for k in (1, httpk.clients):
        note = "" if k == 1 else " (sequential: the 1-client figures)"
        cells.append(["LocalCluster", f"{k}{note}", f"{lc.ttft_ms():.0f}", f"{lc.ttft_ms(max):.0f}",
                      f"{lc.tokens_per_s():.2f}", f"{lc.aggregate():.2f}", lc.tokens(), "1.00", "1.00", "1.00"])
    return table(cols, cells)


def report(paths: list[Route], args: argparse.Namespace, server_cmd: list[str]) -> str:
    http1, httpk, lc = paths
    engine_ttft = 1000 * statistics.median(s.engine_ttft_s for s in lc.samples)
    engine_tps = statistics.median((s.tokens - 1) / s.engine_decode_s for s in lc.samples)
    notes = [
        (f"{platform.machine()}, {os.cpu_count()} logical CPUs, torch {version('torch')}, "
         f"httpx {version('httpx')}, {git_revision()}"),
        (f"embedded SmolLM2-135M-Instruct, float32, {WORLD_SIZE} rank processes on loopback, 1 torch thread "
         f"each; prompt {PROMPT!r} (chat template), greedy, {args.new_tokens} new tokens"),
        (f"medians of {args.repeats} rounds after one warm-up each; the server and the cluster are alive at "
         "once and each round runs every path once, in a new random order"),
        (f"server: `{shlex.join(['python', *server_cmd[1:]])}`; streamed chat completions (httpx) with "
         f"`max_tokens` {args.new_tokens}, `ignore_eos`, `temperature` 0"),
        ("TTFT: the caller's send to the first content chunk (first token event for LocalCluster); tokens/s "
         "per client: (tokens - 1) / (last - first token); aggregate: all tokens / (first send to last "
         "token), median over rounds"),
        (f"HTTP x {httpk.clients}: the clients send at once, but the server generates one request at a time "
         "(one engine thread), so TTFT includes the wait behind earlier requests (see TTFT max)"),
        (f"LocalCluster serves one request at a time, so its {httpk.clients}-client row repeats its "
         "single-client figures"),
        (f"LocalCluster as its master reports it (`done` event): TTFT {engine_ttft:.0f} ms, {engine_tps:.2f} "
         "tokens/s; the difference to its row is the control channel"),
        "ratios: HTTP / LocalCluster single client (TTFT: > 1 is slower; tokens/s: < 1 is slower)",
        f"command: `{command_line('http_layer.py')}`",
    ]
    title = "# tpi HTTP layer: `tpi serve` streaming chat completions vs LocalCluster"
    return "\n".join([title, "", *(f"- {n}" for n in notes), "", http_table(http1, httpk, lc), ""])


# -- command line ------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--new-tokens", type=int, default=32, help="tokens per request (default %(default)s)")
    p.add_argument("--repeats", type=int, default=3,
                   help="rounds; the table quotes medians (default %(default)s)")
    p.add_argument("--clients", type=int, default=4, help="concurrent HTTP clients (default %(default)s)")
    p.add_argument("--out", type=Path, default=OUT_DIR)
    args = p.parse_args(argv)
    if args.new_tokens < 2 or args.repeats < 1 or args.clients < 2:
        p.error(f"need --new-tokens >= 2 (got {args.new_tokens}), --repeats >= 1 (got {args.repeats}), "
                f"--clients >= 2 (got {args.clients})")
    return args


def model_name(client: httpx.Client, url: str) -> str:
    return client.get(f"{url}/models").json()["data"][0]["id"]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    exit_on_sigterm()  # so the `finally` that stops the server runs
    from tpi import LocalCluster
    from tpi.embedded import default_model_dir

    model_dir = default_model_dir()
    with ExitStack() as stack:
        print("starting tpi serve ...", flush=True)
        server = start_server(stack, args.clients)
        print(f"  {server.url}; starting LocalCluster ...", flush=True)
        cluster = stack.enter_context(LocalCluster(model_dir, world_size=WORLD_SIZE))
        client = stack.enter_context(httpx.Client(timeout=REQUEST_TIMEOUT_S))
        body = chat_body(model_name(client, server.url), args.new_tokens)
        paths = [Route("HTTP", 1, lambda: [http_request(client, server.url, body)]),
                 Route("HTTP", args.clients, lambda: http_concurrent(client, server.url, body, args.clients)),
                 Route("LocalCluster", 1, lambda: [cluster_request(cluster, args.new_tokens)])]
        measure(paths, args.repeats)
        server_cmd = server.cmd
    text = report(paths, args, server_cmd)
    print(text)
    write_report(args.out, "http.md", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
