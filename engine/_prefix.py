"""Prefix values and strict parsing at the edge.

A :class:`Prefix` is an immutable (family, network address, length) triple with all arithmetic
on Python integers, so IPv6 needs no special casing: there are no 64-bit offsets anywhere
(DESIGN.md invariant 8). An address is a host prefix (/32 or /128).

Parsing is strict on purpose: a request that is ambiguous is refused with a message saying
what would be accepted, never silently "fixed". Text out is canonical: RFC 5952 for IPv6
(lower case, the longest run of zero fields compressed, never a single one), dotted quad for
IPv4.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Final, final

from engine.errors import InvalidPrefixError

__all__ = ["Prefix", "parse_address", "parse_prefix"]

_BITS: Final = {4: 32, 6: 128}
_LENGTH_RE: Final = re.compile(r"[0-9]{1,3}")
# ::ffff:0:0/96, RFC 4291 section 2.5.5.2: IPv4 addresses written as IPv6. A pool of them would
# alias IPv4 space, so both the prefix and any address inside it are refused.
_MAPPED: Final = 0xFFFF << 32
_MAPPED_MASK: Final = ((1 << 128) - 1) ^ ((1 << 32) - 1)


@final
class Prefix:
    """An IPv4 or IPv6 prefix: network address ``value`` (an int) and ``length`` bits.

    Prefixes are hashable and ordered by (version, address, length), so a sorted list of
    prefixes of one family is in address order with a containing prefix before its children.
    Build them with :func:`parse_prefix`, :func:`parse_address` or :meth:`Prefix.of`.
    """

    __slots__ = ("length", "value", "version")

    version: int
    value: int
    length: int

    def __init__(self, version: int, value: int, length: int) -> None:
        """Create a prefix without checks; use :meth:`of` for values that are not known good."""
        object.__setattr__(self, "version", version)
        object.__setattr__(self, "value", value)
        object.__setattr__(self, "length", length)

    @classmethod
    def of(cls, version: int, value: int, length: int) -> Prefix:
        """Build a prefix from integers, checking family, range and host bits.

        Raises:
            InvalidPrefixError: unknown version, length or value out of range, or host bits set.
        """
        bits = _BITS.get(version)
        if bits is None:
            raise InvalidPrefixError(f"IP version must be 4 or 6, not {version}.", text=version)
        if not 0 <= length <= bits:
            raise InvalidPrefixError(
                f"An IPv{version} prefix length must be between 0 and {bits}, not {length}.",
                text=length,
            )
        if not 0 <= value < (1 << bits):
            raise InvalidPrefixError(f"{value} is not an IPv{version} address.", text=value)
        host = (1 << (bits - length)) - 1
        if value & host:
            net = cls(version, value & ~host, length)
            raise InvalidPrefixError(
                f"{_format(version, value)}/{length} has host bits set; did you mean {net}?",
                text=value,
            )
        return cls(version, value, length)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("Prefix is immutable")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("Prefix is immutable")

    # -- derived values ---------------------------------------------------------------------

    @property
    def bits(self) -> int:
        """Address width of the family: 32 or 128."""
        return 32 if self.version == 4 else 128

    @property
    def size(self) -> int:
        """Number of addresses in the prefix (an exact integer, up to 2**128)."""
        return 1 << (self.bits - self.length)

    @property
    def last(self) -> int:
        """The highest address in the prefix, as an int."""
        return self.value + self.size - 1

    @property
    def is_host(self) -> bool:
        """Whether this is a single address (/32 or /128)."""
        return self.length == self.bits

    @property
    def address(self) -> str:
        """The network address alone, as canonical text."""
        return _format(self.version, self.value)

    def contains(self, other: Prefix) -> bool:
        """Whether ``other`` lies entirely inside this prefix (a prefix contains itself)."""
        return (
            other.version == self.version
            and other.length >= self.length
            and (other.value >> (self.bits - self.length))
            == (self.value >> (self.bits - self.length))
        )

    def overlaps(self, other: Prefix) -> bool:
        """Whether the two prefixes share at least one address (one then contains the other)."""
        return self.contains(other) or other.contains(self)

    def supernet(self, length: int) -> Prefix:
        """The prefix of ``length`` bits (at most this one's) that contains this one."""
        if not 0 <= length <= self.length:
            raise InvalidPrefixError(
                f"A supernet of {self} must be between /0 and /{self.length}, not /{length}.",
                text=length,
            )
        shift = self.bits - length
        return Prefix(self.version, (self.value >> shift) << shift, length)

    def to_network(self) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        """The same prefix as an :mod:`ipaddress` network."""
        if self.version == 4:
            return ipaddress.IPv4Network((self.value, self.length))
        return ipaddress.IPv6Network((self.value, self.length))

    # -- protocol -------------------------------------------------------------------------------

    def _key(self) -> tuple[int, int, int]:
        return (self.version, self.value, self.length)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Prefix):
            return NotImplemented
        return (
            self.value == other.value
            and self.length == other.length
            and self.version == other.version
        )

    def __hash__(self) -> int:
        return hash((self.version, self.value, self.length))

    def __lt__(self, other: Prefix) -> bool:
        return self._key() < other._key()

    def __le__(self, other: Prefix) -> bool:
        return self._key() <= other._key()

    def __gt__(self, other: Prefix) -> bool:
        return self._key() > other._key()

    def __ge__(self, other: Prefix) -> bool:
        return self._key() >= other._key()

    def __str__(self) -> str:
        return f"{_format(self.version, self.value)}/{self.length}"

    def __repr__(self) -> str:
        return f"Prefix('{self}')"

    def __reduce__(self) -> tuple[type[Prefix], tuple[int, int, int]]:
        return (Prefix, (self.version, self.value, self.length))


def _format(version: int, value: int) -> str:
    """An address as canonical text: dotted quad, or RFC 5952 section 4 for IPv6.

    Done with integer operations: ``str(ipaddress.IPv6Address(v))`` gives the same text (a
    property test says so) at several times the cost, and every prefix in every answer is
    formatted.
    """
    if version == 4:
        return f"{value >> 24}.{(value >> 16) & 255}.{(value >> 8) & 255}.{value & 255}"
    hextets = [(value >> shift) & 0xFFFF for shift in range(112, -16, -16)]
    # The longest run of two or more zero hextets becomes "::" (the first of equal runs).
    best_start, best_len, start = 0, 0, -1
    for i, hextet in enumerate((*hextets, 1)):  # the 1 ends a run that reaches the end
        if hextet == 0:
            if start < 0:
                start = i
        elif start >= 0:
            if i - start > best_len:
                best_start, best_len = start, i - start
            start = -1
    parts = [f"{h:x}" for h in hextets]
    if best_len < 2:
        return ":".join(parts)
    return ":".join(parts[:best_start]) + "::" + ":".join(parts[best_start + best_len :])


def _parse_ip(text: str, what: str) -> tuple[int, int]:
    """Parse an address (no length) into (version, int), refusing what is ambiguous."""
    if "%" in text:
        raise InvalidPrefixError(
            f"{what} {text!r} has a zone id ('%...'); zone ids name a link on one host and "
            "have no meaning in an address plan. Remove it.",
            text=text,
        )
    if not text or text != text.strip() or any(c.isspace() for c in text):
        raise InvalidPrefixError(f"{what} {text!r} is empty or contains whitespace.", text=text)
    if ":" in text:
        try:
            value = int(ipaddress.IPv6Address(text))
        except ValueError as exc:
            raise InvalidPrefixError(
                f"{what} {text!r} is not an IPv6 address: {exc}.", text=text
            ) from exc
        if value & _MAPPED_MASK == _MAPPED:
            raise InvalidPrefixError(
                f"{what} {text!r} is an IPv4-mapped IPv6 address (::ffff:0:0/96, RFC 4291 "
                "section 2.5.5.2); write the IPv4 address itself.",
                text=text,
            )
        return 6, value
    try:
        return 4, int(ipaddress.IPv4Address(text))
    except ValueError as exc:
        raise InvalidPrefixError(
            f"{what} {text!r} is not an IP address: {exc}.", text=text
        ) from exc


def _check_version(result: Prefix, version: int | None, text: str) -> Prefix:
    if version is not None and result.version != version:
        raise InvalidPrefixError(
            f"Expected an IPv{version} value, got the IPv{result.version} {text!r}.",
            text=text,
        )
    return result


def parse_prefix(text: object, *, version: int | None = None) -> Prefix:
    """Parse CIDR text such as ``2001:db8:4::/48`` strictly.

    Args:
        text: The prefix as text. Anything that is not a ``str`` is refused.
        version: If given (4 or 6), a prefix of the other family is refused.

    Returns:
        The prefix; ``str()`` of it is the canonical text.

    Raises:
        InvalidPrefixError: for garbage, a missing or out-of-range length, host bits set
            (the message names the network meant), a zone id, an IPv4-mapped IPv6 prefix,
            or the wrong family.
    """
    if not isinstance(text, str):
        raise InvalidPrefixError(f"A prefix must be text, not {type(text).__name__}.", text=text)
    address, slash, length_text = text.partition("/")
    if not slash:
        raise InvalidPrefixError(
            f"{text!r} has no prefix length; write it as address/length, e.g. 2001:db8::/48.",
            text=text,
        )
    ip_version, value = _parse_ip(address, "Prefix")
    if not _LENGTH_RE.fullmatch(length_text):
        raise InvalidPrefixError(
            f"{text!r} has a prefix length that is not a number from 0 to {_BITS[ip_version]}.",
            text=text,
        )
    length = int(length_text)
    return _check_version(Prefix.of(ip_version, value, length), version, text)


def parse_address(text: object, *, version: int | None = None) -> Prefix:
    """Parse one address (no length) strictly, returning it as a host prefix (/32 or /128).

    Raises:
        InvalidPrefixError: for garbage, a length given, a zone id, an IPv4-mapped IPv6
            address, or the wrong family.
    """
    if not isinstance(text, str):
        raise InvalidPrefixError(f"An address must be text, not {type(text).__name__}.", text=text)
    if "/" in text:
        raise InvalidPrefixError(
            f"{text!r} is a prefix; an address is written without a length.", text=text
        )
    ip_version, value = _parse_ip(text, "Address")
    return _check_version(Prefix(ip_version, value, _BITS[ip_version]), version, text)
