"""Compact wire format for the Redis backend: work entries (stream fields) and replies.

Arrays travel as raw little-endian bytes behind a tiny header, never as JSON lists:

    array  := dtype_code:u8  ndim:u8  dim:u32le * ndim  data (C order, little-endian)

A work entry is a Redis stream entry whose fields are short ASCII keys (see ``F_*``); each
model input is one field ``x:<input name>`` holding an encoded array. A reply is published
as ONE pub/sub message, so it is a framed map of the same kind of fields:

    frame  := MAGIC  count:u16le  (klen:u16le key vlen:u32le value) * count

Both sides share this module, so the format has exactly one definition. ``CODEC_VERSION``
travels with every entry and reply; a mismatch is rejected loudly instead of misparsed.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from service import tracecontext
from service.batching.types import WorkItem

CODEC_VERSION = b"1"
MAGIC = b"NSR1"  # reply frames

# Stream entry / reply field names (short: they are stored once per entry in Redis).
F_VERSION = b"v"
F_ID = b"id"
F_MODEL = b"m"
F_BUCKET = b"b"
F_LANE = b"ln"
F_LENGTH = b"n"
F_DEADLINE = b"dl"
F_ENQUEUED = b"eq"
F_REPLY_TO = b"r"
F_ATTEMPT = b"a"
# optional: the request's trace as a traceparent (its span: the API request's), for the
# worker's log lines; an entry without it (an older replica) is served all the same
F_TRACE = b"tp"
FEATURE_PREFIX = b"x:"
# reply-only fields
F_STATUS = b"s"
F_ERROR = b"e"
F_RUN_S = b"t"  # optional: seconds of the batch the item ran in (a reply without it: 0)
OUTPUT_PREFIX = b"o:"

# Codes are part of the wire format: append, never renumber.
_DTYPES: tuple[str, ...] = (
    "int64",
    "int32",
    "float32",
    "float16",
    "bool",
    "int8",
    "uint8",
    "float64",
    "int16",
    "uint16",
    "uint32",
    "uint64",
)
_CODE = {np.dtype(name): code for code, name in enumerate(_DTYPES)}
_HEAD = struct.Struct("<BB")
_DIM = struct.Struct("<I")
_FRAME_COUNT = struct.Struct("<H")
_FRAME_KEY = struct.Struct("<H")
_FRAME_VAL = struct.Struct("<I")


class CodecError(ValueError):
    """Bytes that are not a valid entry or reply (wrong version, truncated, bad dtype)."""


# --------------------------------------------------------------------------- arrays


def encode_array(arr: np.ndarray) -> bytes:
    arr = np.asarray(arr)
    code = _CODE.get(arr.dtype.newbyteorder("="))
    if code is None:
        raise CodecError(f"dtype {arr.dtype} cannot be encoded")
    if arr.ndim > 255:
        raise CodecError("too many dimensions")
    little = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
    head = _HEAD.pack(code, arr.ndim) + b"".join(_DIM.pack(d) for d in arr.shape)
    return head + little.tobytes()


def decode_array(buf: bytes | memoryview, *, writable: bool = False) -> np.ndarray:
    """Inverse of :func:`encode_array`. Read-only view of ``buf`` unless ``writable``."""
    mv = memoryview(buf)
    if len(mv) < _HEAD.size:
        raise CodecError("truncated array header")
    code, ndim = _HEAD.unpack_from(mv, 0)
    if code >= len(_DTYPES):
        raise CodecError(f"unknown dtype code {code}")
    off = _HEAD.size + ndim * _DIM.size
    if len(mv) < off:
        raise CodecError("truncated array shape")
    shape = tuple(_DIM.unpack_from(mv, _HEAD.size + i * _DIM.size)[0] for i in range(ndim))
    dtype = np.dtype(_DTYPES[code]).newbyteorder("<")
    count = math.prod(shape)  # Python ints: no overflow, and no numpy call per array
    if len(mv) - off != count * dtype.itemsize:
        raise CodecError(f"array data is {len(mv) - off} bytes, shape {shape} needs more/less")
    try:
        arr = np.frombuffer(mv, dtype=dtype, count=count, offset=off).reshape(shape)
    except ValueError as e:  # more than numpy's 64 axes, or an empty array past its size limit
        raise CodecError(f"shape {shape} is not a numpy array: {e}") from e
    native = arr.dtype.newbyteorder("=")
    if writable or native != arr.dtype:  # astype copies, which also makes it writable
        arr = arr.astype(native, copy=True)
    return arr


# --------------------------------------------------------------------------- frames


def encode_frame(fields: Mapping[bytes, bytes]) -> bytes:
    parts = [MAGIC, _FRAME_COUNT.pack(len(fields))]
    for k, v in fields.items():
        parts += [_FRAME_KEY.pack(len(k)), k, _FRAME_VAL.pack(len(v)), v]
    return b"".join(parts)


def decode_frame(buf: bytes) -> dict[bytes, bytes]:
    mv = memoryview(buf)
    if bytes(mv[: len(MAGIC)]) != MAGIC:
        raise CodecError("not a reply frame (bad magic)")
    try:
        (count,) = _FRAME_COUNT.unpack_from(mv, len(MAGIC))
        off = len(MAGIC) + _FRAME_COUNT.size
        out: dict[bytes, bytes] = {}
        for _ in range(count):
            (klen,) = _FRAME_KEY.unpack_from(mv, off)
            off += _FRAME_KEY.size
            if off + klen > len(mv):
                raise CodecError("truncated reply frame")
            key = bytes(mv[off : off + klen])
            off += klen
            (vlen,) = _FRAME_VAL.unpack_from(mv, off)
            off += _FRAME_VAL.size
            if off + vlen > len(mv):
                raise CodecError("truncated reply frame")
            out[key] = bytes(mv[off : off + vlen])
            off += vlen
    except struct.error as e:
        raise CodecError(f"truncated reply frame ({e})") from e
    # A frame is exactly its fields: bytes after them mean a writer that disagrees on the layout.
    if off != len(mv):
        raise CodecError(f"{len(mv) - off} bytes after the reply frame's {count} fields")
    return out


# --------------------------------------------------------------------------- work entries


def encode_work(
    item: WorkItem, reply_to: str, attempt: int = 0, *, offset: float = 0.0
) -> dict[bytes, bytes]:
    """Stream fields for ``item``; ``reply_to`` is the channel of the replica waiting on it.

    ``offset`` turns the item's times into the shared ones of the entry: seconds to add to
    this process's ``time.monotonic()`` to get the Unix time every process reads
    (service/clock.py); 0.0 for an item whose times are Unix times already."""
    fields = {
        F_VERSION: CODEC_VERSION,
        F_ID: item.id.encode(),
        F_MODEL: item.model.encode(),
        F_BUCKET: str(item.bucket).encode(),
        F_LANE: item.lane.encode(),
        F_LENGTH: str(item.length).encode(),
        # repr() of a float round-trips exactly
        F_DEADLINE: repr(float(item.deadline + offset)).encode(),
        F_ENQUEUED: repr(float(item.enqueued_at + offset)).encode(),
        F_REPLY_TO: reply_to.encode(),
        F_ATTEMPT: str(attempt).encode(),
    }
    if item.trace is not None:
        fields[F_TRACE] = item.trace.traceparent.encode()
    for name, arr in item.features.items():
        fields[FEATURE_PREFIX + name.encode()] = encode_array(arr)
    return fields


@dataclass
class DecodedWork:
    item: WorkItem
    reply_to: str
    attempt: int = 0


def _need(fields: Mapping[bytes, bytes], key: bytes) -> bytes:
    try:
        return fields[key]
    except KeyError:
        raise CodecError(f"entry lacks field {key.decode()!r}") from None


def decode_work(fields: Mapping[bytes, bytes], *, offset: float = 0.0) -> DecodedWork:
    """Inverse of :func:`encode_work` (features are read-only views of the entry bytes);
    ``offset`` as there: the item's times come back on this process's monotonic clock
    (0.0: as Unix times, e.g. to inspect a dead letter)."""
    version = fields.get(F_VERSION)
    if version != CODEC_VERSION:
        raise CodecError(f"entry codec version {version!r}, expected {CODEC_VERSION!r}")
    try:
        features = {
            k[len(FEATURE_PREFIX) :].decode(): decode_array(v)
            for k, v in fields.items()
            if k.startswith(FEATURE_PREFIX)
        }
        item = WorkItem(
            model=_need(fields, F_MODEL).decode(),
            bucket=int(_need(fields, F_BUCKET)),
            length=int(_need(fields, F_LENGTH)),
            features=features,
            deadline=_time(fields, F_DEADLINE) - offset,
            lane=_need(fields, F_LANE).decode(),
            id=_need(fields, F_ID).decode(),
            enqueued_at=_time(fields, F_ENQUEUED) - offset,
            trace=_trace(fields.get(F_TRACE)),
        )
        return DecodedWork(
            item, _need(fields, F_REPLY_TO).decode(), int(fields.get(F_ATTEMPT, b"0"))
        )
    except (ValueError, UnicodeDecodeError) as e:
        if isinstance(e, CodecError):
            raise
        raise CodecError(f"malformed entry: {e}") from e


def _trace(raw: bytes | None) -> tracecontext.TraceContext | None:
    """The entry's trace; None without one, or with one that is not a valid traceparent
    (a log field is no reason to refuse work)."""
    parsed = tracecontext.parse_traceparent(raw) if raw else None
    if parsed is None:
        return None
    trace_id, span_id, sampled = parsed
    return tracecontext.TraceContext(trace_id, span_id, sampled)


def _run_s(raw: bytes) -> float:
    """The optional batch seconds of a reply: finite and not negative, else a CodecError."""
    value = float(raw)
    if not math.isfinite(value) or value < 0:
        raise CodecError(f"run time {value} is not a duration")
    return value


def _time(fields: Mapping[bytes, bytes], key: bytes) -> float:
    """A unix time: finite (a NaN deadline or enqueue time made its bucket's oldest wait NaN,
    and the scheduler never picked that bucket again)."""
    value = float(_need(fields, key))
    if not math.isfinite(value):
        raise CodecError(f"field {key!r} is {value}, not a time")
    return value


# --------------------------------------------------------------------------- replies

STATUS_OK = b"ok"
STATUS_FAILED = b"failed"  # the model could not process this input (dead-lettered)
STATUS_EXPIRED = b"expired"


@dataclass
class Reply:
    id: str
    status: bytes = STATUS_OK
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    error: str = ""
    run_s: float = 0.0


def encode_reply(reply: Reply) -> bytes:
    fields = {F_VERSION: CODEC_VERSION, F_ID: reply.id.encode(), F_STATUS: reply.status}
    if reply.error:
        fields[F_ERROR] = reply.error.encode()
    if reply.run_s:
        fields[F_RUN_S] = repr(float(reply.run_s)).encode()
    for name, arr in reply.outputs.items():
        fields[OUTPUT_PREFIX + name.encode()] = encode_array(arr)
    return encode_frame(fields)


def decode_reply(buf: bytes) -> Reply:
    fields = decode_frame(buf)
    if fields.get(F_VERSION) != CODEC_VERSION:
        raise CodecError(f"reply codec version {fields.get(F_VERSION)!r}")
    try:
        outputs = {
            k[len(OUTPUT_PREFIX) :].decode(): decode_array(v, writable=True)
            for k, v in fields.items()
            if k.startswith(OUTPUT_PREFIX)
        }
        return Reply(
            id=_need(fields, F_ID).decode(),
            status=_need(fields, F_STATUS),
            outputs=outputs,
            error=fields.get(F_ERROR, b"").decode(),
            run_s=_run_s(fields.get(F_RUN_S, b"0")),
        )
    except (UnicodeDecodeError, ValueError) as e:
        raise CodecError(f"malformed reply: {e}") from e
