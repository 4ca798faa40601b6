"""The cluster's message schema and wire format, defined once for every backend.

A message is one header frame and, for kinds that carry a tensor, one raw frame with the tensor's
bytes; nothing is ever pickled. The header is a small msgpack map of plain values, except for the
allreduce's own messages (PARTIAL, REDUCED: two per layer per token), whose header is a fixed
40-byte binary record (``HOT``) that starts with 0xC1, a byte msgpack never writes: it is built
with one ``struct.pack`` and checked on the hot path with one bytes comparison (``tensor_header``).
``decode`` checks every field of every message (kind, types, ranges, dtype, shape, frame size)
against what the receiver expects, so a malformed or hostile frame raises ``WireError`` instead of
reaching the model. Does not know: sockets, ranks' roles, the model.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, NamedTuple

import msgpack
import numpy as np
import torch

PROTOCOL_VERSION = 2  # 2: PARTIAL and REDUCED carry the binary header
MAX_HEADER_BYTES = 4096
MAX_TEXT = 2048
MAX_INFO = 64  # entries of an info map (a STATS_REPLY has about 40)


class Kind(IntEnum):
    HELLO = 1  # worker -> master: rank, protocol, manifest digest, pid, host
    WELCOME = 2  # master -> worker
    REFUSE = 3  # master -> worker: reason
    STEP = 4  # master -> worker: seq, step, start, length + hidden state [length, D]
    PARTIAL = 5  # worker -> master: seq, step, layer, phase + partial sum [length, D]
    REDUCED = 6  # master -> worker: seq, step, layer, phase + summed tensor [length, D]
    FREE = 7  # master -> worker: the sequence is done, drop its KV
    CANCEL = 8  # master -> worker: abandon the step in flight for seq and drop its KV
    SHUTDOWN = 9  # master -> worker
    ERROR = 10  # worker -> master: text
    PING = 11  # master -> worker: liveness probe, ignored by the receiver
    STATS = 12  # master -> worker: report your counters
    STATS_REPLY = 13  # worker -> master: counters in info
    GET_MANIFEST = 14  # worker -> master, before joining: rank, protocol
    MANIFEST = 15  # master -> worker: digest, size + the manifest file's bytes
    GET_CHUNK = 16  # worker -> master: file, offset, size (a byte range of one of its shard files)
    CHUNK = 17  # master -> worker: file, offset + the bytes
    BYE = 18  # worker -> master: leaving (SIGTERM, Ctrl-C), with the reason
    PEERS = 19  # master -> worker: the collective and payload to use, every rank's address for it
    ECHO = 20  # either way + a tensor [length, D]: sent back at once (link measurement for `auto`)


class Phase(IntEnum):
    ATTN = 0
    FFN = 1


WITH_TENSOR = {Kind.STEP, Kind.PARTIAL, Kind.REDUCED, Kind.ECHO}
WITH_DATA = {Kind.MANIFEST, Kind.CHUNK}  # a raw bytes frame, not a tensor
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
INT_FIELDS = ("seq", "step", "layer", "phase", "start", "length")
MAX_INT = 1 << 62

HOT_MAGIC = 0xC1  # "never used" in msgpack: no msgpack header starts with it
HOT = struct.Struct("<BBBBIQQQII")  # magic kind phase dtype layer seq step start length hidden: 40 bytes
HOT_KINDS = frozenset({5, 6})  # Kind.PARTIAL, Kind.REDUCED
# dtype codes of the binary header: the model's dtypes and the payloads of payload.py
HOT_DTYPES = ("float32", "bfloat16", "float16", "q8", "q8_64")
HOT_CODES = {name: code for code, name in enumerate(HOT_DTYPES)}


class WireError(ValueError):
    """A message that does not follow the schema; the text says which field and why."""


class Tag(NamedTuple):
    """Identifies one collective: the sequence, its step, the layer and the block within it. A
    named tuple: made twice per layer per token, it must cost next to nothing to build."""

    seq: int
    step: int
    layer: int
    phase: int


@dataclass(frozen=True)
class Message:
    kind: Kind
    seq: int = 0
    step: int = 0
    layer: int = 0
    phase: int = 0
    start: int = 0
    length: int = 0
    info: dict[str, Any] = field(default_factory=dict)  # HELLO/REFUSE/ERROR/STATS details: str, int, float
    tensor: torch.Tensor | None = None
    data: bytes | memoryview | None = None  # MANIFEST/CHUNK: file bytes

    @property
    def tag(self) -> Tag:
        return Tag(self.seq, self.step, self.layer, self.phase)


def encode(msg: Message) -> list:
    """-> [header bytes] or [header bytes, tensor buffer] (the tensor's memory, not a copy)."""
    if msg.kind in HOT_KINDS:
        return _encode_hot(msg)
    header: dict[str, Any] = {"k": int(msg.kind)}
    for name in INT_FIELDS:
        value = getattr(msg, name)
        if value:
            header[name] = value
    if msg.info:
        header["info"] = msg.info
    if msg.data is not None:
        return [msgpack.packb(header), msg.data]
    if msg.tensor is None:
        return [msgpack.packb(header)]
    t = msg.tensor.contiguous()
    header["dtype"] = DTYPE_NAMES[t.dtype]
    header["shape"] = list(t.shape)
    if t.numel() == 0:
        return [msgpack.packb(header), b""]
    return [msgpack.packb(header), _memory(t)]


def _memory(t: torch.Tensor) -> memoryview:
    return memoryview(t.view(torch.uint8).numpy()).cast("B") if t.numel() else memoryview(b"")


def _encode_hot(msg: Message) -> list:
    """PARTIAL / REDUCED: the binary header and the tensor; they have no info and no data."""
    if msg.tensor is None or msg.info or msg.data is not None or msg.tensor.dim() != 2:
        raise ValueError(f"{msg.kind.name} carries a 2-d tensor and nothing else")
    t = msg.tensor.contiguous()
    if any(not 0 <= v < MAX_INT for v in (msg.seq, msg.step, msg.start)):
        raise ValueError(f"{msg.kind.name}: seq, step and start must be in [0, 2**62)")
    return [tensor_header(msg.kind, msg.tag, msg.length, DTYPE_NAMES[t.dtype], t.shape[1], msg.start), _memory(t)]


def tensor_header(kind: Kind, tag: Tag, length: int, dtype: str, hidden: int, start: int = 0) -> bytes:
    """The exact header bytes `encode` writes for a PARTIAL or REDUCED [length, hidden] of `tag`.
    The star's hot path compares a received header with these bytes: one comparison checks kind,
    tag, dtype and shape. `dtype` may name a payload (payload.py's labels)."""
    return HOT.pack(HOT_MAGIC, kind, tag.phase, HOT_CODES[dtype], tag.layer, tag.seq, tag.step, start, length, hidden)


@dataclass(frozen=True)
class Expect:
    """What a receiver accepts: allowed kinds, the hidden size and dtype, limits on lengths."""

    kinds: frozenset[Kind]
    hidden: int = 0
    dtype: torch.dtype = torch.float32
    max_length: int = 1 << 20
    max_layer: int = 1 << 16
    max_data: int = 16 << 20  # bytes in a MANIFEST or CHUNK frame


def decode(frames: list, expect: Expect) -> Message:
    """Validate and parse frames (bytes or zmq.Frame) into a Message; raise WireError otherwise."""
    if not frames or len(frames) > 2:
        raise WireError(f"expected 1 or 2 frames, got {len(frames)}")
    raw = _bytes(frames[0])
    if len(raw) > MAX_HEADER_BYTES:
        raise WireError(f"header of {len(raw)} bytes exceeds {MAX_HEADER_BYTES}")
    if len(raw) and raw[0] == HOT_MAGIC:
        return _decode_hot(raw, frames, expect)
    try:
        header = msgpack.unpackb(raw, raw=False, strict_map_key=True, max_bin_len=0, max_ext_len=0)
    except Exception as e:  # msgpack raises several types for garbage
        raise WireError(f"header is not valid msgpack ({type(e).__name__})") from None
    if not isinstance(header, dict):
        raise WireError(f"header must be a map, got {type(header).__name__}")
    if not all(isinstance(k, str) for k in header):
        raise WireError("unknown header fields: keys must be strings")
    kind = _kind(header.get("k"), expect)
    if kind in HOT_KINDS:
        raise WireError(f"{kind.name} must carry the binary header (0xC1...), not a msgpack one")
    values = {name: _int(header, name, expect) for name in INT_FIELDS}
    info = _info(header.get("info", {}))
    unknown = set(header) - {"k", "info", "dtype", "shape", *INT_FIELDS}
    if unknown:
        raise WireError(f"unknown header fields {sorted(unknown)}")
    tensor = data = None
    if kind in WITH_TENSOR:
        if len(frames) != 2:
            raise WireError(f"{kind.name} needs a tensor frame, got {len(frames) - 1}")
        tensor = _tensor(header, frames[1], values["length"], expect)
    elif kind in WITH_DATA:
        if len(frames) != 2:
            raise WireError(f"{kind.name} needs a data frame, got {len(frames) - 1}")
        raw_data = _bytes(frames[1])
        if len(raw_data) > expect.max_data:
            raise WireError(f"{kind.name} data frame of {len(raw_data)} bytes exceeds {expect.max_data}")
        data = bytes(raw_data)
    elif len(frames) != 1:
        raise WireError(f"{kind.name} carries no tensor, got an extra frame")
    return Message(kind, info=info, tensor=tensor, data=data, **values)


def _decode_hot(raw: bytes | memoryview, frames: list, expect: Expect) -> Message:
    """The binary header of PARTIAL / REDUCED: every field checked as `decode` checks a map's."""
    if len(raw) != HOT.size:
        raise WireError(f"binary header of {len(raw)} bytes: expected {HOT.size}")
    _, k, phase, code, layer, seq, step, start, length, hidden = HOT.unpack(raw)
    kind = _kind(k, expect)
    if kind not in HOT_KINDS:
        raise WireError(f"{kind.name} must carry a msgpack header, not the binary one")
    fields = {"seq": seq, "step": step, "layer": layer, "phase": phase, "start": start, "length": length}
    values = {name: _int(fields, name, expect) for name in INT_FIELDS}
    if len(frames) != 2:
        raise WireError(f"{kind.name} needs a tensor frame, got {len(frames) - 1}")
    name = HOT_DTYPES[code] if code < len(HOT_DTYPES) else f"code {code}"
    tensor = _tensor({"dtype": name, "shape": [length, hidden]}, frames[1], length, expect)
    return Message(kind, tensor=tensor, **values)


def _bytes(frame) -> bytes | memoryview:
    if isinstance(frame, (bytes, bytearray, memoryview)):
        return frame
    return frame.buffer


def _kind(value: Any, expect: Expect) -> Kind:
    if not isinstance(value, int) or isinstance(value, bool):
        raise WireError(f"unknown message kind {value!r}: expected an integer")
    try:
        kind = Kind(value)
    except (ValueError, TypeError):
        raise WireError(f"unknown message kind {value!r}") from None
    if kind not in expect.kinds:
        raise WireError(f"unexpected message kind {kind.name} here; expected one of "
                        f"{sorted(k.name for k in expect.kinds)}")
    return kind


def _int(header: dict, name: str, expect: Expect) -> int:
    value = header.get(name, 0)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0 or value >= MAX_INT:
        raise WireError(f"field {name}={value!r}: expected a non-negative integer")
    if name == "phase" and value not in (Phase.ATTN, Phase.FFN):
        raise WireError(f"field phase={value}: expected 0 (attention) or 1 (FFN)")
    if name == "layer" and value >= expect.max_layer:
        raise WireError(f"field layer={value}: the model has {expect.max_layer} layers")
    if name == "length" and value > expect.max_length:
        raise WireError(f"field length={value}: exceeds the limit of {expect.max_length}")
    return value


def _info(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict) or len(value) > MAX_INFO:
        raise WireError(f"field info: expected a map of at most {MAX_INFO} entries")
    for k, v in value.items():
        if not isinstance(k, str) or not isinstance(v, (str, int, float)) or isinstance(v, bool):
            raise WireError(f"field info[{k!r}]: expected a string or number")
        if isinstance(v, float) and not math.isfinite(v):
            raise WireError(f"field info[{k!r}]: expected a finite number")
        if isinstance(v, str) and len(v) > MAX_TEXT:
            raise WireError(f"field info[{k!r}]: text longer than {MAX_TEXT}")
    return value


def _tensor(header: dict, frame, length: int, expect: Expect) -> torch.Tensor:
    name = header.get("dtype")
    if not isinstance(name, str) or DTYPES.get(name) != expect.dtype:
        raise WireError(f"tensor dtype {name!r}: expected {DTYPE_NAMES[expect.dtype]}")
    dtype = expect.dtype
    shape = header.get("shape")
    if (not isinstance(shape, list) or any(not isinstance(s, int) or isinstance(s, bool) for s in shape)
            or shape != [length, expect.hidden]):
        raise WireError(f"tensor shape {shape!r}: expected [{length}, {expect.hidden}]")
    data = _bytes(frame)
    nbytes = length * expect.hidden * dtype.itemsize
    if len(data) != nbytes:
        raise WireError(f"tensor frame has {len(data)} bytes; shape {shape} of {header['dtype']} needs {nbytes}")
    out = torch.empty((length, expect.hidden), dtype=dtype)
    if nbytes:
        out.view(torch.uint8).numpy().reshape(-1)[:] = np.frombuffer(data, dtype=np.uint8)
    return out
