"""Where result and error files may go, checked before any work starts.

A result file is written to a temporary file beside its destination and renamed over it
(`pipeline.output_writer`). That is right for a regular file and destructive for anything else: a
device, a FIFO, a symbolic link or a folder would be replaced by a regular file. So a destination
must be a regular file or not exist yet, in a folder that exists; the results file is named .jsonl
or .parquet (its name chooses the format), the error file .jsonl; and no two of the input file,
the results file and the error file may be the same file (the second writer would silently replace
the first one's lines).

`check_output_paths` is what every export calls first (`pipeline run` before it reads its input,
`pipeline results` and `export_results` before they read a result); `check_destination` is the
part the writers check again just before their rename.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pipeline.errors import OutputError

ResultFormat = Literal["jsonl", "parquet"]
RESULT_FORMATS: dict[str, ResultFormat] = {".jsonl": "jsonl", ".parquet": "parquet"}
ERROR_SUFFIX = ".jsonl"  # error lines are OpenAI batch error lines: JSONL only

_KINDS = (  # what `lstat` found, for the error line
    (stat.S_ISDIR, "is a directory; give a file name such as results.jsonl"),
    (stat.S_ISLNK, "is a symbolic link; give the path of a regular file or of a new one (a link is not followed)"),
    (stat.S_ISFIFO, "is a named pipe (FIFO); give the path of a regular file or of a new one"),
    (stat.S_ISCHR, "is a device; give the path of a regular file or of a new one"),
    (stat.S_ISBLK, "is a device; give the path of a regular file or of a new one"),
    (stat.S_ISSOCK, "is a socket; give the path of a regular file or of a new one"),
)


@dataclass(frozen=True, slots=True)
class OutputPaths:
    """Checked destinations: `results` (its format from its extension) and `errors` if asked for."""

    results: Path
    errors: Path | None

    @property
    def results_format(self) -> ResultFormat:
        return RESULT_FORMATS[self.results.suffix.lower()]


def check_output_paths(results: str | os.PathLike[str], errors: str | os.PathLike[str] | None = None, *,
                       input_file: str | os.PathLike[str] | None = None) -> OutputPaths:
    """The results file (and the error file) checked as the module docstring says; `input_file`
    (the job's input, if known) may be neither. Raises OutputError naming the path at fault."""
    results_path, errors_path = Path(results), None if errors is None else Path(errors)
    for path in (results_path, errors_path):
        if path is not None:
            check_destination(path)  # first: "is a device" says more than "has no extension"
    if results_path.suffix.lower() not in RESULT_FORMATS:
        shown = f"extension {results_path.suffix!r}" if results_path.suffix else "no extension"
        raise OutputError(results_path, f"{shown}; name the results file .jsonl or .parquet")
    if errors_path is not None and errors_path.suffix.lower() != ERROR_SUFFIX:
        raise OutputError(errors_path, "the error file is JSONL; name it .jsonl")
    if input_file is not None:
        for path in (results_path, errors_path):
            if path is not None and same_file(path, Path(input_file)):
                raise OutputError(path, "is the input file; name another file to write to (the input is left as it is)")
    if errors_path is not None and same_file(results_path, errors_path):
        raise OutputError(errors_path, "is also the results file (-o); give the errors another file")
    return OutputPaths(results_path, errors_path)


def check_destination(path: str | os.PathLike[str]) -> Path:
    """`path` if a writer may create it or rename a new file over it: it does not exist, or is a
    regular file (not a link to one), and its folder exists and can be written. Raises OutputError."""
    path = Path(path)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as e:  # e.g. a parent that is a file (ENOTDIR), or a folder we may not search
        raise OutputError(path, f"cannot use it ({e.strerror})") from None
    if mode is not None and not stat.S_ISREG(mode):
        raise OutputError(path, next((text for is_kind, text in _KINDS if is_kind(mode)), "is not a regular file"))
    folder = path.parent
    if not folder.is_dir():
        raise OutputError(path, f"cannot create it: the folder {folder} does not exist")
    # The effective ids: they are the ones the write will run as (a set-uid launcher differs).
    if not os.access(folder, os.W_OK | os.X_OK, effective_ids=os.access in os.supports_effective_ids):
        raise OutputError(path, f"cannot create it: no permission to write in the folder {folder}")
    return path


def same_file(a: Path, b: Path) -> bool:
    """Whether `a` and `b` name one file: the same path once folders' links are resolved, or (when
    both exist) the same inode, which also catches hard links."""
    if Path(os.path.realpath(a)) == Path(os.path.realpath(b)):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return False
