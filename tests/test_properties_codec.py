"""Properties of service/queueing/codec.py: what is encoded decodes to itself, and any other
bytes are a CodecError (the reply listener drops those and goes on; any other exception
takes the whole subscription down, failing every waiting request)."""

from __future__ import annotations

import contextlib
import struct

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from service.batching.types import WorkItem
from service.queueing import codec

DTYPES = [np.dtype(name) for name in codec._DTYPES]

# Every wire dtype, in either byte order, any shape numpy can hold small (0-d and empty too).
any_dtype = st.sampled_from(DTYPES).flatmap(
    lambda dt: st.sampled_from([dt, dt.newbyteorder("<"), dt.newbyteorder(">")])
)
any_array = hnp.arrays(any_dtype, hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5))
names = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=8)


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal dtype (native order), shape and bits (NaNs and -0.0 included)."""
    return (
        a.dtype.newbyteorder("=") == b.dtype
        and a.shape == b.shape
        and np.ascontiguousarray(a, a.dtype.newbyteorder("<")).tobytes()
        == np.ascontiguousarray(b, b.dtype.newbyteorder("<")).tobytes()
    )


@given(any_array, st.booleans())
def test_arrays_round_trip_bit_for_bit(arr: np.ndarray, writable: bool) -> None:
    out = codec.decode_array(codec.encode_array(arr), writable=writable)
    assert _same(arr, out)
    assert out.dtype.isnative
    if writable:
        out[...] = out  # no "read-only" error


@given(st.binary(max_size=64))
def test_any_bytes_decode_to_an_array_that_encodes_back_or_are_a_codec_error(buf: bytes) -> None:
    try:
        arr = codec.decode_array(buf)
    except codec.CodecError:
        return
    assert codec.encode_array(arr) == buf  # one encoding per array: nothing was skipped


dims = st.lists(st.one_of(st.integers(0, 3), st.integers(0, 2**32 - 1)), max_size=70)


@given(st.integers(0, len(codec._DTYPES) - 1), dims, st.binary(max_size=16))
def test_any_header_is_an_array_or_a_codec_error(code: int, shape: list[int], junk: bytes) -> None:
    """Headers numpy cannot build an array of (more than 64 axes; an empty array whose
    other axes multiply past numpy's size limit) are malformed input, not a crash. The data
    is the length the header asks for where that is small, else junk."""
    buf = struct.pack("<BB", code, len(shape)) + b"".join(struct.pack("<I", d) for d in shape)
    need = np.dtype(codec._DTYPES[code]).itemsize * int(np.prod(shape, dtype=object))
    try:
        arr = codec.decode_array(buf + (bytes(need) if need <= 64 else junk))
    except codec.CodecError:
        return
    assert arr.shape == tuple(shape)


def test_an_array_past_numpys_axes_or_size_limit_is_a_codec_error() -> None:
    """The two headers the property above found (each raised numpy's ValueError)."""
    too_many_axes = struct.pack("<BB", 0, 65) + struct.pack("<I", 1) * 65 + bytes(8)
    too_big_empty = struct.pack("<BB", 0, 3) + struct.pack("<III", 0, 2**32 - 1, 2**32 - 1)
    for buf in (too_many_axes, too_big_empty):
        with pytest.raises(codec.CodecError):
            codec.decode_array(buf)
    frame = codec.encode_frame(
        {codec.F_VERSION: codec.CODEC_VERSION, codec.F_ID: b"r", codec.F_STATUS: b"ok"}
        | {codec.OUTPUT_PREFIX + b"y": too_many_axes}
    )
    with pytest.raises(codec.CodecError):
        codec.decode_reply(frame)


fields = st.dictionaries(st.binary(max_size=12), st.binary(max_size=40), max_size=6)


@given(fields)
def test_frames_round_trip(f: dict[bytes, bytes]) -> None:
    assert codec.decode_frame(codec.encode_frame(f)) == f


replies = st.builds(
    codec.Reply,
    id=names,
    status=st.sampled_from([codec.STATUS_OK, codec.STATUS_FAILED, codec.STATUS_EXPIRED]),
    outputs=st.dictionaries(names, any_array, max_size=3),
    error=names,
)


@given(replies)
def test_replies_round_trip(reply: codec.Reply) -> None:
    out = codec.decode_reply(codec.encode_reply(reply))
    assert (out.id, out.status, out.error) == (reply.id, reply.status, reply.error)
    assert out.outputs.keys() == reply.outputs.keys()
    assert all(_same(reply.outputs[k], out.outputs[k]) for k in out.outputs)


@st.composite
def mutated(draw: st.DrawFn, valid: bytes) -> bytes:
    """``valid`` cut short, with bytes overwritten, inserted or appended."""
    buf = bytearray(valid[: draw(st.integers(0, len(valid)))] if draw(st.booleans()) else valid)
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(buf)))
        byte = draw(st.integers(0, 255))
        if draw(st.booleans()) and at < len(buf):
            buf[at] = byte
        else:
            buf.insert(at, byte)
    return bytes(buf)


@given(st.data(), replies)
def test_a_mutated_reply_decodes_or_is_a_codec_error(data: st.DataObject, reply) -> None:
    buf = data.draw(mutated(codec.encode_reply(reply)))
    with contextlib.suppress(codec.CodecError):  # and no other exception
        codec.decode_reply(buf)


@given(st.binary(max_size=80))
def test_random_bytes_are_a_reply_or_a_codec_error(buf: bytes) -> None:
    with contextlib.suppress(codec.CodecError):  # and no other exception
        codec.decode_reply(codec.MAGIC + buf)


finite = st.floats(allow_nan=False, allow_infinity=False)
work_items = st.builds(
    WorkItem,
    model=names,
    bucket=st.integers(0, 64),
    length=st.integers(0, 4096),
    features=st.dictionaries(names, any_array, max_size=3),
    deadline=finite,
    lane=st.sampled_from(["predict", "explain"]),
    id=names,
    enqueued_at=finite,
)


@given(work_items, names, st.integers(0, 2**31))
def test_work_entries_round_trip(item: WorkItem, reply_to: str, attempt: int) -> None:
    out = codec.decode_work(codec.encode_work(item, reply_to, attempt))
    assert (out.reply_to, out.attempt) == (reply_to, attempt)
    got = out.item
    assert (got.model, got.bucket, got.length, got.lane, got.id) == (
        item.model,
        item.bucket,
        item.length,
        item.lane,
        item.id,
    )
    assert (got.deadline, got.enqueued_at) == (item.deadline, item.enqueued_at)
    assert got.features.keys() == item.features.keys()
    assert all(_same(item.features[k], got.features[k]) for k in got.features)


@given(st.data(), work_items)
def test_a_mutated_work_entry_decodes_or_is_a_codec_error(data: st.DataObject, item) -> None:
    entry = codec.encode_work(item, "reply")
    key = data.draw(st.sampled_from(sorted(entry)))
    if data.draw(st.booleans()):
        entry[key] = data.draw(mutated(entry[key]))
    else:
        del entry[key]
    with contextlib.suppress(codec.CodecError):  # and no other exception
        codec.decode_work(entry)
