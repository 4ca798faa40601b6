"""The cluster as processes and sockets: the embedded model against transformers, rogue frames on
the master's port, a worker killed mid-generation, workers free of transformers, teardown."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgpack
import psutil
import pytest
import torch
import zmq
from conftest import assert_close

from tpi import ClusterError, LocalCluster

pytestmark = pytest.mark.cluster

PROMPT = [3, 17, 42, 99, 7, 250, 128, 64, 5, 11]


@pytest.mark.timeout(300)
def test_smollm2_chat_greedy_matches_transformers(smollm2, split_cache):
    path, model, tok = smollm2
    messages = [{"role": "user", "content": "Name three colours of the rainbow."}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
    with torch.no_grad():
        ref_logits = model(torch.tensor([ids])).logits[0]
        ref = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids):].tolist()
    with LocalCluster(path, world_size=3, cache_dir=split_cache) as cluster:
        assert_close(cluster.forward(ids), ref_logits)
        assert cluster.generate(ids, max_new_tokens=24) == ref
        # the text path: the master renders the chat template and detokenises as it streams
        events = list(cluster.stream(messages=messages, max_new_tokens=24))
    streamed = "".join(e["text"] for e, _ in events if e["event"] == "token")
    done = events[-1][0]
    assert done["event"] == "done" and done["ids"] == ref
    assert streamed == done["text"] == tok.decode(ref, skip_special_tokens=True)


@pytest.mark.timeout(120)
def test_stop_strings_and_sampling(smollm2, split_cache):
    path, _, tok = smollm2
    messages = [{"role": "user", "content": "Count from one to ten in words, separated by commas."}]
    with LocalCluster(path, world_size=2, cache_dir=split_cache) as cluster:
        full = cluster.generate_full(messages=messages, max_new_tokens=40)
        text = full["text"]
        assert len(text) > 8, text
        stop = text[5:7]
        cut = cluster.generate_full(messages=messages, max_new_tokens=40, stop=["never-seen", stop])
        assert cut["finish_reason"] == "stop" and cut["text"] == text[:text.find(stop)]
        assert len(cut["ids"]) < len(full["ids"])
        a = cluster.generate_full(messages=messages, max_new_tokens=12, temperature=1.0, top_k=50, top_p=0.9,
                                  seed=7)
        b = cluster.generate_full(messages=messages, max_new_tokens=12, temperature=1.0, top_k=50, top_p=0.9,
                                  seed=7)
        assert a["ids"] == b["ids"]  # same seed, same tokens


def _rogue_frames() -> list[list[bytes]]:
    header = {"k": 5, "seq": 1, "step": 0, "layer": 0, "phase": 0, "length": 1, "dtype": "float32",
              "shape": [1, 64]}
    return [
        [b"\x00garbage"],
        [msgpack.packb([1, 2, 3])],
        [msgpack.packb({"k": 99})],
        [msgpack.packb(header), b"\x00" * 7],  # wrong frame size
        [msgpack.packb(header), b"\x00" * 256],  # well-formed partial from a stranger
        [msgpack.packb({"k": 1, "info": {"rank": 1, "protocol": 1, "digest": "nope"}})],  # fake HELLO
        [b"x" * 10000],
    ]


@pytest.mark.timeout(120)
def test_rogue_peer_is_refused_and_cluster_stays_exact(tiny_models, split_cache):
    path, model = tiny_models("llama")
    with torch.no_grad():
        ref = model(torch.tensor([PROMPT])).logits[0]
    with LocalCluster(path, world_size=3, cache_dir=split_cache) as cluster:
        before = cluster.forward(PROMPT)
        ctx = zmq.Context()
        rogue = ctx.socket(zmq.DEALER)
        rogue.setsockopt(zmq.LINGER, 0)
        rogue.setsockopt(zmq.IDENTITY, b"rank1")  # even claiming a worker's identity
        rogue.connect(cluster.master_address)
        for frames in _rogue_frames():
            rogue.send_multipart(frames)
        during = cluster.forward(PROMPT)  # the master drains the junk while it works
        rogue.close(0)
        ctx.term()
        after = cluster.forward(PROMPT)
    assert torch.equal(before, during) and torch.equal(before, after)
    assert_close(after, ref)


@pytest.mark.timeout(120)
def test_killed_worker_gives_clear_error_quickly(tiny_models, split_cache):
    path, _ = tiny_models("llama")
    with LocalCluster(path, world_size=3, cache_dir=split_cache) as cluster:
        victim = cluster.worker_pids[2]
        started = threading.Event()

        def kill_soon() -> None:
            started.wait(30)
            os.kill(victim, signal.SIGKILL)

        killer = threading.Thread(target=kill_soon)
        killer.start()
        t0 = time.monotonic()
        with pytest.raises(ClusterError, match="rank 2"):
            started.set()
            for _ in range(1000):  # a stream of requests: the kill lands in one of them
                cluster.generate(PROMPT, max_new_tokens=64)
        elapsed = time.monotonic() - t0
        killer.join()
        assert elapsed < 10, f"the error took {elapsed:.1f}s"
        with pytest.raises(ClusterError, match="rank 2"):  # later requests fail fast, no hang
            cluster.forward(PROMPT)
    assert not psutil.pid_exists(victim) or psutil.Process(victim).status() == psutil.STATUS_ZOMBIE


@pytest.mark.timeout(60)
def test_a_worker_imports_none_of_the_masters_packages():
    """What `tpi worker` imports, on a worker's install (tests/no_extras blocks the [master] extra:
    test_cli.py runs whole workers so); the blocker itself is checked."""
    from launcher.cli import MASTER_PACKAGES

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent / "no_extras")}
    code = ("import sys, launcher.cli, tpi.worker, tpi.forward, tpi.comm.spoke, tpi.weights, tpi.fetch; "
            "launcher.cli.build_parser().parse_args(['worker', '--master', 'tcp://127.0.0.1:1', '--rank', '1']); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in launcher.cli.MASTER_PACKAGES))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr
    out = subprocess.run([sys.executable, "-c", f"import {MASTER_PACKAGES[0]}"], capture_output=True, text=True,
                         timeout=60, env=env)
    assert out.returncode != 0 and "a worker's install" in out.stderr


@pytest.mark.timeout(120)
def test_body_raising_tears_everything_down(tiny_models, split_cache):
    path, _ = tiny_models("llama")
    with pytest.raises(RuntimeError, match="boom"):
        with LocalCluster(path, world_size=3, cache_dir=split_cache) as cluster:
            pids = list(cluster.pids.values())
            raise RuntimeError("boom")
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


@pytest.mark.timeout(120)
def test_bad_requests_get_clear_errors(tiny_models, split_cache):
    path, _ = tiny_models("llama")
    with LocalCluster(path, world_size=2, cache_dir=split_cache, max_context=32) as cluster:
        with pytest.raises(ClusterError, match="outside the vocabulary"):
            cluster.forward([1, 2, 100000])
        with pytest.raises(ClusterError, match="empty"):
            cluster.forward([])
        with pytest.raises(ClusterError, match="maximum context of 32"):
            cluster.generate(PROMPT, max_new_tokens=30)
        with pytest.raises(ClusterError, match="max_new_tokens"):
            cluster.generate(PROMPT, max_new_tokens=0)
        assert len(cluster.generate(PROMPT, max_new_tokens=4)) == 4  # still serving
