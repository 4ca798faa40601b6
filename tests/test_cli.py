"""The command line as a user runs it: `tpi split`, then `tpi master` and `tpi worker` started by
hand as separate processes (the workers on a worker's install: none of the master's packages), and
`tpi run` on the embedded model."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

PROMPT_TEXT = "What is the capital of France?"


def _tpi(*args: str) -> list[str]:
    return [sys.executable, "-m", "launcher.cli", *args]


@pytest.mark.timeout(180)
def test_split_master_and_workers_by_hand(smollm2, tmp_path):
    path, model, tok = smollm2
    shards = tmp_path / "shards"
    subprocess.run(_tpi("split", str(path), str(shards), "--world-size", "3", "--ratios", "2,1,1"),
                   check=True, timeout=120, capture_output=True)
    master = subprocess.Popen(
        _tpi("master", "--shards", str(shards), "--bind", "tcp://127.0.0.1:0", "--prompt", PROMPT_TEXT,
             "--max-new-tokens", "16", "--join-timeout", "60"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    workers = []
    try:
        line = master.stderr.readline()
        address = re.search(r"tcp://[\d.]+:\d+", line)
        assert address, line
        no_extras = {**os.environ, "PYTHONPATH": str(Path(__file__).parent / "no_extras")}  # a worker's install
        workers = [subprocess.Popen(_tpi("worker", "--master", address.group(0), "--rank", str(r),
                                         "--shards", str(shards)), stderr=subprocess.PIPE, text=True, env=no_extras)
                   for r in (1, 2)]
        out, err = master.communicate(timeout=120)
        assert master.returncode == 0, err
        for w in workers:  # the master's exit tells its workers to stop
            assert w.wait(timeout=30) == 0, w.stderr.read()
    finally:
        for p in (master, *workers):
            if p.poll() is None:
                p.kill()
                p.wait()
    ids = tok.apply_chat_template([{"role": "user", "content": PROMPT_TEXT}], add_generation_prompt=True,
                                  tokenize=True, return_dict=False)
    with torch.no_grad():
        ref = model.generate(torch.tensor([list(ids)]), max_new_tokens=16, do_sample=False)[0, len(ids):]
    assert out == tok.decode(ref, skip_special_tokens=True) + "\n"  # the answer ends its line
    assert "ms/token" in err


@pytest.mark.timeout(180)
def test_tpi_run_embedded_model(smollm2):
    out = subprocess.run(_tpi("run", "--world-size", "3", "--prompt", PROMPT_TEXT, "--max-new-tokens", "12",
                              "--stream-all", "--window", "2", "--stats"),
                         capture_output=True, text=True, timeout=170)
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout
    assert re.search(r"TTFT \d+ ms, [\d.]+ ms/token", out.stderr)
    rows = [line.split() for line in out.stderr.splitlines() if re.match(r"\s+[012]\s+\d+", line)]
    assert [r[0] for r in rows] == ["0", "1", "2"], out.stderr
    assert all(r[2] == "0" and r[4] == "2" for r in rows)  # nothing pinned, window 2 on every rank


@pytest.mark.timeout(120)
def test_budget_too_small_is_refused_by_the_cli(smollm2):
    out = subprocess.run(_tpi("run", "--world-size", "1", "--prompt", "hi", "--memory-budget", "100MB"),
                         capture_output=True, text=True, timeout=110)
    assert out.returncode != 0
    assert re.search(r"memory budget of 100,000,000 bytes is too small: this rank needs at least [\d,]+ bytes",
                     out.stderr), out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.timeout(60)
def test_cli_errors_name_the_value(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"]}')
    out = subprocess.run(_tpi("split", str(tmp_path), str(tmp_path / "out"), "--world-size", "2"),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "GPT2LMHeadModel" in out.stderr and "LlamaForCausalLM" in out.stderr


@pytest.mark.timeout(300)
def test_tpi_run_a_gguf_file(smollm2):
    """The embedded model's own Q4_1 GGUF, split as it is (4-bit, no float expansion), three ranks:
    the exact compute answers as transformers on the same dequantized weights."""
    path, model, tok = smollm2
    out = subprocess.run(_tpi("run", "--model", "embedded-gguf", "--world-size", "3", "--compute", "exact",
                              "--prompt", PROMPT_TEXT, "--max-new-tokens", "12", "--stats"),
                         capture_output=True, text=True, timeout=290)
    assert out.returncode == 0, out.stderr
    ids = tok.apply_chat_template([{"role": "user", "content": PROMPT_TEXT}], add_generation_prompt=True,
                                  tokenize=True, return_dict=False)
    with torch.no_grad():
        ref = model.generate(torch.tensor([list(ids)]), max_new_tokens=12, do_sample=False)[0, len(ids):]
    assert out.stdout == tok.decode(ref, skip_special_tokens=True) + "\n"
    rows = [line.split() for line in out.stderr.splitlines() if re.match(r"\s+[012]\s+\d+", line)]
    assert [r[-1] for r in rows] == ["gguf/exact"] * 3, out.stderr
    assert float(rows[1][-2]) < 40  # a worker's weights in MB: 4-bit (float32 would be ~130)
