"""The reply framer: frames are the exact bytes sent, whatever the split."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol import NEED_DATA
from protocol.reply_scan import ReplyError, ReplyScanner, split_aggregate

SAMPLES = [
    b"+OK\r\n",
    b"$2\r\nOK\r\n",
    b"-MOVED 3999 127.0.0.1:7002\r\n",
    b":42\r\n",
    b"$-1\r\n",
    b"*-1\r\n",
    b"*0\r\n",
    b"$0\r\n\r\n",
    b"$5\r\na\r\nbc\r\n",  # CRLF inside a bulk
    b"*3\r\n$3\r\nfoo\r\n$-1\r\n*2\r\n:1\r\n+x\r\n",
    b"%2\r\n+a\r\n:1\r\n+b\r\n*1\r\n_\r\n",
    b"~2\r\n#t\r\n,1.5\r\n",
    b">3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$1\r\nx\r\n",
    b"=15\r\ntxt:Some string\r\n",
    b"!21\r\nSYNTAX invalid syntax\r\n",
    b"(3492890328409238509324850943850943825024385\r\n",
    b"|1\r\n+key\r\n+value\r\n:7\r\n",
    b"*2\r\n|1\r\n+a\r\n+b\r\n:1\r\n:2\r\n",
]


def frames_of(chunks: list[bytes]) -> list[bytes]:
    scanner = ReplyScanner()
    out = []
    for chunk in chunks:
        scanner.feed(chunk)
        while (frame := scanner.next_frame()) is not NEED_DATA:
            out.append(frame.raw)
    assert scanner.buffered == 0
    return out


def test_each_sample_is_one_frame() -> None:
    assert frames_of([b"".join(SAMPLES)]) == SAMPLES


@given(st.lists(st.sampled_from(SAMPLES), max_size=12), st.data())
def test_any_split_gives_the_same_frames(frames: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(frames)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)])]
    assert frames_of(chunks) == frames


def test_flags() -> None:
    scanner = ReplyScanner()
    scanner.feed(b"-ASK 12 127.0.0.1:7001\r\n>2\r\n+a\r\n+b\r\n!3\r\nERR\r\n|1\r\n+k\r\n+v\r\n-X y\r\n+OK\r\n")
    ask = scanner.next_frame()
    assert ask.error and ask.error_text == b"ASK 12 127.0.0.1:7001" and not ask.push
    push = scanner.next_frame()
    assert push.push and not push.error
    blob_error = scanner.next_frame()
    assert blob_error.error and blob_error.error_text == b"ERR"
    with_attribute = scanner.next_frame()
    assert with_attribute.error and with_attribute.raw.startswith(b"|1")
    ok = scanner.next_frame()
    assert not ok.error and ok.error_text == b""
    assert scanner.next_frame() is NEED_DATA


def test_limit_and_garbage() -> None:
    scanner = ReplyScanner(max_frame=10)
    scanner.feed(b"$100\r\n" + b"x" * 20)
    with pytest.raises(ReplyError):
        scanner.next_frame()
    with pytest.raises(ReplyError):
        scanner.next_frame()  # dead from then on
    scanner = ReplyScanner()
    scanner.feed(b"?what\r\n")
    with pytest.raises(ReplyError):
        scanner.next_frame()
    scanner = ReplyScanner()
    scanner.feed(b"$3\r\nabcde\r\n")
    with pytest.raises(ReplyError):
        scanner.next_frame()


def test_split_aggregate() -> None:
    header, elements = split_aggregate(b"*3\r\n$3\r\nfoo\r\n$-1\r\n*1\r\n:1\r\n")
    assert header == b"*3\r\n" and elements == [b"$3\r\nfoo\r\n", b"$-1\r\n", b"*1\r\n:1\r\n"]
    header, elements = split_aggregate(b"%1\r\n+a\r\n:1\r\n")
    assert elements == [b"+a\r\n", b":1\r\n"]
    with pytest.raises(ReplyError):
        split_aggregate(b"+OK\r\n")
