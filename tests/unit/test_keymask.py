"""Key masks: the module's measured table, and the compiled matcher against Pike's own algorithm."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.keymask import (
    ALL,
    KeyFilter,
    add_masks,
    compile_mask,
    matches_everything,
    normalize_masks,
    translate,
)

# -- the oracle: Rob Pike's matcher, line for line, on (bytes, index) instead of C strings ---------
# The only change: the end of the text is its length, not a NUL byte (keys may contain NUL).


def pike_match(regexp: bytes, text: bytes) -> bool:
    if regexp[:1] == b"^":
        return _matchhere(regexp, 1, text, 0)
    t = 0
    while True:  # do { ... } while (*text++ != '\0'): every offset, the end included
        if _matchhere(regexp, 0, text, t):
            return True
        if t == len(text):
            return False
        t += 1


def _matchhere(regexp: bytes, r: int, text: bytes, t: int) -> bool:
    if r == len(regexp):
        return True
    if r + 1 < len(regexp) and regexp[r + 1] == ord("*"):
        return _matchstar(regexp[r], regexp, r + 2, text, t)
    if regexp[r] == ord("$") and r + 1 == len(regexp):
        return t == len(text)
    if t < len(text) and (regexp[r] == ord(".") or regexp[r] == text[t]):
        return _matchhere(regexp, r + 1, text, t + 1)
    return False


def _matchstar(c: int, regexp: bytes, r: int, text: bytes, t: int) -> bool:
    while True:  # do { ... } while (*text != '\0' && (*text++ == c || c == '.'))
        if _matchhere(regexp, r, text, t):
            return True
        if not (t < len(text) and (text[t] == c or c == ord("."))):
            return False
        t += 1


# -- module-behaviour.md section 4: 18 keys against 21 masks, each loaded alone --------------------

KEYS = (
    b"foo", b"xfoo", b"foox", b"fo", b"f", b"fooo", b"b", b"ab", b"aab", b"",
    b"x*", b"a$b", b"f\no", b"all", b"ALL", b"*foo", b"a.b", b"\\x",
)  # fmt: skip

TABLE = [
    (b"^foo", {b"foo", b"foox", b"fooo"}),
    (b"foo$", {b"foo", b"xfoo", b"*foo"}),
    (b"^foo$", {b"foo"}),
    (b"f.o", {b"foo", b"xfoo", b"foox", b"fooo", b"f\no", b"*foo"}),
    (b"fo*", {b"foo", b"xfoo", b"foox", b"fo", b"f", b"fooo", b"f\no", b"*foo"}),
    (b"^a*b$", {b"b", b"ab", b"aab"}),
    (b"", set(KEYS)),
    (b"^", set(KEYS)),
    (b"$", set(KEYS)),
    (b"^.*$", set(KEYS)),
    (b"x*", set(KEYS)),
    (b"ALL", set(KEYS)),
    (b".", set(KEYS) - {b""}),
    (b"*", {b"x*", b"*foo"}),
    (b"*foo", {b"*foo"}),
    (b"a$b", {b"a$b"}),
    (b"all", {b"all"}),
    (b"^f*$", {b"f", b""}),
    (b"fo**", set()),
    (b"^$", {b""}),
    (b"\\.", {b"\\x"}),
]


def test_table_has_every_row_and_key() -> None:
    assert len(KEYS) == 18 and len(set(KEYS)) == 18
    assert len(TABLE) == 21


@pytest.mark.parametrize(("mask", "expected"), TABLE, ids=[repr(m) for m, _ in TABLE])
def test_module_table(mask: bytes, expected: set[bytes]) -> None:
    key_filter = KeyFilter((mask,))
    assert {k for k in KEYS if key_filter.matches(k)} == expected


@pytest.mark.parametrize(("mask", "expected"), TABLE, ids=[repr(m) for m, _ in TABLE])
def test_oracle_agrees_with_the_table(mask: bytes, expected: set[bytes]) -> None:
    if mask == ALL:  # a keyword, not a pattern
        return
    assert {k for k in KEYS if pike_match(mask, k)} == expected


# -- binary safety: what the module got wrong ----------------------------------------------------


def test_nul_does_not_truncate_the_key() -> None:
    assert KeyFilter((b"tail$",)).matches(b"nul\x00tail")
    assert not KeyFilter((b"^nul$",)).matches(b"nul\x00tail")
    assert KeyFilter((b"l.t",)).matches(b"nul\x00tail")


def test_dot_matches_newline_and_dollar_is_the_real_end() -> None:
    assert KeyFilter((b"^a.b$",)).matches(b"a\nb")
    # Python's own $ would accept a trailing newline; the mask must not.
    assert not KeyFilter((b"^ab$",)).matches(b"ab\n")
    assert not compile_mask(b"ab$").search(b"ab\n")


def test_regex_metacharacters_are_literal() -> None:
    for mask in (b"a+b", b"(x)", b"[ab]", b"a|b", b"a?", b"{1}", b"\\d"):
        assert KeyFilter((mask,)).matches(b"-" + mask + b"-")
    assert not KeyFilter((b"a+b",)).matches(b"aab")
    assert not KeyFilter((b"\\d",)).matches(b"7")


def test_translation_examples() -> None:
    assert translate(b"^foo.*$") == rb"\Afoo.*\Z"
    assert translate(b"*x**") == rb"\*x*\*"
    assert translate(b"**a") == rb"\**a"
    assert translate(b"a$b^") == rb"a\$b\^"
    assert translate(b"^*") == rb"\A\*"
    assert translate(b"a*a*a*b") == rb"a*b"


def test_high_bytes_pass_through() -> None:
    assert KeyFilter((b"\xff\xfe",)).matches(b"a\xff\xfeb")
    assert KeyFilter(("^ключ".encode(),)).matches("ключ:1".encode())


# -- filters of several masks, ALL, nothing ------------------------------------------------------


def test_no_masks_match_nothing() -> None:
    key_filter = KeyFilter(())
    assert not any(key_filter.matches(k) for k in KEYS)
    assert key_filter.masks == ()


def test_all_anywhere_matches_everything() -> None:
    key_filter = KeyFilter((b"^foo", b"ALL", b"bar"))
    assert key_filter.masks == (ALL,)
    assert key_filter.match_all
    assert all(key_filter.matches(k) for k in KEYS + (b"\x00",))


def test_all_is_case_sensitive() -> None:
    key_filter = KeyFilter((b"All",))
    assert not key_filter.match_all
    assert key_filter.matches(b"xAlly") and not key_filter.matches(b"ALL")


def test_several_masks_any_one_matches() -> None:
    key_filter = KeyFilter((b"^user:", b"session$", b"o.d"))
    assert key_filter.matches(b"user:1")
    assert key_filter.matches(b"web:session")
    assert key_filter.matches(b"xorder")
    assert not key_filter.matches(b"session:user:")


def test_match_all_shortcut() -> None:
    for mask in (b"", b"^", b"$", b"x*", b"^.*$", b".*", b"^a*", b"a*b*$", b"^a*.*b*$", b"**"):
        assert matches_everything(mask), mask
    for mask in (b".", b"^$", b"^a*$", b"a", b"*", b"^f*$", b"fo**"):
        assert not matches_everything(mask), mask


def test_normalize_and_add() -> None:
    assert normalize_masks([b"a", b"b", b"a"]) == (b"a", b"b")
    assert normalize_masks([b"a", b"ALL", b"b"]) == (ALL,)
    assert normalize_masks([]) == ()
    assert add_masks((b"a",), (b"b", b"a", b"c")) == (b"a", b"b", b"c")
    assert add_masks((b"a",), (b"x", b"ALL", b"y")) == (ALL,)
    assert add_masks((ALL,), (b"x",)) == (ALL,)
    assert add_masks((), ()) == ()
    assert add_masks((b"a",), ()) == (b"a",)


# -- the compiled matcher is Pike's matcher ------------------------------------------------------

_ALPHABET = b"ab^$.*\n\x00"
masks = st.binary(max_size=8).map(lambda b: bytes(_ALPHABET[x % len(_ALPHABET)] for x in b))
keys = st.binary(max_size=10).map(lambda b: bytes(_ALPHABET[x % len(_ALPHABET)] for x in b))


@settings(max_examples=3000)
@given(mask=masks, key=keys)
def test_compiled_equals_pike(mask: bytes, key: bytes) -> None:
    expected = pike_match(mask, key)
    assert (compile_mask(mask).search(key) is not None) == expected
    assert KeyFilter((mask,)).matches(key) == expected
    if matches_everything(mask):
        assert expected


@settings(max_examples=1000)
@given(mask_list=st.lists(masks, max_size=4), key=keys)
def test_filter_equals_any_pike(mask_list: list[bytes], key: bytes) -> None:
    assert KeyFilter(tuple(mask_list)).matches(key) == any(pike_match(m, key) for m in mask_list)


@settings(max_examples=500)
@given(mask=masks, key=st.binary(max_size=12))
def test_compiled_equals_pike_on_any_bytes(mask: bytes, key: bytes) -> None:
    assert (compile_mask(mask).search(key) is not None) == pike_match(mask, key)


def test_compiled_pattern_is_dotall_bytes() -> None:
    pattern = compile_mask(b"a.b")
    assert isinstance(pattern.pattern, bytes)
    assert pattern.flags & re.DOTALL
