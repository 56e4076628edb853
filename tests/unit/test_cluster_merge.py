"""Merging the replies of a command split across nodes: byte-level, no server."""

from __future__ import annotations

from protocol import merge


def test_in_key_order() -> None:
    parts = [b"*2\r\n$1\r\na\r\n$-1\r\n", b"*1\r\n$1\r\nb\r\n"]
    assert merge.in_key_order(parts, [[0, 2], [1]], 3) == b"*3\r\n$1\r\na\r\n$1\r\nb\r\n$-1\r\n"
    assert merge.in_key_order([b"-ERR x\r\n", parts[1]], [[0], [1]], 2) == b"-ERR x\r\n"


def test_summed_first_concatenated() -> None:
    assert merge.summed([b":1\r\n", b":0\r\n", b":5\r\n"]) == b":6\r\n"
    assert merge.summed([b":1\r\n", b"-MOVED 1 h:1\r\n"]) == b"-MOVED 1 h:1\r\n"
    assert merge.first([b"+OK\r\n", b"+OK\r\n"]) == b"+OK\r\n"
    assert merge.concatenated([b"*1\r\n$1\r\na\r\n", b"*0\r\n", b"*1\r\n$1\r\nb\r\n"]) == \
        b"*2\r\n$1\r\na\r\n$1\r\nb\r\n"


def test_scan_cursor_walks_every_node() -> None:
    assert merge.scan_cursor(0) == (0, 0)
    reply = b"*2\r\n$2\r\n17\r\n*1\r\n$1\r\nk\r\n"
    assert merge.scan_reply(reply, 1, 3) == b"*2\r\n$5\r\n17409\r\n*1\r\n$1\r\nk\r\n"
    assert merge.scan_cursor(17409) == (1, 17)
    done = b"*2\r\n$1\r\n0\r\n*0\r\n"
    assert merge.scan_reply(done, 1, 3) == b"*2\r\n$1\r\n2\r\n*0\r\n"  # on to node 2
    assert merge.scan_reply(done, 2, 3) == b"*2\r\n$1\r\n0\r\n*0\r\n"  # the end


def test_info_as_single() -> None:
    raw = b"$30\r\n# Cluster\r\ncluster_enabled:1\r\n\r\n"
    out = merge.info_as_single(raw, b"# Proxy\r\nproxy:x\r\n")
    assert b"cluster_enabled:0" in out and out.endswith(b"# Proxy\r\nproxy:x\r\n\r\n")
    header, body = out.split(b"\r\n", 1)
    assert int(header[1:]) == len(body) - 2
    verbatim = b"=34\r\ntxt:# Cluster\r\ncluster_enabled:1\r\n\r\n"
    assert merge.info_as_single(verbatim, b"").startswith(b"=34\r\ntxt:# Cluster\r\ncluster_enabled:0")
