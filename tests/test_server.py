"""The HTTP API with real clients against a live `tpi serve` process: the official openai client,
streaming and not, concurrency, a full queue answering 429, disconnects, bad input, auth, health
and metrics."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
KEY = "test-key-123"
QUESTIONS = ["What is the capital of France?", "Name a primary colour.", "What is 2+2?", "Say hello."]


class Server:
    """A `tpi serve` child process; `url` once it prints where it serves."""

    def __init__(self, *args: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "launcher.cli", "serve", "--port", "0", *args],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        self.url = self._wait_for_url(180)

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.log.append(line)
            self.lines.put(line)
        self.lines.put("")

    def _wait_for_url(self, timeout: float) -> str:
        while True:
            line = self.lines.get(timeout=timeout)
            if not line:
                raise RuntimeError("tpi serve exited: " + "".join(self.log))
            if "serving" in line:
                return line.split(" on ")[1].split()[0]  # http://127.0.0.1:PORT/v1

    def close(self) -> None:
        self.proc.terminate()  # uvicorn's graceful shutdown, then tpi stops its workers
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def server(smollm2):
    s = Server("--world-size", "3", "--queue-size", "32")
    yield s
    s.close()


@pytest.fixture(scope="module")
def small_queue_server(smollm2):
    s = Server("--world-size", "1", "--queue-size", "2", "--api-key", KEY)
    yield s
    s.close()


def _greedy_text(smollm2, messages=None, prompt=None, max_new=24) -> str:
    _, model, tok = smollm2
    if messages is not None:
        ids = list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))
    else:
        ids = tok(prompt)["input_ids"]
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new, do_sample=False)[0, len(ids):]
    return tok.decode(out, skip_special_tokens=True)


@pytest.mark.timeout(300)
def test_openai_client_chat_and_completions(server, smollm2):
    client = openai.OpenAI(base_url=server.url, api_key="unused", timeout=120)
    messages = [{"role": "user", "content": QUESTIONS[0]}]
    expected = _greedy_text(smollm2, messages=messages)
    whole = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=24)
    assert whole.choices[0].message.content == expected
    assert whole.usage.completion_tokens >= 1 and whole.usage.prompt_tokens > 10
    assert whole.choices[0].finish_reason in ("stop", "length")
    chunks = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=24, stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == expected

    prompt = "The three primary colours are"
    expected = _greedy_text(smollm2, prompt=prompt, max_new=12)
    comp = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=12)
    assert comp.choices[0].text == expected and comp.choices[0].finish_reason == "length"
    assert comp.usage.completion_tokens == 12
    stream = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=12, stream=True)
    assert "".join(c.choices[0].text for c in stream) == expected
    assert [m.id for m in client.models.list().data] == [MODEL]


@pytest.mark.timeout(400)
def test_twenty_concurrent_streams(server, smollm2):
    expected = {q: _greedy_text(smollm2, messages=[{"role": "user", "content": q}], max_new=5) for q in QUESTIONS}
    client = openai.OpenAI(base_url=server.url, api_key="unused", timeout=300)

    def ask(i: int) -> tuple[str, str]:
        q = QUESTIONS[i % len(QUESTIONS)]
        chunks = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": q}],
                                                temperature=0, max_tokens=5, stream=True)
        return q, "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(ask, range(20)))
    assert len(results) == 20
    for q, text in results:
        assert text == expected[q], q


def _open_long_stream(http: httpx.Client, url: str) -> tuple[httpx.Response, object]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a long story."}], "stream": True,
            "max_tokens": 3000, "ignore_eos": True, "temperature": 0}
    resp = http.send(http.build_request("POST", f"{url}/chat/completions", json=body), stream=True)
    return resp, resp.iter_lines()


@pytest.mark.timeout(300)
def test_full_queue_answers_429_and_disconnects_cancel(small_queue_server):
    url = small_queue_server.url
    auth = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(headers=auth, timeout=60) as http:
        running, lines = _open_long_stream(http, url)
        assert running.status_code == 200
        # wait for a content chunk: the engine is now generating this request
        next(line for line in lines if line.startswith("data: ") and '"content":"' in line and '""' not in line)
        waiting = [_open_long_stream(http, url)[0] for _ in range(2)]  # fill the queue of 2
        assert [r.status_code for r in waiting] == [200, 200]
        assert http.get(url.replace("/v1", "/health")).json()["queue"] == {"waiting": 2, "running": 1}
        extra = http.post(f"{url}/chat/completions", json={"model": MODEL, "messages": [
            {"role": "user", "content": "hi"}], "max_tokens": 4})
        assert extra.status_code == 429 and extra.headers["retry-after"] == "1"
        assert extra.json()["error"]["type"] == "rate_limit_error"
        for r in (running, *waiting):  # the clients go away: their generations stop, KV slots are freed
            r.close()
        _wait_until_idle(http, url.replace("/v1", "/health"))
        ok = http.post(f"{url}/chat/completions", json={"model": MODEL, "messages": [
            {"role": "user", "content": "Say hello."}], "max_tokens": 4, "temperature": 0}, timeout=120)
        assert ok.status_code == 200, ok.text
        metrics = http.get(url.replace("/v1", "/metrics")).text
    assert 'tpi_requests_total{endpoint="chat",status="429"} 1.0' in metrics
    assert 'tpi_requests_total{endpoint="chat",status="499"}' in metrics  # the disconnected streams


def _wait_until_idle(http: httpx.Client, health_url: str, timeout: float = 60) -> None:
    """Wait for the server to notice the disconnects: nothing running, nothing waiting."""
    deadline = time.monotonic() + timeout
    while http.get(health_url).json()["queue"] != {"waiting": 0, "running": 0}:
        assert time.monotonic() < deadline, "the cancelled requests still occupy the server"
        time.sleep(0.05)


BAD = [
    ("invalid json", b"{not json", 400, None),
    ("messages missing", {"model": MODEL}, 400, "messages"),
    ("messages empty", {"model": MODEL, "messages": []}, 400, "messages"),
    ("messages wrong type", {"model": MODEL, "messages": "hi"}, 400, "messages"),
    ("unknown role", {"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
    ("content missing", {"model": MODEL, "messages": [{"role": "user"}]}, 400, "messages.0.content"),
    ("negative max_tokens", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": -1},
     400, "max_tokens"),
    ("absurd max_tokens", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**9},
     400, "max_tokens"),
    ("max_tokens wrong type", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                               "max_tokens": "many"}, 400, "max_tokens"),
    ("temperature too high", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": 9},
     400, "temperature"),
    ("n=2", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n"),
    ("unknown model", {"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
    ("model missing", {"messages": [{"role": "user", "content": "hi"}]}, 400, "model"),
    ("prompt too long", {"model": MODEL, "messages": [{"role": "user", "content": "word " * 5000}]}, 400, None),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name,body,status,param", BAD, ids=[b[0] for b in BAD])
def test_bad_chat_input_gets_4xx_naming_the_field(small_queue_server, name, body, status, param):
    url = small_queue_server.url
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    resp = httpx.post(f"{url}/chat/completions", content=data, headers=auth, timeout=60)
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["message"]
    if param is not None:
        assert err["param"] == param, err


@pytest.mark.timeout(120)
def test_bad_completion_input_and_auth(small_queue_server):
    url = small_queue_server.url
    auth = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(f"{url}/completions", json={"model": MODEL, "prompt": [1, 10**7]}, headers=auth, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = httpx.post(f"{url}/completions", json={"model": MODEL, "prompt": ""}, headers=auth, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = httpx.post(f"{url}/completions", json={"model": MODEL, "prompt": "hi"}, timeout=60)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.get(f"{url}/models", headers={"Authorization": "Bearer wrong"}, timeout=60)
    assert r.status_code == 401
    ok = httpx.post(f"{url}/completions", json={"model": MODEL, "prompt": "Hello", "max_tokens": 3},
                    headers=auth, timeout=60)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3  # still answering


@pytest.mark.timeout(120)
def test_health_and_metrics(server):
    base = server.url.replace("/v1", "")
    health = httpx.get(f"{base}/health", timeout=30).json()
    assert health["status"] == "ok" and [w["connected"] for w in health["workers"]] == [True, True]
    before = _requests_count(httpx.get(f"{base}/metrics", timeout=30).text)
    httpx.post(f"{server.url}/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2}, timeout=60)
    text = httpx.get(f"{base}/metrics", timeout=30).text
    assert _requests_count(text) == before + 1
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("tpi_time_to_first_token_seconds", "tpi_time_per_output_token_seconds", "tpi_allreduce_seconds",
                 "tpi_rss_bytes", "tpi_peak_rss_bytes", "tpi_weight_stall_seconds", "tpi_weight_bytes_read",
                 "tpi_rank_up"):
        assert name in families, name
    rss = {s.labels["rank"]: s.value for s in families["tpi_rss_bytes"].samples}
    assert set(rss) == {"0", "1", "2"} and all(v > 1e7 for v in rss.values())


def _requests_count(text: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith("tpi_requests_total{") and 'status="200"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.mark.timeout(180)
def test_tpi_chat_streams_and_keeps_the_conversation(server, smollm2):
    first = "What is the capital of France?"
    out = subprocess.run([sys.executable, "-m", "launcher.cli", "chat", "--url", server.url, "--temperature", "0",
                          "--max-tokens", "24"], input=f"{first}\nAnd of Italy?\n", capture_output=True, text=True,
                         timeout=170)
    assert out.returncode == 0, out.stderr
    answers = [line.split("assistant> ", 1)[1] for line in out.stdout.splitlines() if "assistant> " in line]
    assert len(answers) == 2, out.stdout
    assert answers[0] == _greedy_text(smollm2, messages=[{"role": "user", "content": first}])
    history = [{"role": "user", "content": first}, {"role": "assistant", "content": answers[0]},
               {"role": "user", "content": "And of Italy?"}]
    assert answers[1] == _greedy_text(smollm2, messages=history)  # the second turn saw the first
