"""`tpi emulate`: three ranks in network namespaces with a 2 ms one-way delay generate the same
tokens as the loopback run, every allreduce takes at least the round trip, and Ctrl-C removes
every namespace, link and process; a killed emulator's leftovers are removed by the next start;
without root or iproute2 it says so. The emulation tests need root with `ip` and `tc` (skipped
otherwise, with the reason)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import Lines
from prometheus_client.parser import text_string_to_metric_families

from launcher.cli import build_parser, cmd_emulate
from tpi import LocalCluster
from tpi.emulate import owned_names, remove_leftovers

DELAY_S = 0.002
PROMPT_IDS = [3, 17, 42, 99, 5]
NEW_TOKENS = 10


@pytest.fixture(scope="module")
def tiny_with_tokenizer(tiny_models, tmp_path_factory) -> Path:
    """The tiny llama with a word-level tokenizer whose text names each id ("t17 t3"), so the HTTP
    answer's text gives back the exact token ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    src, _ = tiny_models("llama")
    path = tmp_path_factory.mktemp("tiny-tok")
    for f in src.iterdir():
        shutil.copy(f, path / f.name)
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(256)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(path)
    return path


def _metrics(url: str) -> dict[tuple[str, str], float]:
    """{(sample name, rank): value} of the per-rank allreduce summary."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {(s.name, s.labels.get("rank")): s.value for fam in text_string_to_metric_families(text)
            if fam.name == "tpi_allreduce_seconds" for s in fam.samples}


def _netns_pids(tag: str) -> set[int]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    pids = set()
    for ns in (line.split()[0] for line in out.splitlines() if line.startswith(tag)):
        pids |= {int(p) for p in subprocess.run(["ip", "netns", "pids", ns], capture_output=True,
                                                text=True).stdout.split()}
    return pids


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_emulated_cluster_matches_loopback_and_pays_the_round_trip(can_emulate, tiny_with_tokenizer, tmp_path):
    import psutil

    cfg = {"name": "emu-test", "model": str(tiny_with_tokenizer), "join_timeout": 120,
           "master": {"port": 5555, "http_port": 8000}, "workers": [{"rank": 1}, {"rank": 2}],
           "link": {"delay": f"{DELAY_S * 1000:g}ms", "rate": "100mbit"}}
    (tmp_path / "emu.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "TPI_CACHE": str(tmp_path / "cache"),  # workers start with an empty cache
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    emu = subprocess.Popen([sys.executable, "-m", "launcher.cli", "emulate", str(tmp_path / "emu.yaml")], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = Lines(emu)
    try:
        m = out.wait_for(r"namespaces (tpe\d+[a-z])-0\.\.2 .*\((?:delay proxy|netem).* API at (http://\S+)/v1", 60)
        tag, url = m.group(1), m.group(2)
        out.wait_for(r"serving 'tiny-tok\d*' on", 150)
        r = httpx.post(f"{url}/v1/completions", timeout=60, json={
            "model": tiny_with_tokenizer.name, "prompt": PROMPT_IDS, "max_tokens": NEW_TOKENS, "temperature": 0,
            "ignore_eos": True})
        assert r.status_code == 200, r.text
        emulated = [int(t.removeprefix("t")) for t in r.json()["choices"][0]["text"].split()]
        stats = _metrics(url)
        ranks = _netns_pids(tag)
        assert len(ranks) >= 3, ranks
        emu.send_signal(signal.SIGINT)
        assert emu.wait(60) == 130, "\n".join(out.lines[-20:])
    finally:
        if emu.poll() is None:  # a failed check: still let it clean up
            emu.terminate()
            try:
                emu.wait(60)
            except subprocess.TimeoutExpired:
                emu.kill()
                emu.wait()
    with LocalCluster(tiny_with_tokenizer, 3) as cluster:
        loopback = cluster.generate(PROMPT_IDS, NEW_TOKENS)
    assert emulated == loopback
    for rank in ("0", "1", "2"):  # two allreduces per layer, each at least one round trip
        calls, total = stats[("tpi_allreduce_seconds_count", rank)], stats[("tpi_allreduce_seconds_sum", rank)]
        assert calls >= NEW_TOKENS * 2 * 2 and total / calls >= 2 * DELAY_S, (rank, calls, total)
    assert [n for n in owned_names() if n.startswith(tag)] == []
    assert not [p for p in ranks if psutil.pid_exists(p)], "rank processes outlived tpi emulate"


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_killed_emulators_network_is_removed_by_the_next_start(can_emulate):
    code = ("import sys, time; from tpi.emulate import Network; from tpi.cluster_config import Link\n"
            "net = Network(2, Link(delay='1ms', rate='1gbit')).start()\n"
            "print(net.tag, flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        tag = proc.stdout.readline().strip()
        assert tag.startswith("tpe"), tag
        proc.kill()
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    left = {n for n in owned_names() if n.startswith(tag)}
    assert {f"{tag}-0", f"{tag}-1", f"{tag}-br"} <= left  # SIGKILL: nothing could clean up
    assert {f"{tag}-0", f"{tag}-1", f"{tag}-br"} <= set(remove_leftovers())
    assert [n for n in owned_names() if n.startswith(tag)] == []


@pytest.mark.unit
@pytest.mark.parametrize("missing", ["root", "tc"])
def test_without_root_or_iproute2_it_says_so(monkeypatch, tmp_path, capsys, missing):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"workers": [{"rank": 1}], "link": {"delay": "1ms"}}))
    monkeypatch.setattr(signal, "signal", lambda *_: None)  # leave pytest's handlers alone
    if missing == "root":
        monkeypatch.setattr(os, "geteuid", lambda: 1000)
    else:
        real = shutil.which
        monkeypatch.setattr(shutil, "which", lambda name: None if name == "tc" else real(name))
    with pytest.raises(SystemExit) as e:
        cmd_emulate(build_parser().parse_args(["emulate", str(cfg)]))
    expected = "needs root" if missing == "root" else "needs iproute2: tc not found on PATH"
    assert str(e.value).startswith("tpi emulate: ") and expected in str(e.value)


@pytest.mark.unit
@pytest.mark.timeout(10)
def test_a_subnet_in_use_blocks_only_itself(monkeypatch):
    """A leftover or concurrent emulation on 10.77.0.0/24 leaves 10.77.1.0/24 free (the check used
    to read "10.77." and refuse every subnet); 10.77.10.x does not block 10.77.1.0/24."""
    import tpi.emulate as emulate

    used = {"addr": "3: tpe1a-br inet 10.77.0.1/24 scope global\n4: x inet 10.77.10.5/24", "route": ""}
    monkeypatch.setattr(emulate, "_run", lambda *argv, check=True: used["addr" if "addr" in argv else "route"])
    assert emulate._free_subnet() == "10.77.1.0/24"
    used["route"] = "10.77.1.0/24 dev tpe2b-br proto kernel"
    assert emulate._free_subnet() == "10.77.2.0/24"
