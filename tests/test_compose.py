"""docker-compose.yml, the Dockerfile and the container entrypoint: the compose file validates
(`docker-compose config` where installed, and always against the Compose Specification's JSON
schema in tests/data), has what the cluster recipe needs, and runs exactly the commands `tpi
launch --dry-run` gives for cluster_configs/compose-4.yaml; the entrypoint runs tpi unshaped, and
refuses clearly when it cannot shape the link. No Docker engine is needed."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from tpi.cluster_config import load_cluster_config
from tpi.config import parse_bytes
from tpi.launch import node_commands

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DEFAULT = re.compile(r"\$\{(\w+):-([^}]*)\}")  # ${VAR:-default}
MOUNT = re.compile(r"(.+):(/[^:]*)(?::(ro|rw))?")  # source (may hold ${VAR:-default}):target[:mode]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())  # merge keys (<<: *node) resolved


@pytest.fixture(scope="module")
def cluster():
    return load_cluster_config(ROOT / "cluster_configs" / "compose-4.yaml")


def _docker_compose() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return None


def test_compose_file_validates(compose):
    schema = json.loads((ROOT / "tests" / "data" / "compose_spec.json").read_text())
    validator = jsonschema.Draft7Validator(schema)
    errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(compose)]
    assert not errors, errors
    broken = {**compose, "services": {**compose["services"], "master": {**compose["services"]["master"], "cpu": 1}}}
    assert not validator.is_valid(broken)  # the schema does catch a misspelt key
    tool = _docker_compose()
    if tool is not None:  # the real parser too, where installed (Debian: apt-get install docker-compose)
        res = subprocess.run([*tool, "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True, timeout=60,
                             env={k: v for k, v in os.environ.items() if not k.startswith(("LINK_", "TPI_MODEL"))})
        assert res.returncode == 0, res.stderr


def _mem_bytes(limit: str) -> int:
    num, unit = re.fullmatch(r"(\d+)([kmg]?)", limit.lower()).groups()
    return int(num) * 1024 ** " kmg".index(unit or " ")


def test_every_service_is_a_small_device_with_a_shaped_link(compose, cluster):
    nodes = {n.host: n for n in cluster.nodes}
    for name, svc in compose["services"].items():
        assert "NET_ADMIN" in svc["cap_add"] and 0 < svc["cpus"] <= 2, name
        assert _mem_bytes(svc["mem_limit"]) > parse_bytes(nodes[name].memory_budget), (name, svc["mem_limit"])
        env = {k: DEFAULT.fullmatch(v).groups() for k, v in svc["environment"].items()}
        assert env["LINK_DELAY"] == ("LINK_DELAY", cluster.link.delay)
        assert env["LINK_RATE"] == ("LINK_RATE", cluster.link.rate)
        assert svc["healthcheck"]["test"][-1] == ("master" if name == "master" else "worker")
        mounts = [MOUNT.fullmatch(v).groups() for v in svc.get("volumes", [])]  # (source, target, mode)
        model_mounts = [m for m in mounts if m[1] == "/model"]
        if name == "master":
            assert [m[2] for m in model_mounts] == ["ro"]  # the model, read-only, on the master only
            assert svc["ports"] == [f"{cluster.master.http_port}:{cluster.master.http_port}"]
        else:
            assert not model_mounts and "ports" not in svc and svc["depends_on"] == ["master"]
    entry = (ROOT / "docker" / "entrypoint.sh").read_text()
    assert all(word in entry for word in ("netem", "LINK_DELAY", "LINK_RATE", 'exec tpi "$@"'))


def test_compose_runs_the_commands_of_compose_4(compose, cluster):
    services = compose["services"]
    commands = node_commands(cluster)
    assert set(services) == {c.host for c in commands}  # service names are the config's hosts
    for c in commands:
        expected = list(c.argv[1:]) + (["--model", "/model"] if c.rank == 0 else [])
        assert [str(a) for a in services[c.host]["command"]] == expected, c.host
    assert [c.rank for c in commands] == [0, 1, 2, 3]


def test_dockerfile_installs_torch_first_then_tpi():
    lines = [ln.strip() for ln in (ROOT / "Dockerfile").read_text().splitlines()]
    torch = next(i for i, ln in enumerate(lines) if "torch==2.13.0" in ln and ln.startswith("RUN pip install"))
    tpi = next(i for i, ln in enumerate(lines) if ln.startswith("RUN pip install") and ln.endswith(' ".[master]"'))
    assert torch < tpi and any("iproute2" in ln for ln in lines)
    copied = {ln.split()[1] for ln in lines if ln.startswith("COPY")}
    assert {"pyproject.toml", "tpi", "launcher", "docker"} <= copied
    assert 'ENTRYPOINT ["/opt/tpi/docker/entrypoint.sh"]' in lines
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert not {"tpi", "launcher", "docker", "pyproject.toml", "README.md"} & set(ignored)


def _entrypoint(env: dict, *args: str) -> subprocess.CompletedProcess:
    path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
    return subprocess.run(["sh", str(ROOT / "docker" / "entrypoint.sh"), *args], capture_output=True, text=True,
                          timeout=120, env={"PATH": path, "HOME": os.environ.get("HOME", "/tmp"), **env})


def test_entrypoint_runs_tpi_and_refuses_a_link_it_cannot_shape():
    res = _entrypoint({}, "worker", "--help")  # no LINK_*: no shaping, straight to tpi
    assert res.returncode == 0 and "--master" in res.stdout, res.stderr
    res = _entrypoint({"LINK_DELAY": "5ms", "LINK_RATE": "300mbit", "LINK_DEV": "tpi-no-such-dev"}, "--help")
    assert res.returncode == 1 and "cannot shape tpi-no-such-dev with netem (delay '5ms', rate '300mbit')" in res.stderr
    assert "NET_ADMIN" in res.stderr
