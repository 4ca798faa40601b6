"""Which allreduce a cluster runs beside its star control channel, and how a rank builds it.

Owns: the PEERS message's info (the collective chosen, the payload, every rank's address) and its
validation, the host a rank advertises to its peers, and building one rank's collective object
from PEERS (the option values themselves are options.py's). An address "tcp://*:PORT" means
"at the host you reach the master at": a master bound to every interface does not know which of
its addresses the workers use. The star itself stays the control channel (steps, cancel, stats)
and, with collective "star", the allreduce. Does not know: the star's sockets, the model.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

from tpi.comm.base import CommError
from tpi.comm.links import Links
from tpi.comm.payload import Payload, PayloadError, parse
from tpi.comm.security import LOCAL_HOSTS
from tpi.config import ConfigError
from tpi.options import Collective, choices

COLLECTIVES = choices(Collective)
LINKED = ("ring", "tree")  # the ones that run over tpi's own point-to-point links
ANY_HOST = "*"


def host_of(address: str) -> str:
    """'tcp://host:port' -> host."""
    return address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")


def route_to(host: str) -> str:
    """This machine's IP on the route to `host` (no packet is sent); loopback stays loopback."""
    if host in LOCAL_HOSTS:
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((host, 9))
            return s.getsockname()[0]
        except OSError:
            return socket.gethostbyname(socket.gethostname())


def resolve(address: str, master_host: str) -> str:
    """An address from PEERS as this rank dials it: "*" is the master's host as we know it."""
    return address.replace(f"//{ANY_HOST}:", f"//{master_host}:", 1)


def peers_info(collective: str, payload: Payload | None, addresses: list[str]) -> dict[str, Any]:
    return {"collective": collective, "payload": payload.label if payload else "",
            "addresses": " ".join(addresses)}


def parse_peers(info: dict[str, Any], world_size: int) -> tuple[str, Payload | None, list[str]]:
    """PEERS info -> (collective, payload, addresses), or CommError naming what is wrong."""
    collective, payload, text = info.get("collective"), info.get("payload", ""), info.get("addresses", "")
    if collective not in COLLECTIVES[:-1] or not isinstance(payload, str) or not isinstance(text, str):
        raise CommError(f"PEERS names collective {collective!r}, payload {payload!r}: not a collective tpi runs")
    try:
        pay = parse(payload) if payload else None
    except PayloadError as e:
        raise CommError(f"PEERS: {e}") from None
    addresses = text.split() if text else []
    if collective != "star" and len(addresses) != world_size:
        raise CommError(f"PEERS lists {len(addresses)} addresses for a world of {world_size} ranks")
    if any(not a.startswith("tcp://") or ":" not in a[6:] for a in addresses):
        raise CommError(f"PEERS addresses {text[:200]!r}: expected tcp://HOST:PORT each")
    return collective, pay, addresses


def build(collective: str, rank: int, world_size: int, payload: Payload | None, links: Links | None, host: str,
          timeout: float, check: Callable[[], None] | None):
    """One rank's collective object (not yet connected), or None for the star."""
    from tpi.comm.ring import RingAllReduce
    from tpi.comm.tree import TreeAllReduce

    pay = payload or Payload("float32")
    if collective in LINKED:
        if links is None:
            raise CommError(f"rank {rank} has no bound link for the {collective} collective")
        links.check, links.timeout = check, timeout
        cls = RingAllReduce if collective == "ring" else TreeAllReduce
        return cls(rank, world_size, pay, timeout=timeout, links=links)
    if collective == "gloo":
        from tpi.comm.gloo import GlooAllReduce

        return GlooAllReduce(rank, world_size, pay, host, timeout)
    return None


def max_frame(hidden: int) -> int:
    """The largest frame a link accepts: a prefill chunk's partial (512 rows) with room to spare,
    as the star's worker port."""
    return max(1 << 20, 1024 * hidden * 8)


def worker_links(rank: int, world_size: int, master: str, collective: str | None, advertise: str | None,
                 timeout: float, hidden: int) -> Links | None:
    """A worker's bound link, its address to go out in HELLO, should the master choose a ring or a
    tree; None with collective "star" (no port opened). Bound to loopback when the master is on
    loopback, else to every interface, advertised as `advertise` or this machine's route to the master."""
    if collective == "star":
        return None
    host = advertise or route_to(host_of(master))
    bind = "127.0.0.1" if host == "127.0.0.1" else "0.0.0.0"
    return Links(rank, world_size, bind, timeout, advertise=host, max_frame=max_frame(hidden))


def check_choice(required: str | None, chosen: str) -> None:
    """A worker started with an explicit collective refuses a master that runs another one."""
    if required not in (None, "auto", chosen):
        raise ConfigError(f"the master runs the {chosen} collective; this worker was started with "
                          f"collective={required!r}")
