"""Authenticated, encrypted links: ZeroMQ CURVE key pairs and their use on the cluster sockets.

Owns: making, saving and loading a node's key pair (Z85 text, the secret file readable by its
owner only), the master's side (CURVE server with a ZAP handler that admits only listed public
keys, so a peer without an allowed key completes no handshake and none of its messages reach
the socket) and a client's side (it must know the master's public key). Does not know: the
protocol carried over the sockets, configs, the model.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import zmq
from zmq.auth.thread import ThreadAuthenticator

from tpi.errors import TpiError

log = logging.getLogger("tpi.comm")
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")  # loopback: links that never leave this machine
_Z85_KEY = re.compile(r"[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}")


class KeyFileError(TpiError, ValueError):
    """A key that is missing, unreadable or malformed; the message names the file or value."""


def check_public_key(key: str, what: str = "public key") -> str:
    if not isinstance(key, str) or not _Z85_KEY.fullmatch(key):
        raise KeyFileError(f"{what} {key!r}: expected the 40-character Z85 text that `tpi keys` prints")
    return key


@dataclass(frozen=True)
class KeyPair:
    public: str  # Z85, 40 characters
    secret: str

    @classmethod
    def generate(cls) -> KeyPair:
        public, secret = zmq.curve_keypair()
        return cls(public.decode(), secret.decode())

    def save(self, path: str | os.PathLike) -> tuple[Path, Path]:
        """Write <path> (secret and public, mode 600) and <path>.pub (public only)."""
        path = Path(path).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"public-key = {self.public}\nsecret-key = {self.secret}\n")
        pub = path.with_name(path.name + ".pub")
        pub.write_text(f"{self.public}\n")
        return path, pub

    @classmethod
    def load(cls, path: str | os.PathLike) -> KeyPair:
        path = Path(path).expanduser()
        if not path.is_file():
            raise KeyFileError(f"key file {str(path)!r}: no such file; make one with `tpi keys`")
        fields = {}
        for line in path.read_text().splitlines():
            name, _, value = line.partition("=")
            fields[name.strip()] = value.strip()
        try:
            return cls(check_public_key(fields["public-key"]), check_public_key(fields["secret-key"], "secret key"))
        except (KeyError, KeyFileError):
            raise KeyFileError(f"key file {str(path)!r}: expected the 'public-key = ...' and 'secret-key = ...' "
                            f"lines written by `tpi keys`") from None


@dataclass(frozen=True)
class Curve:
    """One node's CURVE settings: its own key pair, and either the master's public key (a client)
    or the public keys allowed to connect (the master)."""

    keys: KeyPair
    master_public: str | None = None  # clients
    allowed: tuple[str, ...] = ()  # the master


class _Allowed:
    def __init__(self, keys: tuple[str, ...]):
        self.keys = {k.encode() for k in keys}

    def callback(self, domain: str, key: bytes) -> bool:
        if key not in self.keys:
            log.warning("refused a connection: public key %s is not allowed in this cluster", key.decode()[:12])
            return False
        return True


def secure_server(ctx: zmq.Context, sock: zmq.Socket, curve: Curve) -> ThreadAuthenticator:
    """Make `sock` (not bound yet) a CURVE server admitting only `curve.allowed`; returns the ZAP
    handler thread, which the caller stops (`.stop()`) when it closes the socket."""
    auth = ThreadAuthenticator(ctx, log=logging.getLogger("tpi.comm.zap"))
    auth.start()
    auth.configure_curve_callback("tpi", _Allowed(curve.allowed))
    sock.curve_secretkey = curve.keys.secret.encode()
    sock.curve_publickey = curve.keys.public.encode()
    sock.curve_server = True
    sock.zap_domain = b"tpi"
    return auth


def secure_client(sock: zmq.Socket, curve: Curve) -> None:
    """Make `sock` (not connected yet) a CURVE client of the master."""
    if curve.master_public is None:
        raise KeyFileError("a CURVE client needs the master's public key")
    sock.curve_secretkey = curve.keys.secret.encode()
    sock.curve_publickey = curve.keys.public.encode()
    sock.curve_serverkey = curve.master_public.encode()
