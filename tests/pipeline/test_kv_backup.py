"""KV snapshot archives: what `pipeline backup` puts beside the database backup, and its restore."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest

from pipeline.errors import FileError
from pipeline.kv_backup import archive_snapshots, restore_snapshots


def make_snapshots(cache_dir: Path) -> None:
    for node, stamp in (("w1@host", "20260105T120000000001Z"), ("w2@host", "20260105T120001000002Z")):
        folder = cache_dir / node / f"snapshot-{stamp}"
        folder.mkdir(parents=True)
        (folder / "manifest.json").write_text(f'{{"node": "{node}"}}')
        (folder / "blocks.safetensors").write_bytes(bytes(range(256)) * 8)
    (cache_dir / "w1@host" / ".snapshot-20260105T130000000000Z.partial").mkdir()  # a write in progress


def test_archive_holds_complete_snapshots_and_restores_them(tmp_path):
    make_snapshots(tmp_path / "kv")
    archive = archive_snapshots(tmp_path / "kv", tmp_path / "pipeline-20260105T120000Z.dump")
    assert archive == tmp_path / "pipeline-20260105T120000Z.kv.tar.gz"
    assert archive.stat().st_mode & 0o777 == 0o600
    with tarfile.open(archive) as tar:
        assert sorted(m.name for m in tar.getmembers() if m.isfile()) == [
            "w1@host/snapshot-20260105T120000000001Z/blocks.safetensors",
            "w1@host/snapshot-20260105T120000000001Z/manifest.json",
            "w2@host/snapshot-20260105T120001000002Z/blocks.safetensors",
            "w2@host/snapshot-20260105T120001000002Z/manifest.json",
        ]
    assert restore_snapshots(archive, tmp_path / "restored") == 2
    restored = tmp_path / "restored" / "w2@host" / "snapshot-20260105T120001000002Z" / "blocks.safetensors"
    assert restored.read_bytes() == bytes(range(256)) * 8


def test_no_snapshots_no_archive(tmp_path):
    assert archive_snapshots(tmp_path / "missing", tmp_path / "pipeline-20260105T120000Z.dump") is None
    assert list(tmp_path.iterdir()) == []


def test_restore_refuses_a_cache_dir_with_snapshots_unless_forced(tmp_path):
    make_snapshots(tmp_path / "kv")
    archive = archive_snapshots(tmp_path / "kv", tmp_path / "pipeline-20260105T120000Z.dump")
    with pytest.raises(FileError, match="already holds 2 KV snapshots; restore into an empty cache_dir, or pass --force"):
        restore_snapshots(archive, tmp_path / "kv")
    assert restore_snapshots(archive, tmp_path / "kv", force=True) == 2


def test_a_corrupted_or_foreign_archive_is_refused(tmp_path):
    make_snapshots(tmp_path / "kv")
    archive = archive_snapshots(tmp_path / "kv", tmp_path / "pipeline-20260105T120000Z.dump")
    data = bytearray(archive.read_bytes())
    data[len(data) // 2] ^= 0xFF
    archive.write_bytes(bytes(data))
    with pytest.raises(FileError, match="corrupted KV snapshot archive"):
        restore_snapshots(archive, tmp_path / "a")
    foreign = tmp_path / "foreign.kv.tar.gz"
    with tarfile.open(foreign, "w:gz") as tar:
        tar.add(tmp_path / "kv" / "w1@host" / "snapshot-20260105T120000000001Z" / "manifest.json", arcname="../evil")
    with pytest.raises(FileError, match="holds files that are not KV snapshots"):
        restore_snapshots(foreign, tmp_path / "b")
    assert not (tmp_path / "b").exists()
