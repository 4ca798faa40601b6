"""`tpi emulate`: a cluster config's topology on one machine, every rank in its own network namespace.

Owns: the emulated network and its lifetime. One namespace per rank, each with a veth pair whose
other end is a port of one bridge (the switch; the bridge also has an address, so this machine
reaches the master's HTTP API); the link's rate shaped with ``tc tbf`` on both ends of every veth
(a full-duplex link of that rate: a node's egress, and the switch's port towards it); the link's
one-way delay applied to every packet a node sends, with ``netem`` where the kernel has it, else
with ``DelayLine``, the project's own delay proxy (delay_proxy.py). It then runs the config's commands (``launch``)
inside the namespaces, and removes everything at exit: in ``close`` (``finally``, Ctrl-C, SIGTERM,
``atexit``), and, for a run that was killed outright, at the start of the next run (names carry
the pid of the process that made them; those of dead processes are removed).

With the delay proxy, packets a node sends to the subnet are routed (policy rule ``iif lo``) into
its delay line's TUN device, so both directions of every connection (master to worker, worker to
worker) are delayed by their sender, on any port. Delay 0 uses no proxy at all.

Does not know: the wire protocol, the model, what the processes do (``launch.node_commands``).
"""

from __future__ import annotations

import atexit
import dataclasses
import ipaddress
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal, TextIO

from tpi.cluster_config import ClusterConfig, Link
from tpi.delay_proxy import DelayLine, TunError
from tpi.errors import TpiError
from tpi.launch import Launcher, NodeCommand, node_commands

PREFIX = "tpe"  # every name this module makes: tpe<pid><letter>-...
_OWNED = re.compile(rf"{PREFIX}(\d+)([a-z])-")
SUBNETS = [f"10.77.{i}.0/24" for i in range(256)]  # the first one this machine does not route yet
MAX_RANKS = 99  # interface names stay within Linux's 15 characters
RULE_PREF, DELAY_TABLE = "100", "100"
DelayMode = Literal["auto", "netem", "proxy"]
_seq = 0
_active: set[str] = set()  # tags of this process's live emulations


class EmulateError(TpiError, RuntimeError):
    """The emulated cluster cannot be built here; the message says what is missing."""


def check_prerequisites() -> None:
    """Root (namespaces, links, qdiscs) and iproute2's `ip` and `tc`; otherwise a message saying so."""
    if not sys.platform.startswith("linux"):
        raise EmulateError(f"needs Linux network namespaces; this is {sys.platform}")
    if os.geteuid() != 0:
        raise EmulateError("needs root to create network namespaces, links and qdiscs: run it as root "
                           "(e.g. sudo tpi emulate CONFIG)")
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        raise EmulateError(f"needs iproute2: {' and '.join(missing)} not found on PATH (apt-get install iproute2)")


def _run(*argv: str, check: bool = True) -> str:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if check and res.returncode != 0:
        raise EmulateError(f"`{' '.join(argv)}` failed: {res.stderr.strip() or res.stdout.strip()}")
    return res.stdout


# -- names, and the leftovers of runs that were killed ---------------------------------------------
def _new_tag() -> str:
    global _seq
    _seq += 1
    return f"{PREFIX}{os.getpid()}{chr(ord('a') + _seq % 26)}"


def _orphaned(name: str) -> bool:
    m = _OWNED.match(name)
    if m is None:
        return False
    pid = int(m.group(1))
    if pid == os.getpid():
        return f"{PREFIX}{pid}{m.group(2)}" not in _active
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    return False


def _netns_names() -> list[str]:
    return [line.split()[0] for line in _run("ip", "netns", "list").splitlines() if line.strip()]


def _link_names() -> list[str]:
    out = _run("ip", "-o", "link", "show")
    return [m.group(1) for m in re.finditer(r"^\d+: ([^:@\s]+)", out, re.MULTILINE)]


def _kill_namespace(ns: str) -> None:
    """SIGKILL whatever still runs in `ns` (it would keep the namespace alive), then delete it."""
    pids = [int(p) for p in _run("ip", "netns", "pids", ns, check=False).split()]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 5
    while pids and time.monotonic() < deadline and _run("ip", "netns", "pids", ns, check=False).split():
        time.sleep(0.05)  # a killed process leaves the namespace when it is reaped: nothing to wait on
    _run("ip", "netns", "delete", ns, check=False)


def remove_leftovers() -> list[str]:
    """Delete the namespaces and links of emulations whose process is gone; the names removed."""
    removed = [ns for ns in _netns_names() if _orphaned(ns)]
    for ns in removed:
        _kill_namespace(ns)
    for link in _link_names():
        if _orphaned(link):
            _run("ip", "link", "delete", link, check=False)
            removed.append(link)
    return removed


def owned_names() -> list[str]:
    """Every namespace and link of any emulation, live or not (what tests check is gone)."""
    return [n for n in _netns_names() + _link_names() if _OWNED.match(n)]


def _free_subnet() -> str:
    used = _run("ip", "-4", "-o", "addr", "show") + _run("ip", "-4", "route", "show", "table", "all")
    for net in SUBNETS:
        if net.rsplit(".", 1)[0] + "." not in used:  # "10.77.3.": this /24's addresses and routes
            return net
    raise EmulateError("no free subnet among 10.77.0-255.0/24: pass one with --subnet")


# -- the network --------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class EmulatedNode:
    rank: int
    netns: str
    address: str  # its address on the bridge's subnet
    host_link: str  # the veth end on the bridge (the switch's port towards this node)


def _set_tbf(dev: str, rate_bps: float | None, netns: str | None = None,
             parent: tuple[str, ...] = ("root",)) -> None:
    """Shape `dev`'s egress to `rate_bps` with tbf, or remove the shaping (None)."""
    where = ("-n", netns) if netns else ()
    if rate_bps is None:
        _run("tc", *where, "qdisc", "del", "dev", dev, *parent, check=False)
        return
    # a bucket of 2 KB or 20 us of traffic (tc rounds to its clock; it must hold a full frame): after an
    # idle gap one frame passes at once, every byte after it waits for the rate
    burst = int(max(2048, rate_bps / 8 * 20e-6))
    _run("tc", *where, "qdisc", "replace", "dev", dev, *parent, "tbf", "rate", f"{int(rate_bps)}bit",
         "burst", str(burst), "latency", "100ms")


def netem_available(dev: str) -> bool:
    """Probe the kernel: add a netem qdisc to `dev` and remove it again."""
    res = subprocess.run(["tc", "qdisc", "add", "dev", dev, "root", "netem", "delay", "1ms"],
                         capture_output=True, text=True, timeout=30)
    if res.returncode == 0:
        _run("tc", "qdisc", "del", "dev", dev, "root", check=False)
    return res.returncode == 0


class Network:
    """The namespaces, the bridge, the veth pairs, the shaping and the delay lines of one emulation.
    `start` builds them (removing what it built if a step fails), `close` removes them all."""

    def __init__(self, world_size: int, link: Link | None = None, subnet: str | None = None,
                 delay_mode: DelayMode = "auto"):
        if not 1 <= world_size <= MAX_RANKS:
            raise EmulateError(f"world_size={world_size}: tpi emulate runs 1 to {MAX_RANKS} ranks")
        if delay_mode not in ("auto", "netem", "proxy"):
            raise EmulateError(f"delay_mode={delay_mode!r}: expected auto, netem or proxy")
        self.world_size, self.link, self.delay_mode = world_size, link or Link(), delay_mode
        self.subnet_arg = subnet
        self.tag = _new_tag()
        self.bridge = f"{self.tag}-br"
        self.nodes: list[EmulatedNode] = []
        self.delay_lines: dict[int, DelayLine] = {}  # rank -> its egress delay (the proxy)
        self.delay_with: str = "none"  # how delays are applied: none (yet), netem or proxy
        self._made_links: list[str] = []
        self._made_netns: list[str] = []

    def start(self) -> Network:
        _active.add(self.tag)
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def _build(self) -> None:
        net = ipaddress.ip_network(self.subnet_arg or _free_subnet())
        if net.num_addresses < self.world_size + 3:
            raise EmulateError(f"subnet {net} is too small for {self.world_size} ranks and the bridge")
        hosts = list(net.hosts())
        self.subnet, self.bridge_address = str(net), str(hosts[-1])
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        self._made_links.append(self.bridge)
        _run("ip", "addr", "add", f"{self.bridge_address}/{net.prefixlen}", "dev", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")
        for rank in range(self.world_size):
            self.nodes.append(self._add_node(rank, str(hosts[rank]), net.prefixlen))
        self.set_link(self.link)

    def _add_node(self, rank: int, address: str, prefixlen: int) -> EmulatedNode:
        ns, host_link, inner = f"{self.tag}-{rank}", f"{self.tag}-h{rank}", f"{self.tag}-n{rank}"
        _run("ip", "netns", "add", ns)
        self._made_netns.append(ns)
        _run("ip", "link", "add", host_link, "type", "veth", "peer", "name", inner, "netns", ns)
        self._made_links.append(host_link)
        _run("ip", "-n", ns, "link", "set", inner, "name", "eth0")
        _run("ip", "-n", ns, "addr", "add", f"{address}/{prefixlen}", "dev", "eth0")
        _run("ip", "-n", ns, "link", "set", "eth0", "up")
        _run("ip", "-n", ns, "link", "set", "lo", "up")
        _run("ip", "link", "set", host_link, "master", self.bridge, "up")
        return EmulatedNode(rank, ns, address, host_link)

    def set_link(self, link: Link) -> None:
        """Shape every link to `link`'s delay and rate; also while the ranks run (benchmarks sweep it)."""
        if link.delay_s > 0 and self.delay_with == "none":
            self.delay_with = self._delay_method()
        for node in self.nodes:
            self._shape(node, link)
        self.link = link

    def _delay_method(self) -> str:
        if self.delay_mode == "proxy":
            return "proxy"
        if netem_available(self.nodes[0].host_link):
            return "netem"
        if self.delay_mode == "netem":
            raise EmulateError("delay_mode='netem' but this kernel has no netem qdisc (sch_netem): "
                               "use the delay proxy (--delay-mode proxy or auto)")
        return "proxy"

    def _shape(self, node: EmulatedNode, link: Link) -> None:
        rate, delay = link.rate_bps, link.delay_s
        _set_tbf(node.host_link, rate)  # the switch's port towards the node: the node's ingress
        if self.delay_with == "netem":  # the node's egress: netem, then tbf as its child
            _run("tc", "-n", node.netns, "qdisc", "replace", "dev", "eth0", "root", "handle", "1:", "netem",
                 "delay", f"{delay * 1e6:.0f}us", "limit", "100000")
            _set_tbf("eth0", rate, node.netns, ("parent", "1:1", "handle", "10:"))
            return
        _set_tbf("eth0", rate, node.netns)  # the node's egress
        if self.delay_with == "proxy":
            self._set_delay_line(node, delay)

    def _set_delay_line(self, node: EmulatedNode, delay_s: float) -> None:
        """Route the node's packets through its delay line (made on first use), or around it (delay 0)."""
        ns, name = node.netns, f"{self.tag}-d{node.rank}"
        line = self.delay_lines.get(node.rank)
        if line is None and delay_s > 0:
            try:
                line = self.delay_lines[node.rank] = DelayLine(name, delay_s)
            except TunError as e:
                raise EmulateError(str(e)) from None
            _run("ip", "link", "set", name, "netns", ns)
            _run("ip", "-n", ns, "link", "set", name, "up")
            _run("ip", "-n", ns, "route", "add", self.subnet, "dev", name, "src", node.address, "table", DELAY_TABLE)
            # what comes back out of the TUN is forwarded to eth0, although its source is this node's own
            conf = "/proc/sys/net/ipv4"
            _run("ip", "netns", "exec", ns, "sh", "-c",
                 f"echo 1 > {conf}/ip_forward && echo 1 > {conf}/conf/{name}/accept_local && "
                 f"echo 0 > {conf}/conf/{name}/rp_filter && echo 0 > {conf}/conf/all/rp_filter")
            line.start()
        if line is None:
            return
        routed = RULE_PREF in _run("ip", "-n", ns, "rule", "show", "pref", RULE_PREF)
        if delay_s > 0:
            line.delay_s = delay_s
            if not routed:  # locally sent packets (iif lo) to the subnet go through the TUN
                _run("ip", "-n", ns, "rule", "add", "pref", RULE_PREF, "iif", "lo", "lookup", DELAY_TABLE)
        elif routed:
            _run("ip", "-n", ns, "rule", "del", "pref", RULE_PREF)

    def close(self) -> None:
        """Remove everything `start` made; safe to call twice, and after a failed start."""
        for line in self.delay_lines.values():
            line.close()
        self.delay_lines.clear()
        for ns in self._made_netns:
            _kill_namespace(ns)
        for link in self._made_links[::-1]:
            if link in _link_names():
                _run("ip", "link", "delete", link, check=False)
        self._made_netns.clear()
        self._made_links.clear()
        _active.discard(self.tag)


# -- the emulated cluster -------------------------------------------------------------------------------
def _local_tpi() -> str:
    """This machine's tpi: the one installed beside this Python, else the one on PATH."""
    beside = Path(sys.executable).with_name("tpi")
    return str(beside) if beside.is_file() else shutil.which("tpi") or "tpi"


def emulated_config(cfg: ClusterConfig, addresses: list[str]) -> ClusterConfig:
    """`cfg` with each rank at its namespace's address (rank order) and this machine's tpi; the
    master's HTTP API listens on every address of its namespace, so the bridge reaches it. With
    CURVE on, every node's key file (`tpi keys`) must be in this machine's keys_dir."""
    tpi = _local_tpi()
    master = cfg.master.model_copy(update={"host": addresses[0], "bind": addresses[0], "http_host": "0.0.0.0",
                                           "ssh": None, "tpi": tpi})
    workers = [w.model_copy(update={"host": addresses[w.rank], "ssh": None, "tpi": tpi}) for w in cfg.workers]
    # encryption as the config has it (its own hosts decide the default), not as namespace addresses would
    security = cfg.security.model_copy(update={"curve": cfg.curve})
    return cfg.model_copy(update={"master": master, "workers": workers, "security": security})


class Emulation:
    """A cluster config run on this machine in network namespaces. `start`, then `master_url`;
    `wait` returns when the master ends or a rank fails; `close` stops the ranks and removes the network."""

    def __init__(self, cfg: ClusterConfig, subnet: str | None = None, delay_mode: DelayMode = "auto",
                 out: TextIO = sys.stdout):
        self.cfg, self.out = cfg, out
        self.network = Network(cfg.world_size, cfg.link, subnet, delay_mode)
        self.launcher: Launcher | None = None
        self.commands: list[NodeCommand] = []

    def __enter__(self) -> Emulation:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> Emulation:
        check_prerequisites()
        remove_leftovers()
        atexit.register(self.close)
        try:
            self.network.start()
            ecfg = emulated_config(self.cfg, [n.address for n in self.network.nodes])
            self.commands = [dataclasses.replace(c, ssh=None, prefix=("ip", "netns", "exec", n.netns))
                             for c, n in zip(node_commands(ecfg), self.network.nodes)]
            self.launcher = Launcher(self.commands, self.out)
            self.launcher.start()
        except BaseException:
            self.close()
            raise
        return self

    @property
    def master_url(self) -> str:
        """The master's HTTP API as this machine reaches it (through the bridge)."""
        return f"http://{self.network.nodes[0].address}:{self.cfg.master.http_port}"

    def describe(self) -> str:
        net, link = self.network, self.cfg.link or Link()
        how = {"none": "", "netem": " (netem)", "proxy": " (delay proxy: no netem here)"}[net.delay_with]
        rate = f"{link.rate} (tbf)" if link.rate else "unlimited rate"
        shaping = f"{link.delay} one way{how}, {rate}"
        return (f"emulated {self.cfg.name}: {self.cfg.world_size} namespaces {net.tag}-0..{self.cfg.world_size - 1} "
                f"on {net.subnet} (bridge {net.bridge} at {net.bridge_address}), links {shaping}; "
                f"master API at {self.master_url}/v1")

    def wait(self, timeout: float | None = None) -> int | None:
        return self.launcher.wait(timeout) if self.launcher else None

    def close(self) -> None:
        atexit.unregister(self.close)
        try:
            if self.launcher is not None:
                self.launcher.close()
                self.launcher = None
        finally:
            self.network.close()
