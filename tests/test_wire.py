"""Wire format: every kind survives encode/decode, every malformed message raises WireError with a
message that says what is wrong, and random or mutated frames never raise anything else."""

from __future__ import annotations

import random

import msgpack
import pytest
import torch

from tpi.comm.wire import (
    HOT,
    HOT_MAGIC,
    MAX_HEADER_BYTES,
    WITH_DATA,
    WITH_TENSOR,
    Expect,
    Kind,
    Message,
    WireError,
    decode,
    encode,
)

pytestmark = pytest.mark.unit

HIDDEN = 4
ANY = Expect(frozenset(Kind), hidden=HIDDEN, dtype=torch.float32, max_length=16, max_layer=2)
INFO_KINDS = {Kind.HELLO, Kind.REFUSE, Kind.ERROR}


def frames(header: dict, *extra: bytes) -> list:
    return [msgpack.packb(header), *extra]


def step_header(**fields) -> dict:
    """A valid STEP header for one row of float32, with `fields` changed."""
    return {"k": int(Kind.STEP), "length": 1, "dtype": "float32", "shape": [1, HIDDEN], **fields}


ROW = bytes(4 * HIDDEN)  # one row of float32 zeros


def sample(kind: Kind, dtype: torch.dtype | None) -> Message:
    fields = {"seq": 7, "step": 3, "layer": 1, "phase": 1, "start": 5}
    info = {"reason": "manifest differs", "rank": 2} if kind in INFO_KINDS else {}
    if kind in WITH_DATA:
        return Message(kind, info=info, data=bytes(range(256)) * 3, **fields)
    if dtype is None:
        return Message(kind, info=info, **fields)
    tensor = torch.randn(3, HIDDEN, generator=torch.Generator().manual_seed(int(kind))).to(dtype)
    return Message(kind, length=3, info=info, tensor=tensor, **fields)


ROUND_TRIPS = [(k, None) for k in Kind if k not in WITH_TENSOR]
ROUND_TRIPS += [(k, d) for k in sorted(WITH_TENSOR) for d in (torch.float32, torch.bfloat16)]


@pytest.mark.parametrize("kind,dtype", ROUND_TRIPS, ids=lambda v: getattr(v, "name", str(v)))
def test_round_trip(kind: Kind, dtype: torch.dtype | None) -> None:
    msg = sample(kind, dtype)
    expect = Expect(frozenset({kind}), hidden=HIDDEN, dtype=dtype or torch.float32)
    wire = [bytes(f) for f in encode(msg)]  # as it arrives from a socket
    got = decode(wire, expect)
    assert (got.kind, got.tag, got.start, got.length, got.info) == (msg.kind, msg.tag, msg.start, msg.length,
                                                                    msg.info)
    if kind in WITH_DATA:
        assert got.tensor is None and got.data == msg.data and len(wire) == 2
    elif dtype is None:
        assert got.tensor is None and len(wire) == 1
    else:
        assert got.tensor.dtype == dtype and torch.equal(got.tensor, msg.tensor)
        assert len(wire[1]) == msg.tensor.numel() * msg.tensor.element_size()


def test_round_trip_defaults() -> None:
    msg = Message(Kind.PARTIAL, length=1, tensor=torch.ones(1, HIDDEN))
    got = decode(encode(msg), Expect(frozenset({Kind.PARTIAL}), hidden=HIDDEN))
    assert got == Message(Kind.PARTIAL, length=1, tensor=got.tensor)
    assert torch.equal(got.tensor, msg.tensor)


def test_round_trip_empty_tensor() -> None:
    msg = Message(Kind.PARTIAL, tensor=torch.empty(0, HIDDEN))
    got = decode(encode(msg), Expect(frozenset({Kind.PARTIAL}), hidden=HIDDEN))
    assert got.tensor.shape == (0, HIDDEN)


def test_round_trip_non_contiguous_tensor() -> None:
    t = torch.arange(2.0 * HIDDEN).reshape(HIDDEN, 2).T  # [2, HIDDEN], a transposed view
    got = decode(encode(Message(Kind.REDUCED, length=2, tensor=t)), ANY)
    assert torch.equal(got.tensor, t)


def test_decoded_tensor_owns_its_memory() -> None:
    t = torch.ones(1, HIDDEN)
    wire = encode(Message(Kind.STEP, length=1, tensor=t))
    got = decode(wire, ANY)
    t.zero_()  # the sender reuses its buffer
    assert torch.equal(got.tensor, torch.ones(1, HIDDEN))


ONLY_STEP = Expect(frozenset({Kind.STEP}), hidden=HIDDEN)
FREE = int(Kind.FREE)

MALFORMED = [
    ("random bytes", [b"\xc7\x00garbage"], ANY, "not valid msgpack"),
    ("truncated msgpack", [msgpack.packb({"k": FREE, "seq": 3})[:-1]], ANY, "not valid msgpack"),
    ("bin value", frames({"k": int(Kind.HELLO), "info": {"a": b"xy"}}), ANY, "not valid msgpack"),
    ("non-map", frames([FREE, 1]), ANY, "must be a map, got list"),
    ("no kind", frames({"seq": 1}), ANY, "unknown message kind None"),
    ("unknown kind", frames({"k": 99}), ANY, "unknown message kind 99"),
    ("kind not expected", frames({"k": int(Kind.HELLO)}), ONLY_STEP, r"unexpected message kind HELLO.*\['STEP'\]"),
    ("negative int", frames({"k": FREE, "seq": -1}), ANY, r"field seq=-1"),
    ("str int", frames({"k": FREE, "step": "3"}), ANY, r"field step='3'"),
    ("bool int", frames({"k": FREE, "start": True}), ANY, r"field start=True"),
    ("float int", frames({"k": FREE, "seq": 1.5}), ANY, r"field seq=1\.5"),
    ("huge int", frames({"k": FREE, "seq": 2**63}), ANY, r"field seq=9223372036854775808"),
    ("phase 2", frames({"k": FREE, "phase": 2}), ANY, r"field phase=2"),
    ("layer beyond max", frames({"k": FREE, "layer": 2}), ANY, r"field layer=2: the model has 2 layers"),
    ("length beyond max", frames({"k": FREE, "length": 17}), ANY, r"field length=17: exceeds the limit of 16"),
    ("wrong dtype", frames(step_header(dtype="float16"), ROW), ANY, r"dtype 'float16': expected float32"),
    ("unknown dtype", frames(step_header(dtype="int8"), ROW), ANY, r"dtype 'int8'"),
    ("no dtype", frames({"k": int(Kind.STEP), "length": 1, "shape": [1, HIDDEN]}, ROW), ANY, r"dtype None"),
    ("wrong rows", frames(step_header(shape=[2, HIDDEN]), ROW), ANY, r"shape \[2, 4\]: expected \[1, 4\]"),
    ("wrong hidden", frames(step_header(shape=[1, 5]), ROW), ANY, r"shape \[1, 5\]: expected \[1, 4\]"),
    ("shape not a list", frames(step_header(shape="1x4"), ROW), ANY, r"shape '1x4'"),
    ("frame too short", frames(step_header(), ROW[:-1]), ANY, r"tensor frame has 15 bytes.*needs 16"),
    ("frame too long", frames(step_header(), ROW + b"\0"), ANY, r"tensor frame has 17 bytes"),
    ("missing tensor frame", frames(step_header()), ANY, r"STEP needs a tensor frame, got 0"),
    ("extra frame", frames({"k": FREE}, ROW), ANY, r"FREE carries no tensor"),
    ("three frames", frames(step_header(), ROW, ROW), ANY, r"expected 1 or 2 frames, got 3"),
    ("no frames", [], ANY, r"expected 1 or 2 frames, got 0"),
    ("oversized header", frames({"k": int(Kind.ERROR), "info": {"text": "x" * MAX_HEADER_BYTES}}), ANY,
     rf"header of \d+ bytes exceeds {MAX_HEADER_BYTES}"),
    ("unknown field", frames({"k": FREE, "foo": 1}), ANY, r"unknown header fields \['foo'\]"),
    ("info nested", frames({"k": int(Kind.HELLO), "info": {"a": {"b": 1}}}), ANY, r"field info\['a'\]"),
    ("info list value", frames({"k": int(Kind.HELLO), "info": {"a": [1]}}), ANY, r"field info\['a'\]"),
    ("info bool value", frames({"k": int(Kind.HELLO), "info": {"a": True}}), ANY, r"field info\['a'\]"),
    ("info not a map", frames({"k": int(Kind.HELLO), "info": [1]}), ANY, r"field info: expected a map of at most"),
    ("info too many", frames({"k": int(Kind.HELLO), "info": {str(i): i for i in range(65)}}), ANY,
     r"field info: expected a map of at most 64 entries"),
    ("info text too long", frames({"k": int(Kind.ERROR), "info": {"t": "x" * 2049}}), ANY,
     r"field info\['t'\]: text longer than 2048"),
]




def hot(kind: int = 5, phase: int = 0, code: int = 0, layer: int = 1, seq: int = 7, step: int = 3, start: int = 0,
        length: int = 1, hidden: int = HIDDEN) -> bytes:
    """A PARTIAL's binary header (one row of float32), with fields changed."""
    return HOT.pack(HOT_MAGIC, kind, phase, code, layer, seq, step, start, length, hidden)


MALFORMED += [  # the binary header of PARTIAL and REDUCED
    ("hot truncated", [hot()[:-1], ROW], ANY, r"binary header of 39 bytes: expected 40"),
    ("hot too long", [hot() + b"\0", ROW], ANY, r"binary header of 41 bytes: expected 40"),
    ("hot unknown kind", [hot(kind=99), ROW], ANY, r"unknown message kind 99"),
    ("hot kind not expected", [hot(), ROW], ONLY_STEP, r"unexpected message kind PARTIAL"),
    ("hot for another kind", [hot(kind=int(Kind.STEP)), ROW], ANY, r"STEP must carry a msgpack header"),
    ("msgpack for PARTIAL", frames(step_header(k=int(Kind.PARTIAL)), ROW), ANY, r"PARTIAL must carry the binary"),
    ("hot phase 2", [hot(phase=2), ROW], ANY, r"field phase=2"),
    ("hot layer beyond max", [hot(layer=2), ROW], ANY, r"field layer=2: the model has 2 layers"),
    ("hot huge seq", [hot(seq=1 << 63), ROW], ANY, r"field seq=9223372036854775808"),
    ("hot length beyond max", [hot(length=17), ROW], ANY, r"field length=17: exceeds the limit of 16"),
    ("hot wrong dtype", [hot(code=2), ROW], ANY, r"dtype 'float16': expected float32"),
    ("hot payload dtype", [hot(code=3), ROW], ANY, r"dtype 'q8': expected float32"),
    ("hot unknown dtype", [hot(code=200), ROW], ANY, r"dtype 'code 200'"),
    ("hot wrong hidden", [hot(hidden=5), ROW], ANY, r"shape \[1, 5\]: expected \[1, 4\]"),
    ("hot wrong rows", [hot(length=2), ROW], ANY, r"tensor frame has 16 bytes.*needs 32"),
    ("hot no tensor", [hot()], ANY, r"PARTIAL needs a tensor frame, got 0"),
    ("hot three frames", [hot(), ROW, ROW], ANY, r"expected 1 or 2 frames, got 3"),
]


@pytest.mark.parametrize("name,wire,expect,match", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_raises_wire_error(name: str, wire: list, expect: Expect, match: str) -> None:
    with pytest.raises(WireError, match=match):
        decode(wire, expect)


def test_hot_header_round_trip() -> None:
    got = decode([hot(kind=int(Kind.REDUCED), phase=1, layer=1, seq=(1 << 62) - 1, step=9, start=4), ROW], ANY)
    assert (got.kind, got.tag, got.start, got.length) == (Kind.REDUCED, (2**62 - 1, 9, 1, 1), 4, 1)
    assert torch.equal(got.tensor, torch.zeros(1, HIDDEN))


def test_hot_kinds_refuse_what_the_binary_header_cannot_carry() -> None:
    with pytest.raises(ValueError, match="PARTIAL carries a 2-d tensor and nothing else"):
        encode(Message(Kind.PARTIAL, length=1, info={"a": 1}, tensor=torch.ones(1, HIDDEN)))
    with pytest.raises(ValueError, match="REDUCED carries a 2-d tensor"):
        encode(Message(Kind.REDUCED))
    with pytest.raises(ValueError, match=r"seq, step and start must be in \[0, 2\*\*62\)"):
        encode(Message(Kind.PARTIAL, seq=1 << 62, length=1, tensor=torch.ones(1, HIDDEN)))


def test_unknown_fields_of_mixed_key_types() -> None:
    with pytest.raises(WireError, match="unknown header fields"):
        decode(frames({"k": FREE, b"": 0, "x": 0}), ANY)


@pytest.mark.parametrize("dtype", [[1], {"a": 1}])
def test_unhashable_dtype(dtype) -> None:
    with pytest.raises(WireError, match="dtype"):
        decode(frames(step_header(dtype=dtype), ROW), ANY)


# --- fuzz --------------------------------------------------------------------------------------

VALID = [encode(sample(k, d)) for k, d in ROUND_TRIPS]


def mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(4)
        if op == 0 and b:
            b[rng.randrange(len(b))] = rng.randrange(256)
        elif op == 1 and b:
            del b[rng.randrange(len(b)):]
        elif op == 2:
            b.insert(rng.randint(0, len(b)), rng.randrange(256))
        elif b:
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
    return bytes(b)


def fuzz_case(rng: random.Random) -> list:
    if rng.random() < 0.4:
        header = rng.randbytes(rng.randint(0, 48))
        return [header] + [rng.randbytes(rng.choice([0, 8, 16, 48]))] * rng.randint(0, 2)
    wire = [bytes(f) for f in rng.choice(VALID)]
    wire[0] = mutate(rng, wire[0])
    if len(wire) == 2 and rng.random() < 0.3:
        wire[1] = mutate(rng, wire[1])
    return wire


def test_fuzz_only_wire_errors() -> None:
    rng = random.Random(1234)
    expect = Expect(frozenset(Kind), hidden=HIDDEN, dtype=torch.float32, max_length=16, max_layer=4)
    accepted = 0
    for i in range(2000):
        wire = fuzz_case(rng)
        try:
            decode(wire, expect)
            accepted += 1
        except WireError:
            pass
        except Exception as e:  # noqa: BLE001 - the property under test
            pytest.fail(f"case {i} {wire!r} raised {type(e).__name__}: {e}")
    assert 0 < accepted < 2000  # the mutations reach both outcomes


def test_data_frames_are_bounded() -> None:
    """A MANIFEST or CHUNK frame larger than the receiver allows is refused before it is copied."""
    small = Expect(frozenset({Kind.CHUNK}), max_data=10)
    assert decode(encode(Message(Kind.CHUNK, data=b"x" * 10)), small).data == b"x" * 10
    with pytest.raises(WireError, match="exceeds 10"):
        decode(encode(Message(Kind.CHUNK, data=b"x" * 11)), small)
    with pytest.raises(WireError, match="needs a data frame"):
        decode(encode(Message(Kind.CHUNK))[:1], small)
