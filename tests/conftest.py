"""Shared fixtures: tiny seeded random-weight models of each family, the embedded model, a check
that no test leaves a child process behind, the tiers (one marker per test), a process's output
lines to wait on, and whether `tpi emulate` can run here."""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

TIERS = ("unit", "inprocess", "cluster", "slow")


def pytest_collection_modifyitems(config, items) -> None:
    """Every test is in exactly one tier (pyproject.toml lists them), so that `-m` selects it."""
    wrong = [f"{item.nodeid}: {tiers or 'none'}" for item in items
             if len(tiers := sorted({m.name for m in item.iter_markers() if m.name in TIERS})) != 1]
    if wrong:
        raise pytest.UsageError("tests need exactly one tier marker of " + ", ".join(TIERS) + ":\n" + "\n".join(wrong))


def _children() -> dict[int, str]:
    out = {}
    for p in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
        except psutil.Error:
            continue
        if "resource_tracker" in cmd or "forkserver" in cmd:
            continue  # multiprocessing's own helpers live for the whole session
        out[p.pid] = cmd
    return out


@pytest.fixture(autouse=True)
def no_orphans():
    before = set(_children())
    yield
    deadline = time.monotonic() + 10
    while True:
        left = {pid: cmd for pid, cmd in _children().items() if pid not in before}
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    for pid in left:
        try:
            psutil.Process(pid).kill()
        except psutil.Error:
            pass
    assert not left, f"test left child processes behind: {left}"


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-4) -> None:
    """Max abs difference at most `rel` times the expected values' max abs; prints both on failure."""
    diff = (actual.float() - expected.float()).abs()
    scale = expected.abs().max().item()
    assert diff.max().item() <= rel * scale, (
        f"max diff {diff.max().item():.3e}, mean diff {diff.mean().item():.3e}, scale {scale:.3e}, "
        f"allowed {rel * scale:.3e}")


FAMILIES = {
    # tied embeddings as in Llama 3.2 1B and SmolLM2
    "llama": dict(model_type="llama", tie_word_embeddings=True),
    # Llama 3.1 rotary scaling, written in the older rope_theta/rope_scaling form; biases on rank 0 only
    "llama3": dict(model_type="llama", attention_bias=True, mlp_bias=True, rope_theta=500000.0,
                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    # a sliding window shorter than the test prompts, so that it matters
    "mistral": dict(model_type="mistral", sliding_window=6, head_dim=16),
    "qwen2": dict(model_type="qwen2"),  # q/k/v biases
    "qwen3": dict(model_type="qwen3", head_dim=12),  # per-head q/k RMSNorm; head_dim != hidden/heads
}


def build_tiny(family: str, path: Path, seed: int = 0, **overrides):
    """Save a seeded random-weight model of `family` to `path`; return the transformers model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(FAMILIES[family])
    model_type = spec.pop("model_type")
    kw = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
              num_key_value_heads=4, max_position_embeddings=256, rms_norm_eps=1e-6, eos_token_id=None,
              bos_token_id=None, pad_token_id=None)
    kw.update(spec)
    kw.update(overrides)
    old_rope = {k: kw.pop(k) for k in ("rope_theta", "rope_scaling") if k in kw}
    config = AutoConfig.for_model(model_type, **kw, **old_rope)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager").eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(path, safe_serialization=True)
    if old_rope:  # rewrite config.json in the older form most published checkpoints have
        cfg_path = path / "config.json"
        raw = json.loads(cfg_path.read_text())
        raw.pop("rope_parameters", None)
        raw.update(old_rope)
        cfg_path.write_text(json.dumps(raw, indent=1))
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    return model


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """family -> (checkpoint dir, transformers model), built once per session."""
    cache = {}

    def get(family: str):
        if family not in cache:
            path = tmp_path_factory.mktemp(family)
            cache[family] = (path, build_tiny(family, path))
        return cache[family]

    return get


@pytest.fixture(scope="session")
def split_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("splits")


@pytest.fixture(scope="session")
def smollm2():
    """(checkpoint dir, transformers model, tokenizer) of the embedded SmolLM2-135M-Instruct."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tpi.embedded import default_model_dir

    path = default_model_dir()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return path, model, AutoTokenizer.from_pretrained(path)


class Lines:
    """Collects a process's output lines on a thread; `wait_for` a pattern, without sleeping."""

    def __init__(self, proc: subprocess.Popen):
        self.lines: list[str] = []
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._pump, args=(proc,), daemon=True)
        self.thread.start()

    def _pump(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            with self.cond:
                self.lines.append(line.rstrip("\n"))
                self.cond.notify_all()
        with self.cond:
            self.lines.append("<eof>")
            self.cond.notify_all()

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for line in self.lines:
                    if m := re.search(pattern, line):
                        return m
                left = deadline - time.monotonic()
                assert left > 0 and "<eof>" not in self.lines, f"no {pattern!r} in:\n" + "\n".join(self.lines[-30:])
                self.cond.wait(left)


@pytest.fixture(scope="session")
def can_emulate():
    """Skip unless this machine lets us build a network (root, iproute2, namespaces, bridges)."""
    from tpi.emulate import EmulateError, Network, check_prerequisites, remove_leftovers

    try:
        check_prerequisites()
        remove_leftovers()  # of runs that were killed
        Network(1).start().close()
    except EmulateError as e:
        pytest.skip(f"tpi emulate cannot run here: {e}")
