"""Domain errors the user sees as one clean line (the CLI prints `str(error)` and exits 1, no
traceback). Anything that is not a `PipelineError` is a bug and keeps its traceback.

Problems with a single input line are not exceptions: they are `LineError` values
(`pipeline.request_spec`) yielded beside the good requests, so one bad line never stops a job.
"""

from __future__ import annotations

from pathlib import Path


class PipelineError(Exception):
    """Base of the errors caused by the user's input or environment, shown as one line.

    Its message must say what is wrong and what to do about it.
    """


class FileError(PipelineError):
    """A problem with one file; `str(error)` is `"{path}: {message}"`."""

    def __init__(self, path: str | Path, message: str) -> None:
        self.path = str(path)
        self.message = message
        # args mirror the constructor so the error can be rebuilt from them (copy, Celery's JSON
        # exception serializer); __str__ builds the one line shown to the user.
        super().__init__(self.path, message)

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class InputError(FileError):
    """The input file as a whole cannot be read: it is missing, empty, too large, of an unknown
    type, a JSON array instead of JSONL, or a Parquet file that is corrupted or has no prompt column."""


class ChunksNotQueued(PipelineError):
    """A job was stored but the broker refused its chunks' tasks (Redis down, say). Nothing is
    lost: beat's lost-chunk sweep queues the chunks once the broker is back."""


class OutputError(FileError):
    """A result file cannot be created where asked (no such folder, a directory in the way, no
    permission)."""


class TenantDisabled(PipelineError):
    """A disabled tenant asked to submit: its jobs are kept, but it may start nothing new."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        return (f"tenant {self.name!r} is disabled; it cannot submit jobs (an operator can see it with "
                "`pipeline tenant list`)")
