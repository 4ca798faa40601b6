"""The master's end of the cluster: its socket, and the control plane beside the allreduce.

Owns: ``Hub``, rank 0's ``Communicator`` and ``ControlPlane``: one ROUTER socket on the workers'
port (CURVE when keys are given; libzmq heartbeats notice a silent peer; a frame is bounded before
it is read), the dispatch of every message that is not the allreduce's hot path (joins to
membership.py, shard requests to files.py, statistics, errors, goodbyes; anything malformed is
logged and counted in ``refused``), disconnects traced to a rank by probing, ``broadcast``,
``health``, ``gather_stats``, and the collective: the star (star.py) unless the master was asked
for another, which it sets up before the first step after a join by sending PEERS (``auto``
measures the links first, cost.py). Every allreduce goes through one ``CallTimer``. Does not know:
the model, generation, tokenizers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
import zmq
from zmq.utils.monitor import parse_monitor_message

from tpi.comm import collectives
from tpi.comm.base import CommError
from tpi.comm.cost import Link, choose, measure_link
from tpi.comm.files import ShardServer
from tpi.comm.links import Links
from tpi.comm.membership import Members
from tpi.comm.payload import parse
from tpi.comm.security import secure_server
from tpi.comm.star import HubStar, heartbeat_socket
from tpi.comm.trace import CallTimer
from tpi.comm.wire import Expect, Kind, Message, Tag, WireError, decode, encode
from tpi.options import CommOptions
from tpi.stats import Health, RankStats

log = logging.getLogger("tpi.comm")
class Hub:
    """Rank 0's side. `bind` may name port 0; `address` gives the port chosen."""

    rank = 0

    def __init__(self, bind: str, world_size: int, digest: str, hidden: int, dtype: torch.dtype, num_layers: int,
                 opts: CommOptions | None = None, files: ShardServer | None = None, compute: str = "",
                 prefill_chunk: int = 512):
        opts = opts or CommOptions()
        self.world_size, self.step_timeout, self.opts = world_size, opts.step_timeout, opts
        self.payload = parse(opts.payload) if opts.payload else None  # None: partials in the model's dtype
        self.collective_name, self.chosen, self.collective = opts.master_collective, "star", None
        self.hidden, self.dtype = hidden, dtype
        self._coll_links: Links | None = None
        self._coll_stale = self._needs_setup()  # set up before the next step
        self.members = Members(world_size, digest, compute, prefill_chunk)  # workers must match all three
        self.files = files  # answers workers that fetch their shards before joining
        self.star = HubStar(self)
        self.timing = CallTimer(self.rank)
        self.ctx = zmq.Context()
        self.sock = heartbeat_socket(self.ctx, zmq.ROUTER, opts.lost_timeout)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # sending to a gone peer raises, not drops
        # a frame is at most a prefill chunk's partial (512 rows; 1024 rows of 8 bytes leaves room):
        # a stranger cannot make the master buffer gigabytes before anything checks them. Below
        # 64 MiB frames reach tpi, which refuses and logs them; above, libzmq drops the connection
        self.sock.setsockopt(zmq.MAXMSGSIZE, max(64 << 20, 1024 * hidden * 8))
        self.auth = secure_server(self.ctx, self.sock, opts.curve) if opts.curve else None
        self.sock.bind(bind)
        self.address = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.monitor = self.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.poller = zmq.Poller()
        self.poller.register(self.sock, zmq.POLLIN)
        self.poller.register(self.monitor, zmq.POLLIN)
        self._probe_until = 0.0  # after a disconnect, probe the workers until this time
        self._stats: dict[int, RankStats] = {}
        self.refused = 0
        self.expect = Expect(frozenset({Kind.HELLO, Kind.PARTIAL, Kind.ERROR, Kind.STATS_REPLY, Kind.GET_MANIFEST,
                                        Kind.GET_CHUNK, Kind.BYE, Kind.ECHO}), hidden, dtype, max_layer=num_layers)

    def _needs_setup(self) -> bool:
        return self.collective_name != "star" or self.payload is not None

    # -- the allreduce ----------------------------------------------------------------------------
    def all_reduce(self, partial: torch.Tensor, tag: Tag) -> torch.Tensor:
        return self.timing.timed(self._reduce, partial, tag)

    def _reduce(self, partial: torch.Tensor, tag: Tag) -> torch.Tensor:
        if self.collective is None:
            return self.star.reduce(partial, tag)
        try:
            return self.collective.all_reduce(partial, tag)
        except CommError:
            self._coll_stale = True  # set it up anew before the next step
            self._blame()
            raise

    # -- the control plane ------------------------------------------------------------------------
    def wait_for_workers(self, timeout: float, check: Callable[[], None] | None = None) -> None:
        """Block until ranks 1..N-1 have joined; the error names the ranks still missing.
        `check` is called while waiting (e.g. to notice a local worker process that died)."""
        deadline = time.monotonic() + timeout
        note = time.monotonic() + 10
        while self.members.joined < self.world_size - 1:
            if check is not None:
                check()
            left = deadline - time.monotonic()
            missing = self.members.missing
            if left <= 0:
                raise CommError(f"timed out after {timeout:.0f}s waiting for worker rank(s) {missing} "
                                f"to join at {self.address}")
            if time.monotonic() > note:
                log.warning("waiting for worker rank(s) %s to join at %s (%.0fs left)", missing, self.address, left)
                note = time.monotonic() + 10
            self._poll_once(left, None, {})

    def broadcast(self, msg: Message, check: bool = True) -> None:
        """Send to every worker; with `check`, raise PeerLost first if one is lost (a step cannot run),
        without it send to those still there (a CANCEL after a failure)."""
        if msg.kind == Kind.STEP and self._coll_stale:
            self._setup_collective()
        if check:
            self.members.check_alive()
        for ident, _ in self.members.live():
            self.send(ident, msg, quiet=True)
        if check:
            self.members.check_alive()

    def poll_idle(self, timeout: float = 0.0) -> None:
        """Between requests: answer joins, rejoins and shard requests, notice lost workers."""
        deadline = time.monotonic() + timeout
        for _ in range(256):
            if not self._poll_once(max(0.0, deadline - time.monotonic()), None, {}, idle=True):
                return

    def health(self) -> Health:
        return self.members.health()

    def gather_stats(self, timeout: float = 10.0) -> list[RankStats]:
        """Each worker's statistics, in rank order, asked for and awaited with a timeout."""
        self._stats = {}
        self.broadcast(Message(Kind.STATS))
        deadline = time.monotonic() + timeout
        while len(self._stats) < self.world_size - 1:
            self.members.check_alive()
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted(set(range(1, self.world_size)) - set(self._stats))
                raise CommError(f"no statistics from rank(s) {missing} within {timeout:.0f}s")
            self._poll_once(left, None, {})
        return [self._stats[r] for r in sorted(self._stats)]

    # -- what arrives off the hot path --------------------------------------------------------------
    def handle(self, frames: list | None, tag: Tag | None) -> dict[int, torch.Tensor]:
        """One message (`frames`, or the next one within a moment) handled in full; the partials of
        `tag` among them, by rank (a partial only the full decode accepted)."""
        got: dict[int, torch.Tensor] = {}
        if frames:
            self._dispatch(frames, tag, got)
        else:
            self._poll_once(0, tag, got)
        return got

    def refuse(self, what: str) -> None:
        self.refused += 1
        log.warning("refused %s", what)

    def _poll_once(self, timeout: float, tag: Tag | None, parts: dict[int, torch.Tensor], idle: bool = False
                   ) -> bool:
        """Handle at most one message (and any disconnect events); False when nothing came."""
        wait = min(timeout, 0.1 if self._probe_until else 1.0)
        events = dict(self.poller.poll(int(wait * 1000) + 1))
        if self.monitor in events:
            while self.monitor.poll(0):
                parse_monitor_message(self.monitor.recv_multipart())
            self._probe_until = time.monotonic() + 2.0
        if self._probe_until:
            self._probe()
        if self.sock not in events:
            return bool(events)
        self._dispatch(self.sock.recv_multipart(copy=False), tag, parts, idle)
        return True

    def _dispatch(self, frames: list, tag: Tag | None, parts: dict[int, torch.Tensor], idle: bool = False) -> None:
        """Handle one message of any kind, decoded and checked in full."""
        ident, body = frames[0].bytes, frames[1:]
        try:
            msg = decode(body, self.expect)
        except WireError as e:
            self.refuse(f"a message from {ident[:32]!r}: {e}")
            return
        rank = self.members.rank_of(ident)
        if msg.kind == Kind.HELLO:
            self._hello(ident, msg)
        elif msg.kind in (Kind.GET_MANIFEST, Kind.GET_CHUNK):
            reply = self.files.answer(msg) if self.files else Message(
                Kind.REFUSE, info={"reason": "this master serves no shard files"})
            if reply.kind == Kind.REFUSE:
                self.refuse(f"a shard request from {ident[:32]!r}: {reply.info['reason']}")
            self.send(ident, reply, quiet=True)
        elif rank is None:
            self.refuse(f"a {msg.kind.name} from an unknown peer {ident[:32]!r}")
        elif msg.kind == Kind.BYE:
            self.members.leave(rank, str(msg.info.get("reason", "left")))
        elif msg.kind == Kind.ERROR and idle:
            log.warning("rank %d (%s) reported: %s", rank, self.members.hosts[rank], msg.info.get("message", "?"))
        elif msg.kind == Kind.ERROR:
            raise CommError(f"rank {rank} ({self.members.hosts[rank]}) failed: {msg.info.get('message', '?')}")
        elif msg.kind == Kind.STATS_REPLY:
            self._stats_reply(rank, msg.info)
        elif msg.kind == Kind.ECHO:
            log.info("dropped a late link measurement from rank %d", rank)
        elif tag is None or msg.tag != tag or rank in parts:
            log.log(logging.INFO if idle else logging.WARNING, "dropped a stale or out-of-order partial from rank "
                    "%d: %s, expected %s", rank, msg.tag, tag)
        else:
            parts[rank] = msg.tensor

    def _hello(self, ident: bytes, msg: Message) -> None:
        answer = self.members.welcome(ident, msg)
        if answer.refused:
            self.refuse(f"a worker: {answer.refused}")
        if answer.joined:  # a ring or tree is set up anew with it before the next step
            self._coll_stale = self._needs_setup()
        if answer.reply is not None:
            self.send(ident, answer.reply, quiet=True)

    def _stats_reply(self, rank: int, info: dict) -> None:
        try:
            self._stats[rank] = RankStats.from_wire(info)
        except ValueError as e:
            self.refuse(f"statistics from rank {rank}: {e}")

    def _probe(self) -> None:
        """A connection closed: find out whether it was a worker's. Sending to a peer whose pipe
        libzmq has retired raises (ROUTER_MANDATORY), which marks that rank lost."""
        if time.monotonic() > self._probe_until:
            self._probe_until = 0.0
            return
        for ident, _ in self.members.live():
            self.send(ident, Message(Kind.PING), quiet=True)

    def send(self, ident: bytes, msg: Message | list, quiet: bool = False) -> None:
        try:
            self.sock.send_multipart([ident, *(encode(msg) if isinstance(msg, Message) else msg)], copy=False)
        except zmq.ZMQError as e:
            rank = self.members.rank_of(ident)
            if rank is not None:
                self.members.mark_lost(rank, f"connection closed ({e.strerror})")
            if not quiet:
                self.members.check_alive()

    # -- a collective other than the star, or a payload other than the model's dtype -------------
    def _setup_collective(self) -> None:
        """Before the first step after a (re)join: choose the collective (`auto`: by the cost model
        from measured links), send every worker PEERS (the choice, the payload, each rank's address
        for it), and connect. Workers build theirs on PEERS, before the STEP that follows."""
        self._close_collective()
        name, n, addr = self.collective_name, self.hidden, self.members.addresses
        if name == "auto":
            link = self._measure()
            nbytes = self.payload.nbytes(n) if self.payload else n * self.dtype.itemsize  # one token's hidden state
            name = choose(self.world_size, nbytes, link)
            log.warning("collective auto: %s for links of %.0f us and %.3g GB/s", name, link.alpha_s * 1e6,
                        link.bandwidth / 1e9)
        addresses = [""] * self.world_size
        if name in collectives.LINKED:
            missing = [r for r in range(1, self.world_size) if not addr.get(r)]
            if missing:
                raise CommError(f"worker rank(s) {missing} have no link for the {name} collective "
                                "(started with --collective star?)")
            if self._coll_links is None:
                host = collectives.host_of(self.address)
                wild = host in ("0.0.0.0", "*", "::")
                self._coll_links = Links(0, self.world_size, host, self.step_timeout,
                                         advertise=collectives.ANY_HOST if wild else None,
                                         max_frame=collectives.max_frame(self.hidden))
            addresses = [self._coll_links.address] + [addr[r] for r in range(1, self.world_size)]
        peer = collectives.host_of(addr.get(1, "")) if addr.get(1) else ""
        host = collectives.route_to(peer) if peer else collectives.host_of(self.address)
        self.collective = collectives.build(name, 0, self.world_size, self.payload, self._coll_links, host,
                                           self.step_timeout, self._watch)
        if name == "gloo":
            addresses = [self.collective.address] * self.world_size
        self.broadcast(Message(Kind.PEERS, info=collectives.peers_info(name, self.payload, addresses)))
        if self.collective is not None:
            self.collective.connect(addresses)
        self.chosen, self._coll_stale = name, False

    def _blame(self) -> None:
        """A collective failed: if the star notices a lost worker within a second, raise that (it names
        the rank and its host) rather than the collective's own error."""
        deadline = time.monotonic() + 1.0
        while not self.members.lost and time.monotonic() < deadline:
            self._poll_once(0.05, None, {})
        self.members.check_alive()

    def _watch(self) -> None:
        """Called while a collective waits: notice lost workers and their errors."""
        self._poll_once(0, None, {})
        self.members.check_alive()

    def _measure(self) -> Link:
        """The slowest worker link: alpha and bandwidth fitted from ECHO round trips of one hidden
        row and of about 512 KiB (tpi/comm/cost.py)."""
        row = self.hidden * self.dtype.itemsize
        large = max(2, (1 << 19) // row)
        alpha, bandwidth = 0.0, float("inf")
        for ident, rank in self.members.live():
            link = measure_link(lambda k, i=ident, r=rank: self._echo(i, r, max(1, k // row)), small=row,
                                large=large * row, repeats=10)
            alpha, bandwidth = max(alpha, link.alpha_s), min(bandwidth, link.bandwidth)
        return Link(alpha, bandwidth)

    def _echo(self, ident: bytes, rank: int, rows: int) -> float:
        """Seconds for `rows` hidden rows to go to worker `rank` and come back."""
        msg = Message(Kind.ECHO, length=rows, tensor=torch.zeros(rows, self.hidden, dtype=self.dtype))
        t0 = time.perf_counter()
        self.send(ident, msg)
        deadline = time.monotonic() + self.step_timeout
        while time.monotonic() < deadline:
            if not self.sock.poll(100):
                self.members.check_alive()
                continue
            frames = self.sock.recv_multipart(copy=False)
            if self.members.rank_of(frames[0].bytes) == rank:
                try:
                    msg = decode(frames[1:], self.expect)
                    if msg.kind == Kind.ECHO and msg.length == rows:
                        return time.perf_counter() - t0
                except WireError:
                    pass
            self._dispatch(frames, None, {}, idle=True)
        raise self.members.lose(rank, f"did not answer a link measurement within {self.step_timeout:.0f}s")

    def _close_collective(self) -> None:
        if self.collective is not None:
            self.collective.close()
            self.collective = None

    def close(self) -> None:
        self.timing.save()
        for ident in list(self.members.peers):
            self.send(ident, Message(Kind.SHUTDOWN), quiet=True)
        self._close_collective()
        if self._coll_links is not None:
            self._coll_links.close()
        self.monitor.close(0)
        self.sock.close(500 if self.members.peers else 0)  # let the SHUTDOWNs out: else a worker sees a lost master
        if self.auth is not None:
            self.auth.stop()
        self.ctx.term()

