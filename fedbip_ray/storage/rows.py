"""Append-only JSON-lines logs (``metrics``, ``similarity``) at a local path or on object storage.

Local: one ``<name>.jsonl`` file, a fsynced line appended per row (exactly the historic format).
Object store (no append there): one object per row, ``<name>/000001.json``, ``000002.json``, ...;
each row is one PUT, so a reader never sees half a row, and rows read back in sequence order.
:meth:`RowLog.consolidate` also writes ``<name>.jsonl`` on an object store (e.g. at the end of a
run) so that the usual single file exists there too.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

from fedbip_ray.storage.location import Location, fsync_dir

ROW_OBJECT = re.compile(r"^(\d{6,})\.json$")
Row = dict[str, Any]


class RowLog(Protocol):
    """The same API for both layouts."""

    location: Location

    def append(self, row: Mapping[str, Any]) -> None:
        """Add ``row`` (a JSON object) durably at the end."""

    def read(self) -> list[Row]:
        """Every complete row, in the order appended (a torn or unreadable row is skipped)."""

    def truncate_after(self, round_num: int) -> None:
        """Keep only rows with ``row["round"] <= round_num`` (rows without a round are dropped)."""

    def replace(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Make the log hold exactly ``rows``."""

    def consolidate(self) -> None:
        """Object store: write the whole log as ``<name>.jsonl`` too (local: nothing to do)."""


def open_rows(output: Location, name: str) -> RowLog:
    """The log ``name`` (e.g. ``"metrics"``) of the run whose output directory is ``output``."""
    if output.is_local:
        return LocalRows(output / f"{name}.jsonl")
    return ObjectRows(output / name, output / f"{name}.jsonl")


def keep_row(row: Any, round_num: int) -> bool:
    """Whether ``row`` survives ``truncate_after(round_num)``."""
    return isinstance(row, dict) and isinstance(row.get("round"), int) and row["round"] <= round_num


def to_jsonl(rows: Iterable[Mapping[str, Any]]) -> str:
    return "".join(json.dumps(dict(r)) + "\n" for r in rows)


def parse_jsonl(text: str) -> list[Row]:
    """JSON lines of ``text``; a line that does not parse (a torn last line) is skipped."""
    rows = []
    for line in text.splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


class LocalRows:
    """``<name>.jsonl`` in a local directory, one fsynced line appended per row."""

    def __init__(self, location: Location) -> None:
        self.location = location
        self.path: Path = location.local_path

    def append(self, row: Mapping[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as fh:
            fh.write(json.dumps(dict(row)) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def read(self) -> list[Row]:
        return parse_jsonl(self.path.read_text()) if self.path.is_file() else []

    def truncate_after(self, round_num: int) -> None:
        self.replace([r for r in self.read() if keep_row(r, round_num)])

    def replace(self, rows: Iterable[Mapping[str, Any]]) -> None:
        self.location.write_text(to_jsonl(rows))
        fsync_dir(self.path.parent)

    def consolidate(self) -> None:
        return None


class ObjectRows:
    """``<name>/NNNNNN.json``: one object per row, numbered from 1 in the order appended."""

    def __init__(self, location: Location, jsonl: Location) -> None:
        self.location, self.jsonl = location, jsonl
        self._next: int | None = None

    def _numbers(self) -> list[int]:
        found = (ROW_OBJECT.match(n) for n in self.location.listdir())
        return sorted(int(m.group(1)) for m in found if m)

    def _object(self, number: int) -> Location:
        return self.location / f"{number:06d}.json"

    def append(self, row: Mapping[str, Any]) -> None:
        if self._next is None:
            self._next = max(self._numbers(), default=0) + 1
        self._object(self._next).write_text(json.dumps(dict(row)))
        self._next += 1

    def _numbered(self) -> list[tuple[int, Any]]:
        out = []
        for number in self._numbers():
            try:
                data = self._object(number).read_bytes()
            except FileNotFoundError:
                continue
            try:
                out.append((number, json.loads(data)))
            except ValueError:
                continue
        return out

    def read(self) -> list[Row]:
        return [row for _, row in self._numbered()]

    def truncate_after(self, round_num: int) -> None:
        kept = 0
        for number, row in self._numbered():
            if keep_row(row, round_num):
                kept = max(kept, number)
            else:
                self._object(number).delete()
        self.jsonl.delete()
        self._next = max([kept, *(n for n in self._numbers())], default=0) + 1

    def replace(self, rows: Iterable[Mapping[str, Any]]) -> None:
        rows = list(rows)
        self.jsonl.delete()
        self.location.delete_dir()
        self._next = 1
        for row in rows:
            self.append(row)

    def consolidate(self) -> None:
        self.jsonl.write_text(to_jsonl(self.read()))
