"""The shipped cluster configs run as shipped: every config whose ranks all run on this machine
answers a chat request under `tpi launch`, and the docker-compose topology
(cluster_configs/compose-4.yaml: a master with no share of the layers and three workers, on
emulated 5 ms links) answers under `tpi emulate`, both with the embedded model ("Paris" for the
capital of France). Slow tier: each starts a whole cluster of real processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest
import yaml
from conftest import Lines

from tpi.cluster_config import load_cluster_config
from tpi.emulate import owned_names

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "cluster_configs").glob("*.yaml"))
LOCAL = [p for p in CONFIGS if all(n.local for n in load_cluster_config(p).nodes)]
QUESTION = "What is the capital of France?"

pytestmark = pytest.mark.slow


def _env(tmp_path: Path, smollm2_dir: Path) -> dict:
    """This interpreter's `tpi`, and a cache of our own (workers start with nothing fetched) in
    which the embedded model is the one already converted."""
    cache = tmp_path / "cache"
    (cache / "models").mkdir(parents=True)
    (cache / "models" / smollm2_dir.name).symlink_to(smollm2_dir)
    return {**os.environ, "TPI_CACHE": str(cache), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_shipped(path: Path, tmp_path: Path) -> Path:
    """The config itself, or, when another program holds one of its ports on this machine, a copy
    with only those ports changed."""
    raw = yaml.safe_load(path.read_text())
    master = raw.setdefault("master", {})
    ports = {"port": master.get("port", 5555), "http_port": master.get("http_port", 8000)}
    if all(_port_free(p) for p in ports.values()):
        return path
    master.update({k: _free_port() for k in ports})
    copy = tmp_path / path.name
    copy.write_text(yaml.safe_dump(raw))
    return copy


PROMPT_IDS = [1, 9690, 314, 253, 3575, 282, 4649, 47, 2]


def _complete(url: str, n: int) -> str:
    r = httpx.post(f"{url}/v1/completions", timeout=60, json={"model": "smollm2-135m-instruct", "prompt": PROMPT_IDS,
                                                               "max_tokens": n, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def _ask(url: str) -> str:
    r = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
        "model": "smollm2-135m-instruct", "temperature": 0, "max_tokens": 16,
        "messages": [{"role": "user", "content": QUESTION}]})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def _stop(proc: subprocess.Popen, out: Lines) -> int:
    proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError("did not stop within 60 s of Ctrl-C:\n" + "\n".join(out.lines[-30:])) from None


@pytest.mark.timeout(300)
@pytest.mark.parametrize("config", LOCAL, ids=[p.name for p in LOCAL])
def test_local_config_answers_under_tpi_launch(config, smollm2, tmp_path):
    """`tpi launch` starts every rank, prefixes their output, the workers fetch their own shards,
    the cluster answers (greedy tokens equal to transformers'), and Ctrl-C stops every rank."""
    import torch

    _, model, tok = smollm2
    path = _as_shipped(config, tmp_path)
    cfg = load_cluster_config(path)
    proc = subprocess.Popen(["tpi", "launch", str(path)], env=_env(tmp_path, Path(smollm2[0])),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = Lines(proc)
    try:
        out.wait_for(r"serving '.*' on http://", 240)
        ranks = [p for p in psutil.Process(proc.pid).children(recursive=True) if "tpi" in " ".join(p.cmdline())]
        assert len(ranks) >= cfg.world_size
        url = f"http://{cfg.master.http_host}:{cfg.master.http_port}"
        assert "Paris" in _ask(url)
        with torch.no_grad():
            ref = model.generate(torch.tensor([PROMPT_IDS]), max_new_tokens=8, do_sample=False)[0, len(PROMPT_IDS):]
        assert _complete(url, 8) == tok.decode(ref, skip_special_tokens=True)
        assert _stop(proc, out) in (0, 130)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not psutil.wait_procs(ranks, timeout=10)[1], "ranks outlived tpi launch"
    for w in cfg.workers:
        out.wait_for(rf"\[rank {w.rank}@{w.host}\] ", 1)
        assert list((tmp_path / "cache" / "fetched" / f"rank{w.rank}" / f"rank{w.rank}").glob("layer*.safetensors"))


@pytest.mark.timeout(420)
def test_compose_4_answers_under_tpi_emulate(can_emulate, smollm2, tmp_path):
    config = ROOT / "cluster_configs" / "compose-4.yaml"
    proc = subprocess.Popen([sys.executable, "-m", "launcher.cli", "emulate", str(config)],
                            env=_env(tmp_path, Path(smollm2[0])), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    out = Lines(proc)
    try:
        m = out.wait_for(r"namespaces (tpe\d+[a-z])-0\.\.3 .* API at (http://\S+)/v1", 60)
        tag, url = m.group(1), m.group(2)
        out.wait_for(r"serving '.*' on http://", 360)
        assert "Paris" in _ask(url)
        assert _stop(proc, out) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert [n for n in owned_names() if n.startswith(tag)] == []
