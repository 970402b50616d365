"""Output paths: only a regular file is ever replaced (or a new one created), checked when a path is
given and again by the writers just before their rename."""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from pipeline.errors import OutputError
from pipeline.output_paths import OutputPaths, check_destination, check_output_paths
from pipeline.line_ids import LineIds
from pipeline.output_writer import JsonlResultWriter, ParquetResultWriter, ResultRecord

DONE = ResultRecord(custom_id="a", line=1, ids=LineIds("batch_req_r1", "req_r1", "r1"), endpoint="completions", model="tiny", created=0,
                    text="Hello", finish_reason="stop")


def test_new_and_regular_files_are_accepted(tmp_path: Path) -> None:
    (tmp_path / "old.parquet").write_bytes(b"an earlier export")
    assert check_output_paths(tmp_path / "new.jsonl") == OutputPaths(tmp_path / "new.jsonl", None)
    paths = check_output_paths(tmp_path / "old.parquet", tmp_path / "err.jsonl", input_file=tmp_path / "in.jsonl")
    assert paths == OutputPaths(tmp_path / "old.parquet", tmp_path / "err.jsonl")
    assert paths.results_format == "parquet"
    assert check_output_paths(tmp_path / "OUT.JSONL").results_format == "jsonl"


def device_node(folder: Path) -> Path:
    """A character device like /dev/null, made in `folder`: a test run against a writer without
    the check must not replace a real device. Making one needs root."""
    if os.geteuid() != 0:
        pytest.skip("making a device node needs root")
    path = folder / "null.jsonl"
    os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    return path


def special_files(tmp_path: Path, kind: str) -> tuple[Path, str]:
    """A path of `kind` that exists and is not a regular file, and the error it gets."""
    if kind == "device":
        return device_node(tmp_path), "is a device"
    target = tmp_path / "target.jsonl"
    target.write_text("kept\n")
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    link, dangling = tmp_path / "link.jsonl", tmp_path / "dangling.jsonl"
    link.symlink_to(target)
    dangling.symlink_to(tmp_path / "nowhere.jsonl")
    folder = tmp_path / "folder.jsonl"
    folder.mkdir()
    return {
        "fifo": (fifo, "is a named pipe"),
        "symlink": (link, "is a symbolic link"),
        "dangling symlink": (dangling, "is a symbolic link"),
        "folder": (folder, "is a directory"),
    }[kind]


@pytest.mark.parametrize("kind", ["device", "fifo", "symlink", "dangling symlink", "folder"])
def test_a_destination_that_is_not_a_regular_file_is_refused(tmp_path: Path, kind: str) -> None:
    path, message = special_files(tmp_path, kind)
    before = os.lstat(path)
    for results, errors in ((path, None), (tmp_path / "out.jsonl", path)):
        with pytest.raises(OutputError, match=message) as caught:
            check_output_paths(results, errors)
        assert caught.value.path == str(path)
    with pytest.raises(OutputError, match=message):
        JsonlResultWriter(path)  # the writer refuses it by itself too
    after = os.lstat(path)
    assert (stat.S_IFMT(after.st_mode), after.st_ino) == (stat.S_IFMT(before.st_mode), before.st_ino)
    if kind == "symlink":
        assert (tmp_path / "target.jsonl").read_text() == "kept\n"


def test_a_missing_folder_or_a_file_as_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="the folder .*nope does not exist"):
        check_output_paths(tmp_path / "nope" / "out.jsonl")
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputError, match="cannot use it|does not exist"):
        check_output_paths(tmp_path / "file" / "out.jsonl")
    with pytest.raises(OutputError, match="the folder .*nope does not exist"):
        check_output_paths(tmp_path / "out.jsonl", tmp_path / "nope" / "err.jsonl")


@pytest.mark.parametrize(("results", "errors", "message"), [
    ("out.csv", None, "extension '.csv'; name the results file .jsonl or .parquet"),
    ("out", None, "no extension; name the results file .jsonl or .parquet"),
    ("out.json", None, "extension '.json'"),
    ("out.jsonl", "err.parquet", "the error file is JSONL; name it .jsonl"),
    ("out.jsonl", "err.txt", "the error file is JSONL; name it .jsonl"),
])
def test_an_unknown_extension_is_refused(tmp_path: Path, results: str, errors: str | None, message: str) -> None:
    with pytest.raises(OutputError, match=message):
        check_output_paths(tmp_path / results, None if errors is None else tmp_path / errors)


def test_the_input_file_is_never_an_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    source = tmp_path / "in.jsonl"
    source.write_text('{"text": "hi"}\n')
    (tmp_path / "sub").mkdir()
    (tmp_path / "via").symlink_to(tmp_path / "sub")
    os.link(source, tmp_path / "hard.jsonl")
    for spelling in (source, Path("in.jsonl"), Path("./sub/../in.jsonl"), tmp_path / "hard.jsonl"):
        with pytest.raises(OutputError, match="is the input file"):
            check_output_paths(spelling, input_file=source)
        with pytest.raises(OutputError, match="is the input file"):
            check_output_paths(tmp_path / "out.jsonl", spelling, input_file=Path("in.jsonl"))
    # An input reached through a linked folder is the same file too.
    (tmp_path / "sub" / "in2.jsonl").write_text("{}\n")
    with pytest.raises(OutputError, match="is the input file"):
        check_output_paths(tmp_path / "sub" / "in2.jsonl", input_file=tmp_path / "via" / "in2.jsonl")
    assert source.read_text() == '{"text": "hi"}\n'


def test_results_and_errors_must_be_two_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for results, errors in (("out.jsonl", "out.jsonl"), ("out.jsonl", "./out.jsonl"),
                            (str(tmp_path / "out.jsonl"), "out.jsonl")):
        with pytest.raises(OutputError, match=r"is also the results file \(-o\)"):
            check_output_paths(results, errors)
    (tmp_path / "a.jsonl").write_text("")
    os.link(tmp_path / "a.jsonl", tmp_path / "b.jsonl")
    with pytest.raises(OutputError, match="is also the results file"):
        check_output_paths("a.jsonl", "b.jsonl")


@contextmanager
def _as_an_unprivileged_user() -> Iterator[None]:
    """Root may write in any folder, so as root the check runs with the effective uid of `nobody`
    (the real uid stays root, which lets the test take root back)."""
    if os.geteuid() != 0:
        yield
        return
    os.setegid(65534)
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


def test_an_unwritable_folder_is_refused_before_any_work() -> None:
    # Under /tmp, not tmp_path: `nobody` must be able to reach the folder to find it unwritable.
    with tempfile.TemporaryDirectory() as outer:
        os.chmod(outer, 0o755)
        locked = Path(outer) / "locked"
        locked.mkdir(mode=0o555)
        try:
            with _as_an_unprivileged_user(), pytest.raises(OutputError, match="no permission to write in the folder"):
                check_output_paths(locked / "out.jsonl")
            assert list(locked.iterdir()) == []
        finally:
            locked.chmod(0o755)


@pytest.mark.parametrize("writer_class", [JsonlResultWriter, ParquetResultWriter])
def test_a_destination_swapped_while_writing_is_not_replaced(tmp_path: Path, writer_class) -> None:
    """The check before the rename: a path that became a link or a FIFO while the job ran is kept."""
    out, target = tmp_path / "out.bin", tmp_path / "precious"
    target.write_text("precious\n")
    with pytest.raises(OutputError, match="is a symbolic link"):
        with writer_class(out) as writer:
            writer.write(DONE)
            out.symlink_to(target)
    assert out.is_symlink() and target.read_text() == "precious\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_check_destination_returns_the_path(tmp_path: Path) -> None:
    assert check_destination(str(tmp_path / "x.dump")) == tmp_path / "x.dump"
