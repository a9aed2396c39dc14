"""One way to damage an encoded record or message, for the fuzz properties.

The parsers of peers' messages (CBOR, ``tests/unit/test_fuzz_messages.py``) and of
durable records (JSON, ``tests/unit/test_fuzz_records.py``) meet the same faults: a
truncated or bit-flipped encoding, a field of the wrong type, a field missing or one
too many, another value altogether, random bytes.  Each caller names its encoding,
the values its format can hold and any damage of its own format (JSON's nesting
without end, say).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from hypothesis import strategies as st

#: The damage every encoding meets, in the order a property draws them.
COMMON_WAYS = ("truncate", "flip", "field", "drop", "extra", "value", "bytes")

#: A damage of one format only: it gets the draw and the valid encoding.
Way = Callable[[st.DrawFn, bytes], bytes]


def nested(scalars: st.SearchStrategy[Any], keys: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """The values of a format: ``scalars``, and lists and maps (keyed by ``keys``) of
    them a few levels deep."""

    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
        max_leaves=12,
    )


@st.composite
def damaged_encoding(
    draw: st.DrawFn,
    valid: Mapping[Any, Any],
    encode: Callable[[Any], bytes],
    values: st.SearchStrategy[Any],
    *,
    extra_keys: st.SearchStrategy[Any],
    max_bytes: int,
    more: Mapping[str, Way] | None = None,
) -> bytes:
    """``valid`` encoded by ``encode``, then damaged one way (its name drawn first)."""

    raw = encode(valid)
    ways = more or {}
    how = draw(st.sampled_from([*COMMON_WAYS, *ways]))
    if how == "truncate":
        return raw[: draw(st.integers(0, len(raw) - 1))]
    if how == "flip":
        data = bytearray(raw)
        for _ in range(draw(st.integers(1, 3))):
            bit = draw(st.integers(0, len(data) * 8 - 1))
            data[bit // 8] ^= 1 << (bit % 8)
        return bytes(data)
    if how == "field":  # one field of the wrong type or value
        return encode({**valid, draw(st.sampled_from(sorted(valid))): draw(values)})
    if how == "drop":
        key = draw(st.sampled_from(sorted(valid)))
        return encode({k: v for k, v in valid.items() if k != key})
    if how == "extra":
        return encode({**valid, draw(extra_keys): draw(values)})
    if how == "value":  # any value of the format at all
        return encode(draw(values))
    if how == "bytes":
        return draw(st.binary(max_size=max_bytes))
    return ways[how](draw, raw)
