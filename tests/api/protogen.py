"""Hypothesis strategies for arbitrary protobuf messages, built from a message's descriptor.

:func:`messages` draws any message of a type, field by field from its descriptor: every
scalar type at its extremes (int64 and uint64 bounds, NaN and infinities), unknown enum
values, text of any Unicode (no surrogates: protobuf strings are UTF-8), NUL, very long
strings, bytes, nested messages, maps, repeated fields, at most one member of each oneof
(proto3 ``optional`` fields are one-member oneofs: set or not), and Timestamps with extreme
and invalid seconds and nanos. Strings are often drawn from :data:`SAMPLES`, text a kipam
server means something by (pool names, prefixes, owners) or hostile text (SQL-shaped,
format strings), so fuzzed requests reach past the first check.

What the strategies cannot draw are bytes that are not a message at all, or a string field
that is not UTF-8: the Python runtime refuses to serialize those. :func:`raw_field` writes
such a field by hand.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message_factory import GetMessageClass
from hypothesis import strategies as st

if TYPE_CHECKING:
    from google.protobuf.descriptor import Descriptor
    from google.protobuf.message import Message

__all__ = ["SAMPLES", "messages", "raw_field", "varint"]

INT32: Final = (-(2**31), 2**31 - 1)
INT64: Final = (-(2**63), 2**63 - 1)
# Text a kipam server gives meaning to, and text that is hostile anywhere.
SAMPLES: Final = (
    "",
    "base",
    "site",
    "c1",
    "small",
    "default",
    "eu1-prod/pod",
    "node/a",
    "node/worker-1",
    "ns",
    "web",
    "fd00:1::/48",
    "fd00:1::/64",
    "fd00:1:0:7::/64",
    "fd00:1::1",
    "fd3c:9e12::/32",
    "fd3c:9e12::/48",
    "fd3c:9e12::1",
    "FD00:1::/64",
    "fd00:0001::/64",
    "fd00:00001::/64",
    "fd00:1::1/64",
    "2001:db8::/32",
    "2001:db8::/129",
    "::/0",
    "::",
    "0.0.0.0/0",
    "10.0.0.0/8",
    "192.0.2.1",
    "fe80::1%eth0",
    "fe80::%1/64",
    "::ffff:192.0.2.1",
    "::ffff:10.0.0.0/120",
    "64:ff9b::192.0.2.1",
    "64:ff9b::/96",
    "app=web",
    "app in (a,b),!x",
    "!!",
    "node_prefix_length",
    "64",
    "-1",
    "1e309",
    "NaN",
    "cilium-values",
    "helm",
    "ipv6",
    "dual-stack",
    "'; DROP TABLE pools; --",
    '" OR 1=1 --',
    "node/';DROP-TABLE-allocations;--",
    "$1",
    "%s%s%n",
    "{0}{name}",
    "\\x00",
    "\x00",
    "a\x00b",
    "\u2019 OR \u20181\u2019=\u20181",  # unicode quotes
    "\u202eevil",
    "\U0001f600",
    "x" * 254,
    "a" * 64,
    "k" * 257,
)


def _texts() -> st.SearchStrategy[str]:
    """Any text, often one of :data:`SAMPLES`, now and then very long."""
    return st.one_of(
        st.sampled_from(SAMPLES),
        st.text(max_size=40),
        st.text(alphabet=st.characters(codec="ascii"), max_size=40),
        st.builds(lambda c, n: c * n, st.characters(codec="utf-8"), st.integers(300, 70_000)),
    )


def _integers(low: int, high: int) -> st.SearchStrategy[int]:
    useful = [v for v in (0, 1, -1, 32, 48, 64, 128, 129, 1000, low, high) if low <= v <= high]
    return st.one_of(st.sampled_from(useful), st.integers(low, high))


def _timestamps() -> st.SearchStrategy[dict[str, int]]:
    """Seconds and nanos of a Timestamp: valid, at the edges of its range, or beyond."""
    edges = (-62_135_596_800, -62_135_596_801, 253_402_300_799, 253_402_300_800, 0, 1_700_000_000)
    return st.fixed_dictionaries(
        {
            "seconds": st.one_of(st.sampled_from(edges), st.integers(*INT64)),
            "nanos": st.one_of(st.sampled_from((0, -1, 999_999_999, 10**9)), st.integers(*INT32)),
        }
    )


_SCALARS: Final[dict[int, st.SearchStrategy[Any]]] = {
    FieldDescriptor.TYPE_DOUBLE: st.floats(),
    FieldDescriptor.TYPE_FLOAT: st.floats(width=32),
    FieldDescriptor.TYPE_INT64: _integers(*INT64),
    FieldDescriptor.TYPE_SINT64: _integers(*INT64),
    FieldDescriptor.TYPE_SFIXED64: _integers(*INT64),
    FieldDescriptor.TYPE_UINT64: _integers(0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: _integers(0, 2**64 - 1),
    FieldDescriptor.TYPE_INT32: _integers(*INT32),
    FieldDescriptor.TYPE_SINT32: _integers(*INT32),
    FieldDescriptor.TYPE_SFIXED32: _integers(*INT32),
    FieldDescriptor.TYPE_UINT32: _integers(0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: _integers(0, 2**32 - 1),
    FieldDescriptor.TYPE_BOOL: st.booleans(),
    FieldDescriptor.TYPE_STRING: _texts(),
    FieldDescriptor.TYPE_BYTES: st.binary(max_size=64),
}


def _enum(field: FieldDescriptor) -> st.SearchStrategy[int]:
    """A known value of the field's enum, or any int32 (proto3 enums are open)."""
    assert field.enum_type is not None
    known = [v.number for v in field.enum_type.values]
    return st.one_of(st.sampled_from(known), _integers(*INT32))


def _single(field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    """One value of a field (an element, for a repeated one)."""
    if field.message_type is not None:
        return messages(field.message_type, depth + 1)
    if field.type == FieldDescriptor.TYPE_ENUM:
        return _enum(field)
    return _SCALARS[field.type]


def _value(field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    """A value for a field as the message's constructor takes it."""
    entry = field.message_type
    if entry is not None and entry.GetOptions().map_entry:
        return st.dictionaries(
            _single(entry.fields_by_name["key"], depth),
            _single(entry.fields_by_name["value"], depth),
            max_size=4,
        )
    if field.is_repeated:
        return st.lists(_single(field, depth), max_size=4)
    return _single(field, depth)


def messages(descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
    """Any message of the type ``descriptor`` describes (nested messages to a small depth).

    Each field is set or left unset; of each oneof at most one member is set.
    """
    cls = GetMessageClass(descriptor)
    if descriptor.full_name == "google.protobuf.Timestamp":
        return st.builds(lambda v: cls(**v), _timestamps())
    if depth > 3:
        return st.just(cls())
    in_oneof = {f.name for o in descriptor.oneofs for f in o.fields}
    plain = {f.name: _value(f, depth) for f in descriptor.fields if f.name not in in_oneof}
    choices = [
        st.one_of(st.none(), st.sampled_from([f.name for f in o.fields])) for o in descriptor.oneofs
    ]
    by_name = descriptor.fields_by_name

    @st.composite
    def draw(draw_: st.DrawFn) -> Message:
        values: dict[str, Any] = {}
        for name, strategy in plain.items():
            if draw_(st.booleans()):
                values[name] = draw_(strategy)
        for choice in choices:
            chosen = draw_(choice)
            if chosen is not None:
                values[chosen] = draw_(_value(by_name[chosen], depth))
        return cls(**values)

    return draw()


def varint(value: int) -> bytes:
    """``value`` as a protobuf varint (negative numbers as their 64-bit two's complement)."""
    value &= 2**64 - 1
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def raw_field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2) holding ``payload`` as it is, UTF-8 or not."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload
