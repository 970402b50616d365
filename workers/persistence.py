"""KV cache snapshots: the hottest cached prefix blocks on disk, so a restarted worker starts warm.

A snapshot is a folder `snapshot-<UTC time>` holding `blocks.safetensors` (the blocks' K/V, and
int8 scales, in a backend-neutral layout: a block's tokens are rows `[block_size, head_dim]`) and
`manifest.json` (format, model fingerprint, block size, KV dtype, layer/head shape, the sha256 of
each file, and per block its chained hash, parent hash, depth, uses and whether it was pinned: a
load pins those again, so `pipeline cache pin` survives a restart). Never pickle.

Writes are atomic: the folder is built under a hidden `.partial` name, every file and the folder
are fsynced, then it is renamed into place; a crash leaves only a `.partial` folder, removed by the
next write. A snapshot of another model, block size, dtype or shape, or one whose checksum or
manifest is wrong, is refused with one line (`SnapshotRefused`) and the engine stays cold.

The blocks are chosen by the eviction policy's own ranking (pinned and held blocks first), each
one's parents before it, so any leading part of the list is a set of whole chains: a pool smaller
than the snapshot's takes the hottest whole chains and stops.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors, save as save_tensors

from workers.block_pool import CachedBlockEntry, KVBlock

if TYPE_CHECKING:
    from workers.engine import LLMEngine

FORMAT = "llm-batch-pipeline/kv-snapshot"
VERSION = 1
BLOCKS_FILE = "blocks.safetensors"
MANIFEST_FILE = "manifest.json"
_NAME = re.compile(r"snapshot-\d{8}T\d{6}\d{6}Z")
_STORAGE = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "int8": torch.int8,
            "fp8": torch.uint8}


class SnapshotRefused(ValueError):
    """A snapshot that cannot be loaded into this engine; the message is one line saying why."""


@dataclass(frozen=True, slots=True)
class CacheIdentity:
    """What must match for a snapshot's blocks to mean the same thing in another engine."""

    model_fingerprint: str
    block_size: int
    kv_dtype: str  # the storage: "float32", "bfloat16", "float16", "int8" or "fp8"
    num_layers: int
    num_kv_heads: int
    head_dim: int


@dataclass(slots=True)
class KVSnapshot:
    identity: CacheIdentity
    entries: list[CachedBlockEntry]  # parents before children, hottest chains first
    kv: torch.Tensor  # [N, layers, 2, KVH, BS, D] in the storage dtype
    scales: torch.Tensor | None  # [N, layers, 2, KVH, BS] float32 for int8/fp8


@dataclass(frozen=True, slots=True)
class SnapshotLoad:
    path: Path
    num_blocks: int  # blocks in the file
    num_imported: int  # of which now cached in the engine
    num_pinned: int  # of those, pinned again as they were
    seconds: float  # reading, checking and importing
    pin_refused: str | None = None  # why the recorded pins were not restored (over the pin limit)


# -- capture and restore (on the thread that steps the engine) -------------------------------------


def capture(engine: LLMEngine, max_blocks: int | None = None) -> KVSnapshot:
    """The engine's hottest cached chains (at most `max_blocks` blocks), copied out of the pool."""
    blocks = hottest_chains(engine.kv_manager.pool.ranked_cached_blocks(), max_blocks)
    entries = [CachedBlockEntry(b.block_hash, b.parent_hash, b.usage.depth, b.usage.uses, b.pinned) for b in blocks]
    kv, scales = engine.kv_cache.export_blocks([b.block_id for b in blocks])
    return KVSnapshot(engine.cache_identity(), entries, kv, scales)


@dataclass(frozen=True, slots=True)
class Restored:
    num_imported: int
    num_pinned: int
    pin_refused: str | None  # the pool's reason, when pinning the recorded pins would pass its limit


def restore(engine: LLMEngine, snapshot: KVSnapshot) -> Restored:
    """Makes the snapshot's blocks cached in the engine's empty free blocks, and pins again those
    that were pinned (all of them, or none when that would pass the pool's pin limit)."""
    check_identity(snapshot.identity, engine.cache_identity())
    pool = engine.kv_manager.pool
    taken = pool.import_cached(snapshot.entries)
    if not taken:
        return Restored(0, 0, None)
    rows = torch.tensor([index for index, _ in taken])
    scales = snapshot.scales.index_select(0, rows) if snapshot.scales is not None else None
    engine.kv_cache.import_blocks([block.block_id for _, block in taken], snapshot.kv.index_select(0, rows), scales)
    try:
        pinned = pool.pin([snapshot.entries[index].block_hash for index, _ in taken if snapshot.entries[index].pinned])
    except ValueError as e:
        return Restored(len(taken), 0, str(e))
    return Restored(len(taken), len(pinned), None)


def hottest_chains(ranked: list[KVBlock], max_blocks: int | None) -> list[KVBlock]:
    """`ranked` (hottest first) reordered so each block follows its parent, cut at `max_blocks`.
    A block whose chain no longer reaches a root (a parent evicted before it) is left out: it could
    never be hit."""
    by_hash = {b.block_hash: b for b in ranked}
    order: list[KVBlock] = []
    seen: set[bytes] = set()
    for block in ranked:
        chain: list[KVBlock] = []
        current = block
        while current.block_hash not in seen:
            chain.append(current)
            parent = None if current.usage.depth == 0 else by_hash.get(current.parent_hash)
            if current.parent_hash is None or (parent is None and current.usage.depth > 0):
                chain = []  # its chain no longer reaches a root: it could never be hit
                break
            if parent is None:
                break  # a root block
            current = parent
        for b in reversed(chain):
            seen.add(b.block_hash)
            order.append(b)
        if max_blocks is not None and len(order) >= max_blocks:
            break
    return order if max_blocks is None else order[:max_blocks]


def check_identity(found: CacheIdentity, expected: CacheIdentity) -> None:
    for name in ("model_fingerprint", "block_size", "kv_dtype", "num_layers", "num_kv_heads", "head_dim"):
        have, want = getattr(found, name), getattr(expected, name)
        if have != want:
            raise SnapshotRefused(f"it was made with {name} {have!r}, this engine has {want!r}")


# -- files -------------------------------------------------------------------------------------------


def write(snapshot: KVSnapshot, directory: Path, *, keep: int = 2, now: datetime | None = None) -> Path:
    """Writes `snapshot` into a new folder under `directory` (created 0700 if missing), atomically,
    then deletes all but the newest `keep` snapshots there. Returns the new folder."""
    if keep < 1:
        raise ValueError(f"keep={keep} must be at least 1")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    for leftover in directory.glob(".snapshot-*.partial"):
        shutil.rmtree(leftover, ignore_errors=True)  # a crashed write's; only this worker writes here
    stamp = (now or datetime.now(timezone.utc)).strftime("%Y%m%dT%H%M%S%fZ")
    final = directory / f"snapshot-{stamp}"
    partial = directory / f".{final.name}.partial"
    partial.mkdir(mode=0o700)
    try:
        tensors = {"kv": snapshot.kv.contiguous()}
        if snapshot.scales is not None:
            tensors["scales"] = snapshot.scales.contiguous()
        data = save_tensors(tensors)
        _write_synced(partial / BLOCKS_FILE, data)
        _write_synced(partial / MANIFEST_FILE, json.dumps(_manifest(snapshot, data, stamp), indent=1).encode())
        _fsync_dir(partial)
        os.replace(partial, final)
        _fsync_dir(directory)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    for old in list_snapshots(directory)[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_snapshots(directory: Path) -> list[Path]:
    """Complete snapshot folders in `directory`, newest first."""
    if not directory.is_dir():
        return []
    return sorted((p for p in directory.iterdir() if p.is_dir() and _NAME.fullmatch(p.name)), reverse=True)


def read(path: Path, expected: CacheIdentity) -> KVSnapshot:
    """The snapshot in folder `path`, checked against `expected`; raises SnapshotRefused."""
    try:
        manifest = json.loads((path / MANIFEST_FILE).read_text())
    except FileNotFoundError:
        raise SnapshotRefused(f"{MANIFEST_FILE} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SnapshotRefused(f"{MANIFEST_FILE} cannot be read ({type(e).__name__}: {e})") from None
    identity, entries, digest = _parse_manifest(manifest)
    check_identity(identity, expected)
    try:
        data = (path / BLOCKS_FILE).read_bytes()
    except OSError as e:
        raise SnapshotRefused(f"{BLOCKS_FILE} cannot be read ({e.strerror or e})") from None
    if hashlib.sha256(data).hexdigest() != digest:
        raise SnapshotRefused(f"{BLOCKS_FILE} does not match its checksum in {MANIFEST_FILE} (corrupted or "
                              "partly written); delete the snapshot")
    try:
        tensors = load_tensors(data)
    except (SafetensorError, ValueError) as e:
        raise SnapshotRefused(f"{BLOCKS_FILE} is not a valid safetensors file ({e})") from None
    kv, scales = tensors.get("kv"), tensors.get("scales")
    shape = (len(entries), identity.num_layers, 2, identity.num_kv_heads, identity.block_size, identity.head_dim)
    if kv is None or tuple(kv.shape) != shape or kv.dtype != _STORAGE[identity.kv_dtype]:
        raise SnapshotRefused(f"{BLOCKS_FILE}: tensor 'kv' is not {list(shape)} of {identity.kv_dtype}")
    if (identity.kv_dtype in ("int8", "fp8")) != (scales is not None) or (
            scales is not None and (tuple(scales.shape) != shape[:-1] or scales.dtype != torch.float32)):
        raise SnapshotRefused(f"{BLOCKS_FILE}: tensor 'scales' does not fit kv dtype {identity.kv_dtype}")
    return KVSnapshot(identity, entries, kv, scales)


def load_newest(engine: LLMEngine, directory: Path, *, run_on_engine=None) -> tuple[SnapshotLoad | None, list[str]]:
    """Loads the newest snapshot in `directory` that this engine accepts; see `load_first`."""
    return load_first(engine, list_snapshots(directory), run_on_engine=run_on_engine)


def load_first(engine: LLMEngine, paths: list[Path], *, run_on_engine=None) -> tuple[SnapshotLoad | None, list[str]]:
    """Loads the first snapshot of `paths` that this engine accepts: (what was loaded or None, one
    line per snapshot refused on the way, naming its folder and the reason).

    `run_on_engine(fn)` runs `fn(engine)` where the engine may be touched (the engine loop's thread
    in a worker) and returns its result; by default, here."""
    run = run_on_engine or (lambda fn: fn(engine))
    refused: list[str] = []
    expected = run(lambda e: e.cache_identity())
    for path in paths:
        started = time.perf_counter()
        try:
            snapshot = read(path, expected)
        except SnapshotRefused as e:
            refused.append(f"KV snapshot {path} refused: {e}; starting without it")
            continue
        restored = run(lambda e: restore(e, snapshot))
        return SnapshotLoad(path, len(snapshot.entries), restored.num_imported, restored.num_pinned,
                            time.perf_counter() - started, restored.pin_refused), refused
    return None, refused


def _manifest(snapshot: KVSnapshot, data: bytes, stamp: str) -> dict[str, Any]:
    identity = snapshot.identity
    return {
        "format": FORMAT,
        "version": VERSION,
        "created_at": stamp,
        "model_fingerprint": identity.model_fingerprint,
        "block_size": identity.block_size,
        "kv_dtype": identity.kv_dtype,
        "num_layers": identity.num_layers,
        "num_kv_heads": identity.num_kv_heads,
        "head_dim": identity.head_dim,
        "files": {BLOCKS_FILE: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}},
        "blocks": [{"hash": e.block_hash.hex(), "parent": e.parent_hash.hex(), "depth": e.depth, "uses": e.uses,
                    "pinned": e.pinned} for e in snapshot.entries],
    }


def _parse_manifest(manifest: Any) -> tuple[CacheIdentity, list[CachedBlockEntry], str]:
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SnapshotRefused(f"{MANIFEST_FILE} is not a KV snapshot manifest (no format {FORMAT!r})")
    if manifest.get("version") != VERSION:
        raise SnapshotRefused(f"{MANIFEST_FILE} has version {manifest.get('version')!r}; this release reads {VERSION}")
    try:
        identity = CacheIdentity(
            str(manifest["model_fingerprint"]), _int(manifest["block_size"]), str(manifest["kv_dtype"]),
            _int(manifest["num_layers"]), _int(manifest["num_kv_heads"]), _int(manifest["head_dim"]))
        if identity.kv_dtype not in _STORAGE:
            raise ValueError(f"kv_dtype {identity.kv_dtype!r} is unknown")
        digest = str(manifest["files"][BLOCKS_FILE]["sha256"])
        # "pinned" is optional: snapshots written before pins were recorded have none.
        entries = [CachedBlockEntry(bytes.fromhex(b["hash"]), bytes.fromhex(b["parent"]), _int(b["depth"]),
                                    _int(b["uses"]), _bool(b.get("pinned", False))) for b in manifest["blocks"]]
    except KeyError as e:
        raise SnapshotRefused(f"{MANIFEST_FILE}: field {e} is missing") from None
    except (TypeError, ValueError) as e:
        raise SnapshotRefused(f"{MANIFEST_FILE}: a field is malformed ({e})") from None
    return identity, entries, digest


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{value!r} is not a non-negative integer")
    return value


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{value!r} is not true or false")
    return value


def _write_synced(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
