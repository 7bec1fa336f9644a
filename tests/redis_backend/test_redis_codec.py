"""Round trips of the Redis wire format (no Redis needed)."""

from __future__ import annotations

import re
import time

import numpy as np
import pytest

from service import tracecontext
from service.batching.types import WorkItem
from service.queueing import codec


@pytest.mark.parametrize(
    "arr",
    [
        np.arange(7, dtype=np.int64),
        np.arange(12, dtype=np.int32).reshape(3, 4),
        np.random.default_rng(0).standard_normal((2, 3, 5)).astype(np.float32),
        np.array([0.5, -1.0], dtype=np.float16),
        np.array([True, False, True]),
        np.array(3.25, dtype=np.float64),  # 0-d
        np.zeros((0, 4), dtype=np.int64),  # empty
        np.arange(6, dtype=">i8"),  # big-endian input comes back native, same values
        np.arange(20, dtype=np.int64).reshape(4, 5)[:, ::2],  # non-contiguous
        np.array([0, 2**16 - 1], dtype=np.uint16),
        np.array([0, 2**32 - 1], dtype=np.uint32),
        np.array([0, 2**64 - 1], dtype=np.uint64),
    ],
)
def test_array_round_trip(arr: np.ndarray) -> None:
    out = codec.decode_array(codec.encode_array(arr))
    assert out.dtype == arr.dtype.newbyteorder("=")
    assert out.shape == arr.shape
    np.testing.assert_array_equal(out, arr)


def test_array_is_packed_not_json() -> None:
    ids = np.arange(100, dtype=np.int64)
    blob = codec.encode_array(ids)
    assert len(blob) == 2 + 4 + 100 * 8  # header + one dim + raw little-endian data
    assert blob[6:14] == (0).to_bytes(8, "little") and blob[14:22] == (1).to_bytes(8, "little")


def test_array_rejects_garbage() -> None:
    with pytest.raises(codec.CodecError):
        codec.decode_array(b"\x00")
    with pytest.raises(codec.CodecError):
        codec.decode_array(codec.encode_array(np.arange(4))[:-1])
    with pytest.raises(codec.CodecError):
        codec.decode_array(bytes([200, 0]))
    with pytest.raises(codec.CodecError):
        codec.encode_array(np.array(["a"]))


def _item() -> WorkItem:
    return WorkItem(
        model="pos",
        bucket=2,
        length=5,
        features={
            "word_ids": np.array([3, 17, 2**40, 0, 9], dtype=np.int64),
            "char_ids": np.arange(5 * 8, dtype=np.int64).reshape(5, 8),
        },
        deadline=time.time() + 1.234567891,
        lane="explain",
    )


def test_work_round_trip() -> None:
    item = _item()
    fields = codec.encode_work(item, reply_to="nlpserve:reply:abc", attempt=2)
    assert all(isinstance(k, bytes) and isinstance(v, bytes) for k, v in fields.items())
    got = codec.decode_work(fields)
    assert got.reply_to == "nlpserve:reply:abc" and got.attempt == 2
    for attr in ("model", "bucket", "length", "deadline", "lane", "id", "enqueued_at"):
        assert getattr(got.item, attr) == getattr(item, attr), attr
    assert got.item.features.keys() == item.features.keys()
    for k, v in item.features.items():
        np.testing.assert_array_equal(got.item.features[k], v)
        assert got.item.features[k].dtype == v.dtype


def test_work_rejects_wrong_version_and_missing_fields() -> None:
    fields = codec.encode_work(_item(), reply_to="r")
    with pytest.raises(codec.CodecError, match="version"):
        codec.decode_work({**fields, codec.F_VERSION: b"9"})
    broken = dict(fields)
    del broken[codec.F_MODEL]
    with pytest.raises(codec.CodecError, match="lacks"):
        codec.decode_work(broken)
    with pytest.raises(codec.CodecError):
        codec.decode_work({**fields, codec.F_BUCKET: b"two"})
    for key in (codec.F_DEADLINE, codec.F_ENQUEUED):
        for value in (b"nan", b"inf", b"-inf"):
            with pytest.raises(codec.CodecError, match="not a time"):
                codec.decode_work({**fields, key: value})


def test_reply_round_trip() -> None:
    outs = {
        "logits": np.random.default_rng(1).standard_normal((5, 17)).astype(np.float32),
        "prob": np.array(0.75, dtype=np.float32),
    }
    reply = codec.decode_reply(codec.encode_reply(codec.Reply("rid-1", outputs=outs)))
    assert reply.id == "rid-1" and reply.status == codec.STATUS_OK and reply.error == ""
    for k, v in outs.items():
        np.testing.assert_array_equal(reply.outputs[k], v)
    reply.outputs["logits"][0, 0] = 1.0  # replies are writable for post-processing

    err = codec.decode_reply(
        codec.encode_reply(codec.Reply("rid-2", status=codec.STATUS_FAILED, error="bad ünput"))
    )
    assert (err.id, err.status, err.error, err.outputs) == (
        "rid-2",
        codec.STATUS_FAILED,
        "bad ünput",
        {},
    )


def test_reply_rejects_garbage() -> None:
    with pytest.raises(codec.CodecError):
        codec.decode_reply(b"hello")
    blob = codec.encode_reply(codec.Reply("x", outputs={"a": np.arange(3)}))
    with pytest.raises(codec.CodecError):
        codec.decode_reply(blob[:-5])


def test_reply_carries_the_batch_seconds_optionally() -> None:
    """The worker reports how long the item's batch ran (the API's Server-Timing header);
    a reply without it (a worker of the version before) reads as 0, a bad one is refused."""
    timed = codec.decode_reply(codec.encode_reply(codec.Reply("r", run_s=0.0123)))
    assert timed.run_s == 0.0123
    assert codec.decode_reply(codec.encode_reply(codec.Reply("r"))).run_s == 0.0
    for bad in (b"-1", b"nan", b"inf", b"soon"):
        frame = codec.encode_frame(
            {codec.F_VERSION: codec.CODEC_VERSION, codec.F_ID: b"r", codec.F_STATUS: b"ok",
             codec.F_RUN_S: bad}
        )  # fmt: skip
        with pytest.raises(codec.CodecError):
            codec.decode_reply(frame)


def test_cancel_message_round_trip() -> None:
    from service.queueing.redis_keys import decode_cancel, encode_cancel

    entries = [
        ("nlpserve:{qa-zh}:v1:b2", b"1733480000000-0"),
        ("a b:{pos-en}:v2:b0:explain", b"5-17"),
    ]
    assert decode_cancel(encode_cancel(entries)) == set(entries)
    assert decode_cancel(b"") == set()


def test_stream_names_carry_the_model_layout_and_parse_back() -> None:
    """Streams are keyed by the model's version and bucket edges (its layout); metrics label
    a stream by (model, version, bucket, lane), whatever the prefix holds."""
    from service.queueing.redis_keys import layout, model_streams, stream_labels, work_stream

    v2 = layout("2", [64, 128])
    assert re.fullmatch(r"v2:e[0-9a-f]{8}", v2)
    assert work_stream("nlpserve", "qa-zh", v2, 3) == f"nlpserve:{{qa-zh}}:{v2}:b3"
    for prefix in ("nlpserve", "a:b1:v2", "x}:v9:b1"):
        for version in ("1", "2024.06-b1"):
            for edges in ([16], [8, 16, 32, 64, 128, 256, 384, 512]):
                stream = work_stream(prefix, "pos-en", layout(version, edges), 7, "explain")
                assert stream_labels(stream) == ("pos-en", version, "7", "explain")
                predict = work_stream(prefix, "pos-en", layout(version, edges), 0)
                assert stream_labels(predict) == ("pos-en", version, "0", "predict")
                batch = work_stream(prefix, "pos-en", layout(version, edges), 2, "batch")
                assert batch.endswith(":b2:batch")
                assert stream_labels(batch) == ("pos-en", version, "2", "batch")
    # versions, and bucket edges, never share a stream
    layouts = [layout("1", [64, 128]), layout("2", [64, 128]), layout("1", [32, 128])]
    assert len(set(layouts)) == 3
    streams = [set(model_streams("p", "m", x, 2)) for x in layouts]
    # 2 buckets x 3 lanes (predict, batch, explain)
    assert all(len(s) == 6 for s in streams) and not any(
        a & b for i, a in enumerate(streams) for b in streams[i + 1 :]
    )


@pytest.mark.parametrize(
    ("url", "logged"),
    [
        ("redis://redis:6379/0", "redis://redis:6379/0"),
        ("redis://:s3cret@redis:6379/0", "redis://***@redis:6379/0"),
        ("rediss://user:s3cret@host:6380", "rediss://***@host:6380"),
        ("redis://host:6379/0?password=s3cret", "redis://host:6379/0?***"),
        ("unix:///run/redis.sock?password=s3cret&db=1", "unix:///run/redis.sock?***"),
    ],
)
def test_logged_redis_urls_carry_no_credentials(url: str, logged: str) -> None:
    from service.queueing.redis_keys import safe_url

    assert safe_url(url) == logged


def test_array_rejects_every_malformed_shape_as_a_codec_error() -> None:
    """The worker dead-letters an entry on CodecError; any other exception would escape it."""
    good = codec.encode_array(np.arange(4, dtype=np.int64))
    bad = [
        bytes([len(codec._DTYPES), 0]),  # the first unknown dtype code
        bytes([0, 2]) + (3).to_bytes(4, "little"),  # 2 dims announced, 1 present
        good + b"\x00",  # trailing bytes: not the announced shape either
    ]
    for blob in bad:
        with pytest.raises(codec.CodecError):
            codec.decode_array(blob)


def test_reply_frame_rejects_bad_magic_version_and_short_values() -> None:
    blob = codec.encode_reply(codec.Reply("x", status=codec.STATUS_FAILED, error="the cause"))
    assert codec.decode_reply(blob).error == "the cause"
    with pytest.raises(codec.CodecError, match="magic"):
        codec.decode_reply(b"XXXX" + blob[len(codec.MAGIC) :])
    with pytest.raises(codec.CodecError, match="truncated"):
        codec.decode_reply(blob[:-2])  # the error text cut short: not silently "the cau"
    fields = codec.decode_frame(blob)
    with pytest.raises(codec.CodecError, match="version"):
        codec.decode_reply(codec.encode_frame({**fields, codec.F_VERSION: b"9"}))


def test_reply_frame_rejects_trailing_bytes_and_a_key_cut_short() -> None:
    """A frame is exactly its fields: extra bytes or a key running past the end are a writer
    that disagrees on the layout, not a reply to act on."""
    blob = codec.encode_reply(codec.Reply("x", status=codec.STATUS_FAILED, error="the cause"))
    with pytest.raises(codec.CodecError, match="2 bytes after"):
        codec.decode_frame(blob + b"\x00\x01")
    long_key = codec.encode_frame({b"k" * 40: b"v"})
    # Cut inside the key: a slice past the end would silently give a shorter key.
    with pytest.raises(codec.CodecError, match="truncated"):
        codec.decode_frame(long_key[: len(codec.MAGIC) + 20])


def test_work_entry_without_an_attempt_field_is_a_first_attempt() -> None:
    fields = codec.encode_work(_item(), reply_to="r", attempt=3)
    del fields[codec.F_ATTEMPT]
    assert codec.decode_work(fields).attempt == 0


def test_work_entry_carries_its_request_trace() -> None:
    """The API's trace id and span (the worker's log lines name them), sampled flag kept."""
    trace = tracecontext.TraceContext("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", True)
    token = tracecontext.CURRENT.set(trace)
    try:
        item = _item()  # made while serving a request: it takes that request's trace
    finally:
        tracecontext.CURRENT.reset(token)
    assert item.trace == trace
    fields = codec.encode_work(item, reply_to="r")
    assert fields[codec.F_TRACE] == b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    assert codec.decode_work(fields).item.trace == trace
    assert _item().trace is None  # made outside a request: none


def test_work_entry_without_a_trace_is_served() -> None:
    """An entry from a replica older than the trace field, or one whose trace is not a valid
    traceparent (a log field is no reason to refuse work), decodes with no trace."""
    token = tracecontext.CURRENT.set(tracecontext.TraceContext("ab" * 16, "cd" * 8))
    try:
        fields = codec.encode_work(_item(), reply_to="r")
    finally:
        tracecontext.CURRENT.reset(token)
    older = {k: v for k, v in fields.items() if k != codec.F_TRACE}
    for entry in (older, {**fields, codec.F_TRACE: b"garbage"}, {**fields, codec.F_TRACE: b""}):
        got = codec.decode_work(entry)
        assert got.item.trace is None and got.item.model == "pos"
