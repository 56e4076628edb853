"""Summarise py-spy ``--format raw`` profiles (``python -m bench --profile DIR`` writes them).

``python -m bench.profile FILE [FILE ...] [--top N]`` prints, per file, the functions with the
most samples on top of the stack (self) and anywhere on it (inclusive), in % of busy samples.
Only samples where the proxy was running count: py-spy leaves out idle threads.
"""

from __future__ import annotations

import argparse
from collections import Counter


def load(path: str, lines: bool = False) -> tuple[Counter, Counter, int]:
    own, inclusive, total = Counter(), Counter(), 0
    with open(path, errors="replace") as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit():
                continue
            n = int(count)
            frames = stack.split(";") if lines else [_short(f) for f in stack.split(";")]
            total += n
            own[frames[-1]] += n
            for frame in set(frames):
                inclusive[frame] += n
    return own, inclusive, total


def _short(frame: str) -> str:
    """'data_received (proxy/relay.py:45)' -> 'data_received (proxy/relay.py)': lines merged."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit(':', 1)[0]})" if where else name


def summary(path: str, top: int = 20, lines: bool = False) -> str:
    own, inclusive, total = load(path, lines)
    if not total:
        return f"{path}: no samples"
    lines = [f"{path}: {total} busy samples"]
    for title, counter in (("self", own), ("inclusive", inclusive)):
        lines.append(f"  top {top} by {title}:")
        lines += [f"    {n / total:6.1%}  {frame}" for frame, n in counter.most_common(top)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+")
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--lines", action="store_true", help="one entry per source line")
    args = parser.parse_args()
    for path in args.files:
        print(summary(path, args.top, args.lines))


if __name__ == "__main__":
    main()
