"""Reading the CRI container log format the monitor writes.

One record per line: ``<RFC3339Nano time> <stdout|stderr> <P|F> <content>``.
``F`` ends a line; ``P`` records are pieces of a longer (or unterminated) line and
are joined with what follows until an ``F`` of the same stream.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

from pycri.errors import InvalidArgumentError

_RECORD_RE = re.compile(
    rb"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:\d\d) (stdout|stderr) ([PF]) ")


@dataclass(frozen=True)
class LogRecord:
    """One CRI log record; ``time_ns`` is UTC nanoseconds since the epoch."""

    time_ns: int
    stream: str
    partial: bool
    content: bytes


def parse_time(stamp: bytes) -> int:
    """RFC3339 (with up to 9 fraction digits) to nanoseconds since the epoch."""
    m = re.fullmatch(rb"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:\d\d)", stamp)
    if not m:
        raise InvalidArgumentError(f"bad log timestamp {stamp[:40]!r}")
    return _to_ns(m.group(1), m.group(2), m.group(3))


def _to_ns(base: bytes, frac: bytes | None, zone: bytes) -> int:
    tz = "+00:00" if zone == b"Z" else zone.decode()
    dt = datetime.fromisoformat(base.decode() + tz).astimezone(UTC)
    secs = int(dt.timestamp())
    ns = int((frac or b"0").ljust(9, b"0"))
    return secs * 1_000_000_000 + ns


def parse_record(line: bytes) -> LogRecord:
    """Parse one line (with or without its trailing newline)."""
    if line.endswith(b"\n"):
        line = line[:-1]
    m = _RECORD_RE.match(line)
    if not m:
        raise InvalidArgumentError(f"not a CRI log record: {line[:80]!r}")
    return LogRecord(_to_ns(m.group(1), m.group(2), m.group(3)), m.group(4).decode(),
                     m.group(5) == b"P", line[m.end():])


def parse_cri_log(lines: Iterable[bytes | str]) -> list[LogRecord]:
    """Parse records from lines (bytes or str); raises InvalidArgumentError on a bad one."""
    out = []
    for line in lines:
        if isinstance(line, str):
            line = line.encode("utf-8", "surrogateescape")
        if line in (b"", b"\n"):
            continue
        out.append(parse_record(line))
    return out


def join_lines(records: Iterable[LogRecord]) -> Iterator[tuple[str, bytes, bool]]:
    """Whole lines per stream: yields (stream, content, complete); P pieces are joined
    up to the next F of the same stream; a trailing run of P is yielded incomplete."""
    pending: dict[str, list[bytes]] = {}
    for r in records:
        parts = pending.setdefault(r.stream, [])
        parts.append(r.content)
        if not r.partial:
            yield r.stream, b"".join(parts), True
            parts.clear()
    for stream, parts in pending.items():
        if parts:
            yield stream, b"".join(parts), False


def read_log(path: str) -> list[LogRecord]:
    """All records of a log file."""
    with open(path, "rb") as f:
        return parse_cri_log(f)


__all__ = ["LogRecord", "join_lines", "parse_cri_log", "parse_record", "parse_time", "read_log"]
