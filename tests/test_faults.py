"""Faults and trust, with real processes: workers killed, hung, restarted and stopped; the master
killed and restarted under running workers; CURVE keeping strangers out; a lost worker as HTTP 503
and a degraded /health."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
import torch
import zmq

from tpi import ClusterError, LocalCluster
from tpi.comm.hub import Hub
from tpi.comm.security import Curve, KeyPair
from tpi.comm.wire import PROTOCOL_VERSION, Kind, Message, encode
from tpi.options import CommOptions

PROMPT = [3, 17, 42, 99, 7, 250, 128, 64, 5, 11]


@pytest.fixture(scope="module")
def llama(tiny_models):
    path, model = tiny_models("llama")
    with torch.no_grad():
        ref = model.generate(torch.tensor([PROMPT]), max_new_tokens=64, do_sample=False)[0, len(PROMPT):].tolist()
    return path, ref


def _fail_after(cluster: LocalCluster, n_tokens: int, fault) -> tuple[float, str]:
    """Stream a 64-token generation, call `fault()` after `n_tokens` tokens; -> (seconds until the
    request failed, the error)."""
    t_fault, seen = None, 0
    with pytest.raises(ClusterError) as err:
        for event, _ in cluster.stream(PROMPT, 64, ignore_eos=True):
            if event["event"] == "token":
                seen += 1
                if seen == n_tokens:
                    fault()
                    t_fault = time.monotonic()
    assert t_fault is not None, "generation ended before the fault"
    return time.monotonic() - t_fault, str(err.value)


@pytest.mark.cluster
@pytest.mark.timeout(240)
def test_killed_worker_fails_fast_and_restart_restores_exact_output(llama, split_cache):
    path, ref = llama
    with LocalCluster(path, 3, cache_dir=split_cache) as cluster:
        assert cluster.generate(PROMPT, 64) == ref
        for i in range(5):
            rank = 1 + i % 2
            pid = cluster.worker_pids[rank]
            took, message = _fail_after(cluster, 5, lambda pid=pid: os.kill(pid, signal.SIGKILL))
            assert took < 5 and f"worker rank {rank}" in message and f"pid {pid}" in message, (took, message)
            health = cluster.health()
            assert health.missing == (rank,)
            with pytest.raises(ClusterError, match=f"worker rank {rank}"):  # no hang: refused at once
                cluster.generate(PROMPT, 4)
            cluster.restart_worker(rank)
            assert cluster.worker_pids[rank] != pid and cluster.health().missing == ()
            assert cluster.generate(PROMPT, 64) == ref


@pytest.mark.cluster
@pytest.mark.timeout(180)
def test_hung_worker_is_declared_lost_then_rejoins_after_sigcont(llama, split_cache):
    path, ref = llama
    with LocalCluster(path, 3, cache_dir=split_cache, lost_timeout=3.0) as cluster:
        pid = cluster.worker_pids[2]
        try:
            took, message = _fail_after(cluster, 5, lambda: os.kill(pid, signal.SIGSTOP))
            assert took < 3.0 + 2.0 and "worker rank 2" in message, (took, message)
            assert cluster.health().missing == (2,)
        finally:
            os.kill(pid, signal.SIGCONT)
        deadline = time.monotonic() + 30
        while cluster.health().missing:  # the same process reconnects by itself
            assert time.monotonic() < deadline, cluster.health()
            time.sleep(0.1)
        assert cluster.worker_pids[2] == pid
        assert cluster.generate(PROMPT, 64) == ref


@pytest.mark.cluster
@pytest.mark.timeout(180)
def test_workers_rejoin_a_restarted_master(llama, split_cache):
    path, ref = llama
    with LocalCluster(path, 3, cache_dir=split_cache) as cluster:
        assert cluster.generate(PROMPT, 16) == ref[:16]
        workers = dict(cluster.worker_pids)
        os.kill(cluster.pids[0], signal.SIGKILL)
        cluster.restart_master()
        assert cluster.worker_pids == workers  # not restarted
        assert cluster.generate(PROMPT, 64) == ref


@pytest.mark.cluster
@pytest.mark.timeout(120)
def test_sigterm_on_a_worker_fails_the_request_with_the_reason(llama, split_cache):
    path, ref = llama
    with LocalCluster(path, 2, cache_dir=split_cache) as cluster:
        pid = cluster.worker_pids[1]
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while 1 not in cluster.health().missing:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert "SIGTERM" in cluster.health().reasons[1] or "closed" in cluster.health().reasons[1]
        with pytest.raises(ClusterError, match="worker rank 1"):
            cluster.generate(PROMPT, 4)
        cluster.restart_worker(1)
        assert cluster.generate(PROMPT, 64) == ref


@pytest.mark.cluster
@pytest.mark.timeout(120)
def test_curve_cluster_is_exact(llama, split_cache, tmp_path):
    path, ref = llama
    with LocalCluster(path, 3, cache_dir=split_cache, curve=True, worker_cache_dir=tmp_path) as cluster:
        assert cluster.generate(PROMPT, 64) == ref
        assert all(r.fetched_bytes > 0 for r in cluster.stats()[1:])  # the download is encrypted too


def _stranger(address: str, curve: Curve | None) -> zmq.Socket:
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, b"rank1")
    if curve is not None:
        sock.curve_secretkey = curve.keys.secret.encode()
        sock.curve_publickey = curve.keys.public.encode()
        sock.curve_serverkey = curve.master_public.encode()
    sock.connect(address)
    return sock


@pytest.mark.cluster
@pytest.mark.timeout(60)
def test_a_peer_without_an_allowed_key_cannot_join_or_inject():
    master_keys, worker_keys = KeyPair.generate(), KeyPair.generate()
    master = Hub("tcp://127.0.0.1:0", 2, "d" * 64, 4, torch.float32, 2,
                 CommOptions(curve=Curve(master_keys, allowed=(worker_keys.public,))))
    hello = encode(Message(Kind.HELLO, info={"rank": 1, "protocol": PROTOCOL_VERSION, "digest": "x", "pid": 1}))
    partial = encode(Message(Kind.PARTIAL, length=1, tensor=torch.ones(1, 4)))
    socks = []
    try:
        for curve in (None, Curve(KeyPair.generate(), master_public=master_keys.public)):  # plain; unknown key
            sock = _stranger(master.address, curve)
            socks.append(sock)
            for _ in range(20):
                sock.send_multipart(hello, zmq.NOBLOCK) if sock.poll(0, zmq.POLLOUT) else None
                sock.send_multipart(partial, zmq.NOBLOCK) if sock.poll(0, zmq.POLLOUT) else None
            assert not master.sock.poll(1500), "a frame from a peer without an allowed key reached the master"
            assert not sock.poll(100), "the master answered a stranger"
        allowed = _stranger(master.address, Curve(worker_keys, master_public=master_keys.public))
        socks.append(allowed)
        allowed.send_multipart(hello)
        assert master.sock.poll(5000), "the allowed key's HELLO did not arrive"  # the control experiment
        master.poll_idle(1.0)
        assert allowed.poll(5000) and allowed.recv_multipart()  # refused for its digest: it reached the handler
        assert master.members.peers == {}
    finally:
        for s in socks:
            s.close(0)
        master.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_http_503_and_degraded_health_when_a_worker_is_lost(smollm2, tmp_path):
    path, _, _ = smollm2
    port = _free_port()
    env = {**os.environ, "TPI_CACHE": str(tmp_path)}
    server = subprocess.Popen([sys.executable, "-m", "launcher.cli", "serve", "--model", str(path), "--world-size",
                               "2", "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 150
        while True:
            assert server.poll() is None and time.monotonic() < deadline, "the server did not start"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        import psutil

        worker = next(p for p in psutil.Process(server.pid).children(recursive=True)
                      if "spawn" in " ".join(p.cmdline()) and "resource_tracker" not in " ".join(p.cmdline()))
        worker.kill()
        deadline = time.monotonic() + 10
        while (h := httpx.get(f"{url}/health", timeout=5)).status_code != 503:
            assert time.monotonic() < deadline, h.json()
            time.sleep(0.1)
        assert h.json()["status"] == "degraded" and h.json()["missing_ranks"] == [1]
        r = httpx.post(f"{url}/v1/completions", timeout=30,
                       json={"model": path.name, "prompt": "Hello", "max_tokens": 4})
        assert r.status_code == 503 and "worker rank 1" in r.json()["error"]["message"], r.text
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
