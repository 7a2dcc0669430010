"""A progress bar for conversions (rich, which typer already depends on)."""

from __future__ import annotations

from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)


class ConvertProgress:
    """Shows the tensor being written and the bytes written out of the file's total."""

    def __init__(self, total_bytes: int, enabled: bool = True, description: str = "") -> None:
        self.enabled = enabled
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._total = total_bytes
        self._description = description

    def __enter__(self) -> ConvertProgress:  # noqa: PYI034
        if self.enabled:
            self._progress = Progress(
                TextColumn("[bold]{task.fields[tensor]:<20}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=False,
            )
            self._progress.__enter__()
            self._task = self._progress.add_task(self._description, total=self._total, tensor="")
        return self

    def tensor(self, name: str) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, tensor=name)

    def advance(self, nbytes: int) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.advance(self._task, nbytes)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._progress is not None:
            if exc_type is None and self._task is not None:
                self._progress.update(self._task, tensor="done")
            self._progress.__exit__(exc_type, exc, tb)
