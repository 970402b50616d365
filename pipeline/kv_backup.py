"""Backups of the workers' KV snapshots: the complete snapshot folders under `cache_dir` (one
folder per worker) in one gzipped tar beside the database backup, and their restore.

Only complete snapshots go in (a `.partial` folder is a write in progress). Extraction uses
tarfile's `data` filter: no absolute paths, no `..`, no links or devices, so an archive cannot
write outside the cache folder.
"""

from __future__ import annotations

import gzip
import os
import re
import tarfile
import zlib
from pathlib import Path

from pipeline.errors import FileError

KV_SUFFIX = ".kv.tar.gz"
_SNAPSHOT = re.compile(r"snapshot-\d{8}T\d{12}Z")


def archive_snapshots(cache_dir: Path, database_backup: Path) -> Path | None:
    """`<database backup>.kv.tar.gz` holding every complete snapshot under `cache_dir`, or None when
    there is none. Written under a temporary name, then renamed."""
    folders = sorted(p for p in cache_dir.glob("*/snapshot-*") if p.is_dir() and _SNAPSHOT.fullmatch(p.name)) \
        if cache_dir.is_dir() else []
    if not folders:
        return None
    target = database_backup.with_name(database_backup.name.split(".")[0] + KV_SUFFIX)
    partial = target.with_name(target.name + ".partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w:gz", compresslevel=1) as tar:
            for folder in folders:
                tar.add(folder, arcname=str(folder.relative_to(cache_dir)))
            tar.close()
            raw.flush()
            os.fsync(raw.fileno())
        partial.replace(target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return target


def restore_snapshots(archive: Path, cache_dir: Path, *, force: bool = False) -> int:
    """Extracts the snapshot folders of `archive` into `cache_dir`; returns how many. Refuses a
    cache folder that already holds snapshots unless `force` (then same-named ones are replaced)."""
    existing = [p for p in cache_dir.glob("*/snapshot-*")] if cache_dir.is_dir() else []
    if existing and not force:
        raise FileError(cache_dir, f"already holds {len(existing)} KV snapshots; restore into an empty cache_dir, "
                                   "or pass --force")
    try:
        # Read the whole stream first: gzip's CRC is checked only at its end, which tarfile may
        # never reach, and a flipped bit inside a member can inflate without an error.
        with gzip.open(archive, "rb") as packed:
            while packed.read(1 << 20):
                pass
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()
            names = {Path(m.name).parts[:2] for m in members}
            if any(len(parts) < 2 or not _SNAPSHOT.fullmatch(parts[1]) for parts in names):
                raise FileError(archive, "holds files that are not KV snapshots; not restored")
            cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            tar.extractall(cache_dir, filter="data")
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise FileError(archive, f"corrupted KV snapshot archive ({type(e).__name__}: {e}); use another backup") \
            from None
    return len(names)
