"""The delay proxy of `tpi emulate`: a node's outgoing packets held for a one-way delay, in Python.

Owns: ``DelayLine``, one node's egress delay where the kernel has no netem: packets the node sends
to the subnet are routed into a TUN device whose file descriptor this object holds; a reader thread
stamps each packet and a writer thread writes it back at stamp + delay, after which the node's
kernel forwards it out of its veth. It works on packets, not connections, so every link is
delayed whatever the port, packets of one direction leave in order, and none waits for another's
delay. The device lives as long as the descriptor: a killed emulator leaves none behind. Does not
know: namespaces and routes (emulate.py sets them up), the cluster.
"""

from __future__ import annotations

import fcntl
import os
import queue
import select
import struct
import threading
import time

from tpi.errors import TpiError

TUNSETIFF, IFF_TUN, IFF_NO_PI = 0x400454CA, 0x0001, 0x1000


class TunError(TpiError, RuntimeError):
    """The TUN device for a delay line cannot be made; the message says why."""


def _open_tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    except OSError as e:
        os.close(fd)
        raise TunError(f"cannot create the TUN device {name} for the delay proxy: {e}") from None
    return fd


class DelayLine:
    """One node's egress delay: IP packets read from its TUN device are written back `delay_s` later.

    The device lives as long as this object's file descriptor: a killed emulator leaves none behind."""

    def __init__(self, name: str, delay_s: float):
        if delay_s <= 0:
            raise ValueError(f"delay_s={delay_s}: a delay line needs a positive delay")
        self.name, self.delay_s = name, delay_s
        self.packets = 0  # packets delayed so far
        self.fd = _open_tun(name)
        self._wake_r, self._wake_w = os.pipe()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()  # (due, packet) in arrival order
        self._threads = [threading.Thread(target=self._read, daemon=True, name=f"tpi-delay-read-{name}"),
                         threading.Thread(target=self._write, daemon=True, name=f"tpi-delay-write-{name}")]

    def start(self) -> DelayLine:
        for t in self._threads:
            t.start()
        return self

    def _read(self) -> None:
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while all(fd != self._wake_r for fd, _ in poller.poll()):
            while True:  # drain the burst that woke us
                try:
                    packet = os.read(self.fd, 65536)
                except BlockingIOError:
                    break
                except OSError:
                    return
                self._queue.put((time.monotonic() + self.delay_s, packet))

    def _write(self) -> None:
        while (item := self._queue.get()) is not None:
            due, packet = item
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            try:
                os.write(self.fd, packet)
                self.packets += 1
            except OSError:
                pass  # the namespace is going away, or a packet the stack refuses: a wire drops it too

    def close(self) -> None:
        os.write(self._wake_w, b"x")
        self._queue.put(None)
        for t in self._threads:
            if t.is_alive():
                t.join(5)
        for fd in (self.fd, self._wake_r, self._wake_w):
            os.close(fd)
