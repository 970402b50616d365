"""A worker's KV cache across restarts and on command: its snapshot folder, the snapshot loaded at
start, the prompts warmed and pinned at start, checkpoints (beat's and SIGTERM's), and what the
`cache_*` remote-control commands (`pipeline.celery_app`) do in the worker.

Every engine touch goes through the engine loop (`EngineLoop.call`, or requests it batches with
the chunks' requests): the engine is not thread-safe, and control commands arrive on Celery's
consumer thread. Warming requests are ordinary requests, so they never disturb a running chunk.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import InputError
from pipeline.request_spec import LineError, RequestSpec

if TYPE_CHECKING:
    from pipeline.settings import Settings
    from workers.engine_loop import EngineLoop
    from workers.tokenizer import Tokenizer

log = logging.getLogger(__name__)

WarmPrompt = dict[str, Any]  # {"prompt": str}, {"messages": [{"role", "content"}, ...]} or {"common_prefix_of": [2]}
_node: str | None = None
_persist_lock = threading.Lock()  # one snapshot write at a time (beat's and SIGTERM's may meet)


def snapshot_dir(cache_dir: Path, node: str) -> Path:
    """This worker's own snapshot folder: several workers on one host never share files."""
    return cache_dir / re.sub(r"[^A-Za-z0-9_.@-]", "_", node)


def start(settings: Settings, loop: EngineLoop, node: str) -> list[str]:
    """At worker start: load the newest valid snapshot (`kv_snapshot_on_start`), then warm and pin
    the settings' prompt files. Returns what happened, one line each, for the worker's log (which
    Celery has not set up yet). A refused snapshot is one such line and a cold start; a bad prompt
    file raises InputError or ValueError (the worker stops with one line)."""
    global _node
    _node = node
    lines: list[str] = []
    if settings.kv_snapshot_on_start:
        from workers import persistence

        folder = snapshot_dir(settings.cache_dir, node)
        try:
            loaded, refused = persistence.load_first(loop.engine, candidate_snapshots(settings.cache_dir, folder),
                                                     run_on_engine=loop.call)
        except OSError as e:  # an unreadable cache_dir: a cold start, never a failed one
            loaded, refused = None, [f"KV snapshots under {settings.cache_dir} cannot be read ({e}); starting cold"]
        lines += refused
        if loaded is not None:
            pins = f", {loaded.num_pinned} pinned again" if loaded.num_pinned else ""
            if loaded.pin_refused:
                pins = f"; its pins were not restored ({loaded.pin_refused})"
            lines.append(f"KV snapshot {loaded.path} loaded: {loaded.num_imported} of its {loaded.num_blocks} "
                         f"blocks cached in {loaded.seconds:.3f} s{pins}")
        else:
            lines.append(f"no KV snapshot to load in {folder}; starting cold")
    if settings.kv_warm_file or settings.kv_pin_file:
        salt = tenant_cache_salt(settings, settings.kv_warm_tenant)
    if settings.kv_warm_file:
        lines.append(f"warmed {settings.kv_warm_file}: {warm(loop, read_prompts(settings.kv_warm_file), salt)}")
    if settings.kv_pin_file:
        outcome = pin(loop, read_prompts(settings.kv_pin_file), salt)
        if "error" in outcome:
            raise ValueError(f"kv_pin_file {settings.kv_pin_file}: {outcome['error']}")
        lines.append(f"pinned {settings.kv_pin_file}: {outcome}")
    return lines


def candidate_snapshots(cache_dir: Path, own: Path) -> list[Path]:
    """Snapshots to try at start: this node's own, newest first, then the other nodes' under
    `cache_dir`, newest first. A container redeployed under a new host name (docker compose's
    scaled workers are named after their container) finds no folder of its own; a sibling's
    snapshot of the same model warms it just as well (reading it changes nothing of theirs)."""
    from workers import persistence

    others = [p for d in (sorted(cache_dir.iterdir()) if cache_dir.is_dir() else []) if d.is_dir() and d != own
              for p in persistence.list_snapshots(d)]
    return persistence.list_snapshots(own) + sorted(others, key=lambda p: p.name, reverse=True)


def read_prompts(path: str | Path) -> list[WarmPrompt]:
    """The prompts of a JSONL (or Parquet) request file, as warm/pin messages carry them. Any bad
    line refuses the whole file (InputError naming the line): a half-warmed cache is a surprise."""
    from pipeline.input_reader import read_requests

    prompts: list[WarmPrompt] = []
    for item in read_requests(path):
        if isinstance(item, LineError):
            raise InputError(path, f"line {item.line}: {item.message}; fix the line (the file is not used)")
        prompts.append(prompt_of(item))
    return prompts


def prompt_of(spec: RequestSpec) -> WarmPrompt:
    if spec.messages is not None:
        return {"messages": [dict(m) for m in spec.messages]}
    return {"prompt": spec.prompt}


def prompt_tokens(prompt: WarmPrompt, tokenizer: Tokenizer) -> list[int]:
    """The token ids a request with this prompt would run (chat through the model's template); for
    `{"common_prefix_of": [a, b]}` (`pipeline.job_prefixes`), the ids the two prompts start with."""
    if isinstance(prompt.get("common_prefix_of"), list) and len(prompt["common_prefix_of"]) == 2:
        first, second = (prompt_tokens(p, tokenizer) for p in prompt["common_prefix_of"])
        return os.path.commonprefix([first, second])
    if isinstance(prompt.get("messages"), list):
        return tokenizer.encode_chat([{"role": m["role"], "content": m["content"]} for m in prompt["messages"]])
    if isinstance(prompt.get("prompt"), str):
        return tokenizer.encode(prompt["prompt"])
    raise ValueError("a warm prompt is {'prompt': text}, {'messages': [...]} or {'common_prefix_of': [two of those]}")


def tenant_cache_salt(settings: Settings, tenant: str) -> str:
    """The cache salt of the tenant named `tenant`: warmed and pinned blocks are hashed under it, as
    that tenant's requests are, so they are hits for its jobs and for no other tenant's. The default
    tenant is created on first use, as `submit` does; another unknown name is a ValueError."""
    from db.repository.tenants import DEFAULT_TENANT, ensure_tenant, get_tenant
    from jobs.process_state import worker_sessions

    with worker_sessions(settings.database_url).begin() as session:
        found = ensure_tenant(session, tenant) if tenant == DEFAULT_TENANT else get_tenant(session, tenant)
        if found is None:
            raise ValueError(f"no tenant {tenant!r}; `pipeline tenant list` shows them")
        return found.cache_salt


def warm(loop: EngineLoop, prompts: list[WarmPrompt], cache_salt: str) -> dict[str, Any]:
    """Prefills `prompts` under `cache_salt` beside whatever runs; their full blocks end up cached."""
    return _warm(loop, prompts, cache_salt)[0]


def _warm(loop: EngineLoop, prompts: list[WarmPrompt], cache_salt: str) -> tuple[dict[str, Any], list[bytes]]:
    from workers.engine import WARM_PARAMS

    tokens = [prompt_tokens(p, loop.engine.tokenizer) for p in prompts]
    results = loop.generate(tokens, [WARM_PARAMS] * len(tokens), cache_salt)
    ok = [t for t, r in zip(tokens, results) if not isinstance(r, Exception)]
    failed = [str(r) for r in results if isinstance(r, Exception)]
    hashes = loop.call(lambda e: e.prompt_block_hashes(ok, cache_salt))
    cached = loop.call(lambda e: sum(1 for h in hashes if e.kv_manager.pool.get_cached_block(h) is not None))
    return {"prompts": len(prompts), "failed": len(failed), "first_error": failed[0] if failed else None,
            "blocks": len(hashes), "cached_blocks": cached}, hashes


def pin(loop: EngineLoop, prompts: list[WarmPrompt], cache_salt: str) -> dict[str, Any]:
    """Warms `prompts` under `cache_salt`, then pins their full blocks; over the pin limit nothing
    is pinned and the answer carries the error."""
    outcome, hashes = _warm(loop, prompts, cache_salt)
    try:
        pinned = loop.call(lambda e: e.kv_manager.pool.pin(hashes))
    except ValueError as e:
        return {**outcome, "error": str(e)}
    return {**outcome, "pinned_blocks": len(pinned), "num_pinned_blocks": loop.call(
        lambda e: e.kv_manager.pool.num_pinned_blocks)}


def unpin(loop: EngineLoop, prompts: list[WarmPrompt] | None, cache_salt: str | None) -> dict[str, Any]:
    """Unpins the full blocks of `prompts` (pinned under `cache_salt`), or every pinned block when
    `prompts` is None."""
    tokens = None if prompts is None else [prompt_tokens(p, loop.engine.tokenizer) for p in prompts]
    unpinned = loop.call(lambda e: e.unpin(tokens, cache_salt))
    return {"unpinned_blocks": len(unpinned), "num_pinned_blocks": loop.call(
        lambda e: e.kv_manager.pool.num_pinned_blocks)}


def clear(loop: EngineLoop, *, unpin_all: bool = False) -> dict[str, Any]:
    """Drops every cached block no request holds (pinned ones too with `unpin_all`)."""
    def work(engine) -> int:
        if unpin_all:
            engine.unpin()
        return engine.reset_prefix_cache()

    return {"dropped_blocks": loop.call(work), **loop.call(lambda e: e.cache_stats())}


def stats(settings: Settings, loop: EngineLoop) -> dict[str, Any]:
    from workers import persistence

    folder = snapshot_dir(settings.cache_dir, _node or "worker")
    newest = persistence.list_snapshots(folder)
    return {**loop.call(lambda e: e.cache_stats()), "snapshot_dir": str(folder),
            "newest_snapshot": str(newest[0]) if newest else None}


def persist(settings: Settings, loop: EngineLoop) -> dict[str, Any]:
    """Writes a snapshot of this worker's hottest cached blocks into its own folder."""
    from workers import persistence

    with _persist_lock:
        started = time.perf_counter()
        snapshot = loop.call(lambda e: persistence.capture(e, settings.kv_snapshot_max_blocks))
        captured = time.perf_counter() - started
        path = persistence.write(snapshot, snapshot_dir(settings.cache_dir, _node or "worker"),
                                 keep=settings.kv_snapshots_keep)
        seconds = time.perf_counter() - started
    log.info("KV snapshot %s written: %d blocks in %.3f s (%.3f s on the engine)", path, len(snapshot.entries),
             seconds, captured)
    return {"path": str(path), "num_blocks": len(snapshot.entries), "seconds": round(seconds, 3)}
