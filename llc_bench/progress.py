"""Progress bars for long stages (training, tuning, sampling): a thin rich wrapper that is a no-op when disabled."""

from __future__ import annotations

import os
import sys

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def progress_enabled(requested: bool = True) -> bool:
    """True only if requested, stdout is a terminal, and neither CI nor LLC_BENCH_NO_PROGRESS is set.

    Bars in logs or CI output are noise (rich redraws become thousands of lines), hence the TTY check.
    """
    if not requested:
        return False
    if os.environ.get("CI") or os.environ.get("LLC_BENCH_NO_PROGRESS"):
        return False
    return sys.stdout.isatty()


class Bar:
    """One progress bar: `with Bar("sgld: sampling", total=T, enabled=on) as bar: bar.advance(k)`.

    When disabled every method is a no-op, so callers never branch on whether a bar is shown.
    """

    def __init__(self, description: str, total: int, enabled: bool = True):
        self.description = description
        self.total = total
        self.enabled = enabled
        self._progress: Progress | None = None
        self._task = None

    def __enter__(self) -> Bar:
        if self.enabled:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                transient=False,
            )
            self._progress.__enter__()
            self._task = self._progress.add_task(self.description, total=self.total)
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)
            self._progress = None

    def advance(self, amount: int = 1) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, amount)

    def describe(self, description: str) -> None:
        """Change the label mid-run (e.g. 'warm-up' -> 'sampling')."""
        if self._progress is not None:
            self._progress.update(self._task, description=description)
