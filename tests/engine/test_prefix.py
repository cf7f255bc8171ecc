from __future__ import annotations

import ipaddress
import pickle

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine import ErrorKind, InvalidPrefixError, Prefix, parse_address, parse_prefix

CANONICAL = [
    # (text in, canonical text out)
    ("2001:db8::/32", "2001:db8::/32"),
    ("10.0.0.0/8", "10.0.0.0/8"),
    ("2001:DB8:0:0:0:0:0:0/48", "2001:db8::/48"),
    ("2001:0db8:0000:0001:0000:0000:0000:0000/64", "2001:db8:0:1::/64"),
    # RFC 5952 section 4.2.2: a single zero field is not compressed
    ("2001:db8:0:1:1:1:1:0/127", "2001:db8:0:1:1:1:1:0/127"),
    # RFC 5952 section 4.2.3: the longest run is compressed, the first one on a tie
    ("2001:0:0:1:0:0:0:0/64", "2001:0:0:1::/64"),
    ("2001:db8:0:0:1:0:0:0/80", "2001:db8:0:0:1::/80"),
    ("2001:db8:0:0:1:0:0:1/128", "2001:db8::1:0:0:1/128"),
    ("::/0", "::/0"),
    ("0.0.0.0/0", "0.0.0.0/0"),
    ("2001:db8::1/128", "2001:db8::1/128"),
    ("192.0.2.1/32", "192.0.2.1/32"),
    ("64:ff9b::192.0.2.0/120", "64:ff9b::c000:200/120"),
]


@pytest.mark.parametrize(("text", "canonical"), CANONICAL, ids=[c[0] for c in CANONICAL])
def test_parse_prefix_gives_canonical_text(text: str, canonical: str) -> None:
    """Valid prefixes parse and print as RFC 5952 (IPv6) or dotted-quad (IPv4) text."""
    prefix = parse_prefix(text)
    assert str(prefix) == canonical
    assert str(prefix.to_network()) == canonical
    assert parse_prefix(str(prefix)) == prefix


INVALID = [
    # (text, words the message must contain)
    ("2001:db8::1/64", "did you mean 2001:db8::/64"),
    ("10.0.0.1/8", "did you mean 10.0.0.0/8"),
    ("fe80::1%eth0/64", "zone id"),
    ("fe80::%1/64", "zone id"),
    ("::ffff:10.0.0.0/104", "IPv4-mapped"),
    ("::ffff:0:0/96", "IPv4-mapped"),
    ("2001:db8::/129", "between 0 and 128"),
    ("10.0.0.0/33", "between 0 and 32"),
    ("2001:db8::/-1", "not a number"),
    ("2001:db8::/+8", "not a number"),
    ("2001:db8::/ 8", "not a number"),
    ("2001:db8::/1234", "not a number"),
    ("2001:db8::", "no prefix length"),
    ("10.0.0.0", "no prefix length"),
    ("", "no prefix length"),
    ("/48", "empty"),
    ("hello/8", "not an IP address"),
    ("2001:db8:::/48", "not an IPv6 address"),
    ("2001:db8::g/48", "not an IPv6 address"),
    ("10.0.0/8", "not an IP address"),
    ("010.0.0.0/8", "not an IP address"),
    ("10.0.0.256/32", "not an IP address"),
    (" 10.0.0.0/8", "whitespace"),
    ("2001:db8::/48\n", "not a number"),
    ("2001:db8::\x00/48", "not an IPv6 address"),
]


@pytest.mark.parametrize(("text", "words"), INVALID, ids=[repr(c[0]) for c in INVALID])
def test_parse_prefix_refuses_with_a_specific_message(text: str, words: str) -> None:
    """Malformed or ambiguous prefixes are refused with a message saying what is wrong."""
    with pytest.raises(InvalidPrefixError) as info:
        parse_prefix(text)
    assert words in str(info.value)
    assert info.value.kind is ErrorKind.INVALID


@pytest.mark.parametrize("value", [None, 42, b"10.0.0.0/8", ["10.0.0.0/8"]])
def test_parse_refuses_non_text(value: object) -> None:
    """Only str is parsed; bytes, numbers and None are refused, not coerced."""
    with pytest.raises(InvalidPrefixError, match="must be text"):
        parse_prefix(value)
    with pytest.raises(InvalidPrefixError, match="must be text"):
        parse_address(value)


@pytest.mark.parametrize(
    ("text", "version", "ok"),
    [
        ("2001:db8::/32", 6, True),
        ("2001:db8::/32", 4, False),
        ("10.0.0.0/8", 4, True),
        ("10.0.0.0/8", 6, False),
    ],
    ids=["v6-as-v6", "v6-as-v4", "v4-as-v4", "v4-as-v6"],
)
def test_parse_prefix_checks_family(text: str, version: int, ok: bool) -> None:
    """A family asked for is enforced, with the other family named in the error."""
    if ok:
        assert parse_prefix(text, version=version).version == version
    else:
        with pytest.raises(InvalidPrefixError, match="Expected an IPv"):
            parse_prefix(text, version=version)


@pytest.mark.parametrize(
    ("text", "canonical", "length"),
    [("2001:DB8::0001", "2001:db8::1/128", 128), ("192.0.2.7", "192.0.2.7/32", 32)],
    ids=["v6", "v4"],
)
def test_parse_address_gives_host_prefix(text: str, canonical: str, length: int) -> None:
    """An address parses to a host prefix in canonical text."""
    address = parse_address(text)
    assert str(address) == canonical
    assert address.length == length
    assert address.is_host


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("2001:db8::1/128", "is a prefix"),
        ("fe80::1%eth0", "zone id"),
        ("::ffff:192.0.2.1", "IPv4-mapped"),
        ("2001:db8::1 ", "whitespace"),
        ("1.2.3", "not an IP address"),
        ("", "empty"),
    ],
)
def test_parse_address_refuses(text: str, words: str) -> None:
    """Addresses with a length, zone id, mapped form or garbage are refused."""
    with pytest.raises(InvalidPrefixError, match=words):
        parse_address(text)


def test_parse_address_checks_family() -> None:
    """An address of the wrong family is refused when a family is asked for."""
    with pytest.raises(InvalidPrefixError, match="Expected an IPv4"):
        parse_address("2001:db8::1", version=4)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        ((5, 0, 0), "version must be 4 or 6"),
        ((6, 0, 129), "between 0 and 128"),
        ((4, 0, -1), "between 0 and 32"),
        ((4, 1 << 32, 32), "is not an IPv4 address"),
        ((6, -1, 128), "is not an IPv6 address"),
        ((6, 1, 64), "did you mean ::/64"),
    ],
)
def test_prefix_of_validates(args: tuple[int, int, int], words: str) -> None:
    """Prefix.of refuses bad versions, lengths, values and host bits."""
    with pytest.raises(InvalidPrefixError, match=words):
        Prefix.of(*args)


@pytest.mark.parametrize(
    ("outer", "inner", "contains"),
    [
        ("2001:db8::/32", "2001:db8:1::/48", True),
        ("2001:db8::/32", "2001:db8::/32", True),
        ("2001:db8:1::/48", "2001:db8::/32", False),
        ("2001:db8::/32", "2001:db9::/48", False),
        ("10.0.0.0/8", "10.1.0.0/16", True),
        ("10.0.0.0/8", "11.0.0.0/16", False),
        ("10.0.0.0/8", "::/0", False),
        ("::/0", "0.0.0.0/0", False),
    ],
)
def test_contains_and_overlaps(outer: str, inner: str, contains: bool) -> None:
    """Containment is by address and length within one family; overlap is symmetric."""
    a, b = parse_prefix(outer), parse_prefix(inner)
    assert a.contains(b) is contains
    assert a.overlaps(b) is (contains or b.contains(a))
    assert a.overlaps(b) is b.overlaps(a)


def test_derived_values_are_exact_integers() -> None:
    """Sizes and last addresses are exact for the whole IPv6 space."""
    everything = parse_prefix("::/0")
    assert everything.size == 2**128
    assert everything.last == 2**128 - 1
    assert parse_prefix("10.0.0.0/8").size == 2**24
    assert parse_prefix("10.0.0.0/8").bits == 32
    assert parse_prefix("2001:db8::/32").address == "2001:db8::"


@pytest.mark.parametrize(
    ("text", "length", "expected"),
    [("2001:db8:1:2::/64", 48, "2001:db8:1::/48"), ("10.1.2.0/24", 8, "10.0.0.0/8")],
)
def test_supernet(text: str, length: int, expected: str) -> None:
    """supernet() returns the containing prefix of a shorter length."""
    assert str(parse_prefix(text).supernet(length)) == expected


def test_supernet_refuses_longer_length() -> None:
    """A supernet cannot be longer than the prefix itself."""
    with pytest.raises(InvalidPrefixError, match="supernet"):
        parse_prefix("2001:db8::/32").supernet(48)


def test_prefixes_order_hash_and_compare() -> None:
    """Prefixes sort by family, address and length, and hash and compare by value."""
    texts = ["2001:db8:1::/48", "10.0.0.0/8", "2001:db8::/32", "2001:db8::/48", "9.0.0.0/8"]
    ordered = sorted(parse_prefix(t) for t in texts)
    assert [str(p) for p in ordered] == [
        "9.0.0.0/8",
        "10.0.0.0/8",
        "2001:db8::/32",
        "2001:db8::/48",
        "2001:db8:1::/48",
    ]
    a, b = parse_prefix("2001:db8::/32"), parse_prefix("2001:db8::/32")
    assert a == b
    assert hash(a) == hash(b)
    assert a <= b
    assert a >= b
    assert not a < b
    assert not a > b
    assert len({a, b}) == 1
    assert a != "2001:db8::/32"
    assert repr(a) == "Prefix('2001:db8::/32')"


def test_prefix_is_immutable_and_picklable() -> None:
    """A prefix cannot be changed after creation and survives pickling."""
    prefix = parse_prefix("2001:db8::/32")
    with pytest.raises(AttributeError):
        prefix.length = 48  # type: ignore[misc]
    with pytest.raises(AttributeError):
        del prefix.value
    assert pickle.loads(pickle.dumps(prefix)) == prefix  # noqa: S301 - our own bytes


def test_to_network_matches_ipaddress() -> None:
    """to_network() gives the equal ipaddress object for both families."""
    assert parse_prefix("10.0.0.0/8").to_network() == ipaddress.IPv4Network("10.0.0.0/8")
    assert parse_prefix("2001:db8::/32").to_network() == ipaddress.IPv6Network("2001:db8::/32")


# Addresses with zero runs of every length and place, which is where formatting can go wrong.
_HEXTETS = st.lists(st.sampled_from([0, 0, 0, 1, 0xABC, 0xFFFF]), min_size=8, max_size=8)


@given(
    st.one_of(
        st.integers(min_value=0, max_value=2**128 - 1),
        _HEXTETS.map(lambda hs: sum(h << (16 * (7 - i)) for i, h in enumerate(hs))),
    )
)
def test_ipv6_text_is_what_ipaddress_writes(value: int) -> None:
    """The integer formatter writes RFC 5952 text exactly as the standard library does."""
    assert str(Prefix(6, value, 128)) == f"{ipaddress.IPv6Address(value)}/128"


@given(st.integers(min_value=0, max_value=2**32 - 1))
def test_ipv4_text_is_what_ipaddress_writes(value: int) -> None:
    """The integer formatter writes dotted quads exactly as the standard library does."""
    assert str(Prefix(4, value, 32)) == f"{ipaddress.IPv4Address(value)}/32"
