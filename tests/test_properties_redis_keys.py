"""Properties of the Redis key layout (service/queueing/redis_keys.py): a work stream's
name parses back into its labels whatever the key prefix holds, a cancel message decodes
to the entries it was made of, and a worker's published pace reads back exactly (anything
else in its hash field reads as no pace, never as a NaN or infinite one)."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from service.batching.scheduler import DEFAULT_LANES
from service.queueing.redis_keys import (
    decode_cancel,
    decode_pace,
    encode_cancel,
    encode_pace,
    layout,
    stream_labels,
    work_stream,
)

# Model names and versions are one plain folder name (check_path_component); the prefix is
# free text, ":b", ":{", "}:v" and spaces included.
plain = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,8}", fullmatch=True)
prefixes = st.text(st.sampled_from("ab:{}v eb1 "), max_size=12)
entry_ids = st.from_regex(rb"[0-9]{1,13}-[0-9]{1,4}", fullmatch=True)


@given(
    prefixes,
    plain,
    plain,
    st.lists(st.integers(1, 4096), min_size=1, max_size=4),
    st.integers(0, 99),
    st.sampled_from(DEFAULT_LANES),
)
def test_a_work_stream_parses_back_into_its_labels(prefix, model, version, edges, bucket, lane):
    stream = work_stream(prefix, model, layout(version, edges), bucket, lane)
    assert stream_labels(stream) == (model, version, str(bucket), lane)


@given(
    st.lists(
        st.tuples(
            st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\n"), min_size=1),
            entry_ids,
        )
    )
)
def test_a_cancel_message_decodes_to_its_entries(entries) -> None:
    assert decode_cancel(encode_cancel(entries)) == set(entries)


positive = st.floats(min_value=1e-9, max_value=1e6, allow_nan=False, allow_infinity=False)


@given(positive, st.integers(1, 512), st.floats(0, 4e9, allow_nan=False))
def test_a_pace_reads_back_exactly(seq_s, threads, at) -> None:
    assert decode_pace(encode_pace(seq_s, threads, at)) == (seq_s, threads, at)


@given(st.binary(max_size=40) | st.text(max_size=40).map(str.encode))
def test_any_other_field_is_no_pace_or_a_usable_one(data) -> None:
    pace = decode_pace(data)
    if pace is not None:
        seq_s, threads, at = pace
        assert seq_s > 0 and math.isfinite(seq_s) and threads > 0 and math.isfinite(at)
