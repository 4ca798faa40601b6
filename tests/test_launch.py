"""Cluster configs and `tpi launch`: every example validates, broken configs name the field, the
dry run's commands started by hand (workers first) form a working cluster whose workers fetch
their shards. `tpi launch` itself (every shipped local config, stopped with Ctrl-C) is
test_shipped.py's."""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
import yaml

from tpi.cluster_config import check_shares, load_cluster_config, parse_cluster_config
from tpi.config import ConfigError
from tpi.launch import node_commands

ROOT = Path(__file__).resolve().parent.parent
PROMPT_IDS = [1, 9690, 314, 253, 3575, 282, 4649, 47, 2]


@pytest.mark.unit
def test_every_example_config_loads():
    configs = {p.name: load_cluster_config(p) for p in sorted((ROOT / "cluster_configs").glob("*.yaml"))}
    assert {"local-3.yaml", "home-4.yaml", "compose-4.yaml"} <= set(configs)
    assert configs["local-3.yaml"].world_size == 3
    home = configs["home-4.yaml"]
    assert home.world_size == 4 and len(set(home.ratios)) > 1  # uneven shares
    assert {n.device for n in home.nodes} == {"cpu", "cuda"}
    compose = configs["compose-4.yaml"]
    assert compose.link.delay_s == 0.005 and compose.link.rate_bps == 300e6
    assert compose.ratios == [0, 1, 1, 1]  # SmolLM2's 3 KV heads: the master holds no share
    # a loopback master binds loopback (no keys needed); one reached over the network binds everywhere
    assert "--bind tcp://127.0.0.1:5555" in node_commands(configs["local-3.yaml"])[0].shell()
    assert "--bind tcp://0.0.0.0:5555" in node_commands(compose)[0].shell()


@pytest.mark.unit
def test_more_shares_than_kv_heads_are_refused_before_anything_starts(smollm2):
    cfg = parse_cluster_config({"model": str(smollm2[0]), "workers": [{"rank": r} for r in (1, 2, 3)]})
    with pytest.raises(ConfigError, match=r"^x.yaml: master.ratio and workers' ratio: cannot split 3 KV heads "
                                          r"over 4 ranks.*give the others ratio 0.*ratios 0,1,1,1$"):
        check_shares(cfg, "x.yaml")
    check_shares(cfg.model_copy(update={"master": cfg.master.model_copy(update={"ratio": 0})}), "x.yaml")


BROKEN = [
    ({"workers": [{"rank": 2}]}, "workers: ranks [2] must be 1..1, each once"),
    ({"workers": [{"rank": 1}, {"rank": 1}]}, "workers: ranks [1, 1] must be 1..2"),
    ({"workers": [{"host": "pi"}]}, "workers.0.rank: required field is missing"),
    ({"master": {"port": 70000}}, "master.port: got 70000"),
    ({"workers": [{"rank": 1, "device": "tpu"}]}, "workers.0.device: device='tpu': expected cpu, cuda or cuda:N"),
    ({"workers": [{"rank": 1, "memory_budget": "lots"}]}, "workers.0.memory_budget: memory_budget='lots'"),
    ({"workers": [{"rank": 1, "ratio": -1}]}, "workers.0.ratio: got -1"),
    ({"master": {"ratio": 0}, "workers": [{"rank": 1, "ratio": 0}]}, "at least one node needs a positive ratio"),
    ({"link": {"delay": "5"}}, "link.delay: delay='5': expected a duration"),
    ({"link": {"rate": "fast"}}, "link.rate: rate='fast': expected a rate"),
    ({"dtype": "int4"}, "dtype: got 'int4'"),
    ({"window": 0}, "window: got 0"),
    ({"master": {"host": "a b"}}, "master.host: host='a b': expected a host name"),
    ({"wokers": []}, "wokers: unknown field"),
    ({"collective": "mesh"}, "collective: got 'mesh'"),
    ({"collective": "ring", "master": {"host": "10.0.0.1"}}, "collective: 'ring' links are not encrypted"),
    ([1, 2], "expected a mapping of settings, got list"),
]


@pytest.mark.unit
@pytest.mark.parametrize("raw,message", BROKEN, ids=[m.split(":")[0] for _, m in BROKEN])
def test_broken_configs_name_the_field(raw, message):
    with pytest.raises(ConfigError) as err:
        parse_cluster_config(raw, "x.yaml")
    assert message in str(err.value) and str(err.value).startswith("x.yaml: ")


@pytest.mark.unit
def test_unreadable_config_files(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_cluster_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("master: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_cluster_config(bad)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _local_config(tmp_path: Path, world: int, model: Path) -> Path:
    cfg = {"name": "test", "model": str(model), "join_timeout": 120,
           "master": {"host": "127.0.0.1", "bind": "127.0.0.1", "port": _free_port(), "http_port": _free_port()},
           "workers": [{"rank": r, "host": "localhost", "tpi": "tpi"} for r in range(1, world)]}
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _env(tmp_path: Path) -> dict:
    # the `tpi` of this interpreter, with a private cache so that workers start empty
    bindir = str(Path(sys.executable).parent)
    return {**os.environ, "TPI_CACHE": str(tmp_path / "cache"), "PATH": f"{bindir}:{os.environ['PATH']}"}


def _wait_http(url: str, procs: list[subprocess.Popen], timeout: float = 150) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            assert p.poll() is None, f"{p.args} exited with {p.returncode}"
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)  # polling a port that is not open yet: nothing to wait on
    raise AssertionError(f"{url} did not answer within {timeout}s")


def _expected(smollm2, n: int) -> str:
    _, model, tok = smollm2
    with torch.no_grad():
        ref = model.generate(torch.tensor([PROMPT_IDS]), max_new_tokens=n, do_sample=False)[0, len(PROMPT_IDS):]
    return tok.decode(ref, skip_special_tokens=True)


def _complete(port: int, n: int, model: Path) -> str:
    r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                   json={"model": model.name, "prompt": PROMPT_IDS, "max_tokens": n, "temperature": 0,
                         "ignore_eos": True})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_dry_run_commands_started_by_hand_form_the_cluster(smollm2, tmp_path):
    cfg_path = _local_config(tmp_path, 3, smollm2[0])
    out = subprocess.run(["tpi", "launch", str(cfg_path), "--dry-run"], capture_output=True, text=True, timeout=60,
                         env=_env(tmp_path), check=True).stdout
    lines = [ln for ln in out.splitlines() if ln and not ln.startswith("#")]
    assert len(lines) == 3 and lines[0].startswith("tpi serve") and all(" worker " in ln for ln in lines[1:])
    procs = []
    try:  # workers first: they wait for the master, which comes last
        for line in [*lines[1:], lines[0]]:
            procs.append(subprocess.Popen(shlex.split(line), env=_env(tmp_path), stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL, start_new_session=True))
        http_port = load_cluster_config(cfg_path).master.http_port
        _wait_http(f"http://127.0.0.1:{http_port}/health", procs)
        assert _complete(http_port, 12, smollm2[0]) == _expected(smollm2, 12)
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    for r in (1, 2):  # the workers fetched their own files
        assert list((tmp_path / "cache" / "fetched" / f"rank{r}" / f"rank{r}").glob("layer*.safetensors"))
    assert all(p.returncode in (0, 143) for p in procs), [p.returncode for p in procs]


@pytest.mark.unit
def test_collective_and_payload_reach_the_master_command():
    cfg = parse_cluster_config({"collective": "tree", "payload": "bfloat16", "workers": [{"rank": 1}]})
    master = node_commands(cfg)[0].shell()
    assert "--collective tree" in master and "--payload bfloat16" in master
    assert "--collective" not in node_commands(parse_cluster_config({}))[0].shell()  # the default says nothing


@pytest.mark.unit
def test_launch_commands_carry_the_config():
    cfg = load_cluster_config(ROOT / "cluster_configs" / "home-4.yaml")
    cmds = node_commands(cfg)
    assert [c.rank for c in cmds] == [0, 1, 2, 3]
    assert cmds[0].ssh is None and cmds[2].ssh == "pi@raspberrypi.local" and cmds[3].ssh == "192.168.1.13"
    master = cmds[0].shell()
    assert "--world-size 4 --ratios 2,2,1,3" in master and "--bind tcp://0.0.0.0:5555" in master
    assert cmds[2].argv[0] == "/home/pi/venv/bin/tpi"
    assert "--master tcp://192.168.1.10:5555 --rank 3" in cmds[3].shell() and "--device cuda" in cmds[3].shell()
