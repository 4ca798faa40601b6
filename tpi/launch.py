"""`tpi launch`: start a cluster config's master here and each worker on its machine over SSH.

Owns: turning a ``ClusterConfig`` into one ``tpi`` command line per rank (``node_commands``; the
same lines ``--dry-run`` prints for people who start them by hand), and ``Launcher``, which runs
them (locally, or through the system's ``ssh`` with the user's own keys), prefixes every output
line with its rank and host, and stops them all on Ctrl-C or when the master ends. Every child
holds a pipe on its stdin and exits when the pipe closes, so nothing outlives the launcher, also
when the launcher is killed. Does not know: the wire protocol, the model.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import TextIO

from tpi.cluster_config import ClusterConfig, Node

SSH_OPTIONS = ("-o", "BatchMode=yes", "-o", "ServerAliveInterval=5", "-T")


@dataclass(frozen=True)
class NodeCommand:
    rank: int
    host: str
    ssh: str | None  # ssh destination; None: run on this machine
    argv: tuple[str, ...]  # the command line to run on that machine
    prefix: tuple[str, ...] = ()  # run it here through this, e.g. ip netns exec NS (tpi emulate)

    @property
    def label(self) -> str:
        return f"rank {self.rank}@{self.host}"

    def shell(self) -> str:
        return shlex.join(self.argv)


def _node_flags(cfg: ClusterConfig, node: Node) -> list[str]:
    flags = ["--threads", str(node.threads), "--step-timeout", f"{cfg.step_timeout:g}",
             "--join-timeout", f"{cfg.join_timeout:g}"]
    for flag, value in (("--memory-budget", node.memory_budget), ("--window", cfg.window),
                        ("--gpu-memory-budget", node.gpu_memory_budget), ("--max-context", cfg.max_context),
                        ("--compute", cfg.compute)):
        if value is not None:
            flags += [flag, str(value)]
    if node.device != "cpu":
        flags += ["--device", node.device]
    if cfg.prefill_chunk != 512:
        flags += ["--prefill-chunk", str(cfg.prefill_chunk)]
    return flags


def node_commands(cfg: ClusterConfig) -> list[NodeCommand]:
    """Rank order: the master's `tpi serve`, then each worker's `tpi worker`."""
    m = cfg.master
    master = [m.tpi, "serve"]
    if cfg.model != "embedded":
        master += ["--model", cfg.model]
    master += ["--world-size", str(cfg.world_size), "--ratios", ",".join(f"{r:g}" for r in cfg.ratios),
               "--dtype", cfg.dtype, "--wait-for-workers", "--bind", f"tcp://{m.bind_address}:{m.port}",
               "--host", m.http_host, "--port", str(m.http_port), *_node_flags(cfg, m)]
    if cfg.quant != "none":
        master += ["--quant", cfg.quant, "--group-size", str(cfg.group_size)] + (["--quant-head"] if cfg.quant_head
                                                                                 else [])
    if cfg.collective != "star":
        master += ["--collective", cfg.collective]
    if cfg.payload is not None:
        master += ["--payload", cfg.payload]
    if cfg.curve:
        master += ["--curve-key", cfg.key_file(0)]
        for w in cfg.nodes[1:]:
            master += ["--allow-key", w.public_key]
    elif not all(n.local for n in cfg.nodes):
        master.append("--insecure")
    out = [NodeCommand(0, m.host, None, tuple(master))]  # the master runs where tpi launch runs
    for w in sorted(cfg.workers, key=lambda w: w.rank):
        argv = [w.tpi, "worker", "--master", cfg.master_address, "--rank", str(w.rank), *_node_flags(cfg, w)]
        if w.cache_dir:
            argv += ["--cache-dir", w.cache_dir]
        if cfg.curve:
            argv += ["--curve-key", cfg.key_file(w.rank), "--master-key", m.public_key]
        elif not all(n.local for n in cfg.nodes):
            argv.append("--insecure")
        out.append(NodeCommand(w.rank, w.host, _ssh(w), tuple(argv)))
    return out


def _ssh(node: Node) -> str | None:
    return None if node.local else (node.ssh or node.host)


def dry_run(commands: list[NodeCommand], out: TextIO = sys.stdout) -> None:
    """One comment line and one command line per rank, in the order they may be started (any)."""
    for c in commands:
        where = f"{c.host} (ssh {c.ssh})" if c.ssh else c.host if c.rank else f"{c.host} (this machine)"
        role = "master" if c.rank == 0 else "worker"
        print(f"# rank {c.rank} ({role}) on {where}", file=out)
        print(c.shell(), file=out)


class Launcher:
    """The cluster's processes: `start` runs every command, `wait` returns when the master ends
    (or a rank fails), `close` stops them all. Output lines come out prefixed `[rank R@host]`."""

    def __init__(self, commands: list[NodeCommand], out: TextIO = sys.stdout, grace: float = 10.0):
        self.commands, self.out, self.grace = commands, out, grace
        self.procs: dict[int, subprocess.Popen] = {}
        self.threads: list[threading.Thread] = []
        self.lock = threading.Lock()
        self.ended = threading.Event()

    def __enter__(self) -> Launcher:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def argv(self, c: NodeCommand) -> list[str]:
        """What runs here: the command itself, or ssh running it there. `--exit-with-stdin` ties the
        remote process's life to this pipe (ssh closes the remote stdin when the connection ends)."""
        cmd = [c.argv[0], "--exit-with-stdin", *c.argv[1:]]
        if c.ssh is None:
            return [*c.prefix, *cmd]
        return ["ssh", *SSH_OPTIONS, c.ssh, "--", shlex.join(cmd)]

    def start(self) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        for c in self.commands:
            p = subprocess.Popen(self.argv(c), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, start_new_session=True, env=env)
            self.procs[c.rank] = p
            t = threading.Thread(target=self._pump, args=(c, p), daemon=True, name=f"tpi-log-{c.rank}")
            t.start()
            self.threads.append(t)

    def _pump(self, c: NodeCommand, p: subprocess.Popen) -> None:
        for raw in p.stdout:
            line = raw.decode(errors="replace").rstrip("\r\n")
            with self.lock:
                print(f"[{c.label}] {line}", file=self.out, flush=True)
        code = p.wait()
        with self.lock:
            print(f"[{c.label}] exited with code {code}", file=self.out, flush=True)
        if c.rank == 0 or code != 0:
            self.ended.set()

    def wait(self, timeout: float | None = None) -> int | None:
        """Block until the master exits or any rank fails; the master's exit code (None if running)."""
        self.ended.wait(timeout)
        return self.procs[0].poll() if 0 in self.procs else None

    def close(self) -> None:
        """Close every stdin pipe (the children exit on their own), then SIGTERM, then SIGKILL."""
        for p in self.procs.values():
            try:
                p.stdin.close()
            except OSError:
                pass
        deadline = time.monotonic() + self.grace
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for p in self.procs.values():
                try:
                    p.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    _signal_group(p, sig)
            deadline = time.monotonic() + 5
        for p in self.procs.values():
            p.wait(5)
        for t in self.threads:
            t.join(5)
        self.procs.clear()


def _signal_group(p: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(p.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
