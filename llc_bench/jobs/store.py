"""The results CSV of a sweep or a benchmark: append-only, locked, fsynced, resumable.

Every access holds an exclusive ``fcntl.flock`` on the file. A write appends the new rows, flushes
and fsyncs; a row whose key (e.g. cell_id and sampler) is already in the file is never written
twice. A torn last line (a write cut by SIGKILL or power loss: no trailing newline) is truncated
away on the next access. Rows can be moved aside to ``<name>.stale.csv`` (kept for comparison) so
that they are computed again. flock is not reliable on network file systems: one CSV per host there.
"""

from __future__ import annotations

import csv
import fcntl
import io
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from llc_bench.types import ConfigError


class ResultsStore:
    """One results CSV with a fixed header and a row key (the columns that identify a row).

    added_columns: columns newer than some files still being resumed; a file lacking only these
    reads with them empty, and gains them at its next write. Any other header difference is a
    ConfigError (`foreign` says what probably wrote the file).
    """

    def __init__(self, path: str | Path, header: Sequence[str], key: Sequence[str],
                 added_columns: Sequence[str] = (), foreign: str = "written by another spec?"):
        self.path = Path(path)
        self.header = list(header)
        self.key = tuple(key)
        self.added_columns = tuple(added_columns)
        self.foreign = foreign

    @property
    def stale_path(self) -> Path:
        return self.path.with_suffix(".stale.csv")

    def row_key(self, row: dict) -> tuple[str, ...]:
        return tuple(str(row[k]) for k in self.key)

    def _open_locked(self):
        fh = open(self.path, "a+b")  # noqa: SIM115 - closed by the caller
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        return fh

    def _repair_and_read(self, fh, migrate: bool = False) -> list[dict]:
        """Drop a torn last line (no trailing newline), check the header, return the rows.

        A file lacking only added_columns reads with them empty; with migrate=True (before a
        write) the file itself gains them.
        """
        fh.seek(0)
        data = fh.read()
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            os.ftruncate(fh.fileno(), keep)
            data = data[:keep]
        if not data:
            return []
        try:
            reader = csv.DictReader(io.StringIO(data.decode()))
            fieldnames = reader.fieldnames
        except (UnicodeDecodeError, csv.Error):
            raise ConfigError(f"--out {self.path}: not a results CSV; use a new --out") from None
        if fieldnames != self.header:
            missing = [c for c in self.header if c not in fieldnames]
            if set(fieldnames) <= set(self.header) and set(missing) <= set(self.added_columns):
                rows = [{**r, **dict.fromkeys(missing, "")} for r in reader]
                if migrate:
                    self._rewrite(fh, rows)
                return rows
            raise ConfigError(f"--out {self.path}: existing CSV has other columns ({self.foreign}); "
                              "use a new --out")
        return list(reader)

    def _csv_bytes(self, rows: Iterable[dict], header: bool) -> bytes:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.header, lineterminator="\n")
        if header:
            writer.writeheader()
        writer.writerows(rows)
        return buf.getvalue().encode()

    def _rewrite(self, fh, rows: list[dict]) -> None:
        """Replace the whole file's content by `rows` (under the held lock), fsynced."""
        data = self._csv_bytes(rows, header=True)
        fh.seek(0)
        fh.truncate()
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())

    def _append_to(self, fh, rows: list[dict]) -> None:
        """Append rows at the end of the locked file (the header first when it is empty), fsynced."""
        fh.seek(0, os.SEEK_END)
        fh.write(self._csv_bytes(rows, header=fh.tell() == 0))
        fh.flush()
        os.fsync(fh.fileno())

    def read(self) -> list[dict]:
        """All complete rows (repairing a torn last line), or [] when the file does not exist."""
        if not self.path.exists():
            return []
        with self._open_locked() as fh:
            return self._repair_and_read(fh)

    def append(self, rows: Iterable[dict]) -> int:
        """Append the rows whose key is not already in the file; returns how many were written."""
        with self._open_locked() as fh:
            seen = {self.row_key(r) for r in self._repair_and_read(fh, migrate=True)}
            new = []
            for r in rows:
                if self.row_key(r) not in seen:
                    seen.add(self.row_key(r))
                    new.append(r)
            self._append_to(fh, new)
            return len(new)

    def move_aside(self, is_stale: Callable[[dict], bool]) -> list[dict]:
        """Take the rows with is_stale(row) out of the CSV and return them.

        They are appended to <name>.stale.csv first, so the old numbers are kept for comparison.
        """
        if not self.path.exists():
            return []
        with self._open_locked() as fh:
            rows = self._repair_and_read(fh, migrate=True)
            stale = [r for r in rows if is_stale(r)]
            if stale:
                aside = ResultsStore(self.stale_path, self.header, self.key, self.added_columns, self.foreign)
                with aside._open_locked() as out:
                    aside._repair_and_read(out, migrate=True)
                    aside._append_to(out, stale)
                self._rewrite(fh, [r for r in rows if not is_stale(r)])
            return stale
