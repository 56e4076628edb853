"""Key masks: the module's matcher, compiled once to a Python ``re`` pattern.

The module filters keys with Rob Pike's "beautiful code" mini-regex. Its grammar, exactly:

- ``c`` matches the byte ``c``; ``.`` matches any one byte (``\\n`` and NUL included);
- ``^`` anchors at the start only as the first byte of the mask; anywhere else it is literal;
- ``$`` anchors at the end only as the last byte of the mask; anywhere else it is literal;
- ``x*`` is zero or more of the byte before it. The mask is read one atom at a time, so a leading
  ``*``, or a ``*`` right after ``x*``, is an atom itself: a literal ``*`` (``**`` is "zero or more
  stars");
- there is no escaping (``\\`` is literal) and, unless ``^`` is used, the match is a substring
  match.

Unlike the module, keys are not cut at their first NUL byte. Every mask is translated to an
equivalent bytes pattern (``re.DOTALL``, ``\\A``/``\\Z`` anchors) so matching a key costs one
C-level ``search``; ``tests/unit/test_keymask.py`` checks the translation against a literal port
of Pike's code.

The mask ``ALL`` (exact, case-sensitive) is not a pattern: anywhere in a list it means every key.
An empty list means no key at all.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = [
    "ALL",
    "KeyFilter",
    "add_masks",
    "compile_mask",
    "matches_everything",
    "normalize_masks",
    "translate",
]

#: The keyword mask that selects every key.
ALL = b"ALL"

_STAR = ord("*")
_DOT = ord(".")
_DOLLAR = ord("$")


def _atoms(mask: bytes) -> tuple[bool, list[tuple[int, bool]], bool]:
    """Split a mask as Pike's matcher reads it: (anchored, [(byte, starred), ...], end_anchored)."""
    anchored = mask[:1] == b"^"
    atoms: list[tuple[int, bool]] = []
    end_anchored = False
    i = 1 if anchored else 0
    n = len(mask)
    while i < n:
        c = mask[i]
        if i + 1 < n and mask[i + 1] == _STAR:
            atoms.append((c, True))
            i += 2
        elif c == _DOLLAR and i == n - 1:
            end_anchored = True
            i += 1
        else:
            atoms.append((c, False))
            i += 1
    return anchored, atoms, end_anchored


def translate(mask: bytes) -> bytes:
    """Return the ``re`` source (bytes, to compile with ``re.DOTALL``) equivalent to ``mask``."""
    anchored, atoms, end_anchored = _atoms(mask)
    parts = [rb"\A"] if anchored else []
    previous = None
    for c, starred in atoms:
        if starred and previous == (c, True):
            continue  # a*a* is a*: saves the backtracking a hostile mask would cost per key
        previous = (c, starred)
        atom = b"." if c == _DOT else re.escape(bytes((c,)))
        parts.append(atom + b"*" if starred else atom)
    if end_anchored:
        # \Z, not $: Python's $ also matches just before a trailing newline.
        parts.append(rb"\Z")
    return b"".join(parts)


def compile_mask(mask: bytes) -> re.Pattern[bytes]:
    """Compile one mask; test keys with ``.search(key)`` (never ``.match``)."""
    return re.compile(translate(mask), re.DOTALL)


def matches_everything(mask: bytes) -> bool:
    """True for masks such as ``''``, ``^``, ``$``, ``x*``, ``^.*$``: every key, the empty one too.

    A mask made only of starred atoms matches the empty string at offset 0, or at the end of the
    key when it ends with ``$``; anchored at both ends, it needs a ``.*`` to swallow any key.
    """
    anchored, atoms, end_anchored = _atoms(mask)
    if not all(starred for _, starred in atoms):
        return False
    if anchored and end_anchored:
        return (_DOT, True) in atoms
    return True


class KeyFilter:
    """A compiled list of masks; ``matches(key)`` is the hot-path test.

    Build a new filter whenever the mask list changes (it is immutable). ``match_all`` tells the
    caller that every key passes; an empty ``masks`` that none does.
    """

    __slots__ = ("masks", "match_all", "_search")

    def __init__(self, masks: Iterable[bytes] = ()) -> None:
        self.masks: tuple[bytes, ...] = normalize_masks(masks)
        self.match_all = self.masks == (ALL,) or any(matches_everything(m) for m in self.masks)
        self._search = None
        if self.masks and not self.match_all:
            # One alternation: one C-level scan per key whatever the number of masks.
            source = b"|".join(b"(?:" + translate(m) + b")" for m in self.masks)
            self._search = re.compile(source, re.DOTALL).search

    def matches(self, key: bytes) -> bool:
        """Whether an event on ``key`` passes the filter."""
        if self.match_all:
            return True
        search = self._search
        return search is not None and search(key) is not None

    def __repr__(self) -> str:
        return f"KeyFilter({self.masks!r})"


def normalize_masks(masks: Iterable[bytes]) -> tuple[bytes, ...]:
    """The list a command or setting stores: ``(b"ALL",)`` if ``ALL`` is given, else each mask once.

    Like the module, ``ALL`` discards every other mask, before or after it.
    """
    result: dict[bytes, None] = {}
    for mask in masks:
        mask = bytes(mask)
        if mask == ALL:
            return (ALL,)
        result[mask] = None
    return tuple(result)


def add_masks(current: Iterable[bytes], new: Iterable[bytes]) -> tuple[bytes, ...]:
    """``keymask_add``: ``current`` followed by the ``new`` masks not already there.

    ``ALL`` in ``new`` (or already in ``current``) gives ``(b"ALL",)``: adding to "every key"
    changes nothing, so the list stays minimal.
    """
    return normalize_masks((*current, *new))
