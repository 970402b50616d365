"""KV snapshots: a round trip gives a fresh engine the same cached prefixes (identical greedy
outputs, cached tokens on its first request); a bad snapshot is refused with one line and the
engine stays cold and working."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from workers import EngineConfig, LLMEngine, SamplingParams
from workers import persistence
from workers.persistence import SnapshotRefused

GREEDY = SamplingParams(max_tokens=12, ignore_eos=True)


def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(11)
    prefix = torch.randint(0, 256, (53,), generator=gen).tolist()  # 3 full blocks of 16 and 5 tokens
    return [prefix + torch.randint(0, 256, (n,), generator=gen).tolist() for n in (4, 19, 30)]


def engine(dtype: str = "float32", kv: str = "auto", backend: str = "reference", **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(dtype=dtype, kv_cache_dtype=kv, attention_backend=backend,
                                  num_kv_blocks=kw.pop("num_kv_blocks", 64), **kw))


def snapshot_of(source: LLMEngine, folder: Path, **kw) -> Path:
    return persistence.write(persistence.capture(source, kw.pop("max_blocks", None)), folder, **kw)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize(("dtype", "kv"), [("float32", "auto"), ("bfloat16", "auto"), ("float32", "int8")])
def test_round_trip_gives_identical_outputs_and_cache_hits(tmp_path, backend, dtype, kv):
    source = engine(dtype, kv, backend)
    cold = [o.token_ids for o in source.generate(prompts(), GREEDY)]
    warm_here = source.generate(prompts(), GREEDY)  # served from the source's own cache
    snapshot_of(source, tmp_path)

    fresh = engine(dtype, kv, backend)
    loaded, refused = persistence.load_newest(fresh, tmp_path)
    assert refused == []
    assert loaded.num_blocks == loaded.num_imported == source.kv_manager.pool.num_cached_blocks
    first = fresh.generate([prompts()[0]], GREEDY)[0]
    assert first.num_cached_tokens == 48  # the 3 shared full blocks (the 4th is capped one token short)
    rest = fresh.generate(prompts()[1:], GREEDY)
    assert [first.token_ids] + [o.token_ids for o in rest] == [o.token_ids for o in warm_here]
    assert [o.num_cached_tokens for o in rest] == [o.num_cached_tokens for o in warm_here[1:]]
    if dtype == "float32" and kv == "auto":
        assert [o.token_ids for o in warm_here] == cold


@pytest.mark.parametrize(("dtype", "kv", "source_backend", "target_backend"), [
    ("float32", "auto", "reference", "cpu"), ("float32", "auto", "cpu", "reference"),
    ("float32", "int8", "cpu", "reference"), ("bfloat16", "auto", "cpu", "reference"),
    ("bfloat16", "auto", "reference", "cpu"),
])
def test_a_snapshot_moves_between_attention_backends(tmp_path, dtype, kv, source_backend, target_backend):
    # The file's layout is the backend-neutral one: the cpu backend's transposed keys (or, in
    # bfloat16 on a CPU with AMX, its keys and values stored in pairs) come back as rows.
    source = engine(dtype, kv, source_backend)
    source.generate(prompts(), GREEDY)
    snapshot_of(source, tmp_path)
    fresh = engine(dtype, kv, target_backend)
    persistence.load_newest(fresh, tmp_path)
    reference = engine(dtype, kv, target_backend).generate(prompts(), GREEDY)
    restored = fresh.generate(prompts(), GREEDY)
    assert restored[0].num_cached_tokens == 48
    if kv == "auto" and dtype == "float32":
        assert [o.token_ids for o in restored] == [o.token_ids for o in reference]
    # The blocks themselves are equal, in the layout each backend reads.
    ids = [fresh.kv_manager.pool.get_cached_block(e.block_hash).block_id
           for e in persistence.capture(source).entries]
    theirs = persistence.capture(source)
    mine, _ = fresh.kv_cache.export_blocks(ids)
    assert torch.equal(mine, theirs.kv)


def cold_and_working(target: LLMEngine) -> None:
    assert target.kv_manager.pool.num_cached_blocks == 0
    expected = engine().generate(prompts(), GREEDY)
    out = target.generate(prompts(), GREEDY)
    assert out[0].num_cached_tokens == 0
    assert [o.token_ids for o in out] == [o.token_ids for o in expected]


def refusal(tmp_path: Path, target: LLMEngine) -> str:
    loaded, refused = persistence.load_newest(target, tmp_path)
    assert loaded is None and len(refused) == 1 and "\n" not in refused[0]
    return refused[0]


@pytest.fixture
def written(tmp_path) -> Path:
    source = engine()
    source.generate(prompts(), GREEDY)
    return snapshot_of(source, tmp_path)


def test_another_block_size_is_refused(tmp_path, written):
    target = engine(block_size=8)
    assert "block_size 16, this engine has 8" in refusal(tmp_path, target)
    assert target.kv_manager.pool.num_cached_blocks == 0
    assert target.generate(prompts(), GREEDY)[0].num_cached_tokens == 0


def test_another_dtype_is_refused(tmp_path, written):
    assert "kv_dtype 'float32', this engine has 'bfloat16'" in refusal(tmp_path, engine("bfloat16"))
    assert "kv_dtype 'float32', this engine has 'int8'" in refusal(tmp_path, engine(kv="int8"))


def test_another_model_is_refused(tmp_path, written):
    manifest = json.loads((written / "manifest.json").read_text())
    manifest["model_fingerprint"] = "some-other-model"
    (written / "manifest.json").write_text(json.dumps(manifest))
    target = engine()
    line = refusal(tmp_path, target)
    assert line.startswith(f"KV snapshot {written} refused: it was made with model_fingerprint 'some-other-model'")
    assert line.endswith("starting without it")
    cold_and_working(target)


def test_a_corrupted_blocks_file_is_refused(tmp_path, written):
    blocks = written / "blocks.safetensors"
    data = bytearray(blocks.read_bytes())
    data[-100] ^= 0xFF
    blocks.write_bytes(bytes(data))
    target = engine()
    assert "does not match its checksum" in refusal(tmp_path, target)
    cold_and_working(target)


@pytest.mark.parametrize(("manifest_text", "message"), [
    ("{not json", "manifest.json cannot be read (JSONDecodeError"),
    ('{"format": "something else"}', "is not a KV snapshot manifest"),
    (None, "manifest.json is missing"),
])
def test_a_broken_manifest_is_refused(tmp_path, written, manifest_text, message):
    if manifest_text is None:
        (written / "manifest.json").unlink()
    else:
        (written / "manifest.json").write_text(manifest_text)
    target = engine()
    assert message in refusal(tmp_path, target)
    cold_and_working(target)


def test_a_manifest_missing_a_field_is_refused(tmp_path, written):
    manifest = json.loads((written / "manifest.json").read_text())
    del manifest["blocks"][0]["parent"]
    (written / "manifest.json").write_text(json.dumps(manifest))
    assert "manifest.json: field 'parent' is missing" in refusal(tmp_path, engine())


def test_tensors_that_do_not_fit_the_manifest_are_refused(tmp_path, written):
    manifest = json.loads((written / "manifest.json").read_text())
    manifest["blocks"] = manifest["blocks"][:-1]  # one row more in the file than blocks listed
    (written / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SnapshotRefused, match=r"tensor 'kv' is not \["):
        persistence.read(written, engine().cache_identity())


def test_the_newest_valid_snapshot_is_loaded_and_old_ones_are_pruned(tmp_path):
    source = engine()
    source.generate(prompts()[:1], GREEDY)
    older = snapshot_of(source, tmp_path, keep=2)
    source.generate(prompts(), GREEDY)
    newer = snapshot_of(source, tmp_path, keep=2)
    assert persistence.list_snapshots(tmp_path) == [newer, older]
    (newer / "blocks.safetensors").write_bytes(b"garbage")
    target = engine()
    loaded, refused = persistence.load_newest(target, tmp_path)
    assert loaded.path == older and len(refused) == 1 and str(newer) in refused[0]
    newest = snapshot_of(source, tmp_path, keep=2)
    assert persistence.list_snapshots(tmp_path) == [newest, newer]


def test_a_crashed_write_leaves_nothing_that_loads(tmp_path, written):
    partial = tmp_path / ".snapshot-20260101T000000000000Z.partial"
    partial.mkdir()
    (partial / "blocks.safetensors").write_bytes(b"half")
    assert persistence.list_snapshots(tmp_path) == [written]
    snapshot_of(engine(), tmp_path)
    assert not partial.exists()


def test_max_blocks_keeps_the_hottest_whole_chains(tmp_path):
    source = engine()
    source.generate(prompts(), GREEDY)
    snapshot = persistence.capture(source, max_blocks=4)
    depths = [e.depth for e in snapshot.entries]
    assert len(depths) == 4 and depths[:3] == [0, 1, 2]  # the shared prefix first, parents first
    hashes = {e.block_hash for e in snapshot.entries}
    assert all(e.depth == 0 or e.parent_hash in hashes for e in snapshot.entries)


def test_a_smaller_pool_takes_what_fits_without_evicting(tmp_path, written):
    target = engine(num_kv_blocks=6)
    loaded, _ = persistence.load_newest(target, tmp_path)
    assert loaded.num_imported == 6 and loaded.num_blocks > 6
    assert target.kv_manager.pool.num_evictions == 0
    assert target.generate([prompts()[0]], GREEDY)[0].num_cached_tokens == 48


def test_pinned_blocks_survive_a_scrub_with_their_contents(tmp_path):
    target = engine(num_kv_blocks=32)
    pinned = target.pin([prompts()[0]])
    assert len(pinned) == 3
    before, _ = target.kv_cache.export_blocks(pinned)
    target.generate(prompts()[1:], GREEDY)
    target.scrub_kv_cache()
    after, _ = target.kv_cache.export_blocks(pinned)
    assert torch.equal(before, after)
    assert target.kv_manager.pool.num_cached_blocks == 3
    assert target.generate([prompts()[1]], GREEDY)[0].num_cached_tokens == 48


def test_pins_come_back_with_the_snapshot(tmp_path):
    source = engine(num_kv_blocks=32)
    source.pin([prompts()[0]])  # 3 full blocks pinned
    source.generate(prompts()[1:], GREEDY)  # more cached blocks, not pinned
    written = snapshot_of(source, tmp_path)
    recorded = json.loads((written / "manifest.json").read_text())["blocks"]
    assert sum(b["pinned"] for b in recorded) == 3 and len(recorded) > 3

    target = engine(num_kv_blocks=32)
    loaded, _ = persistence.load_newest(target, tmp_path)
    pool = target.kv_manager.pool
    assert (loaded.num_pinned, loaded.pin_refused) == (3, None)
    assert pool.pinned_block_ids == sorted(pool.get_cached_block(h).block_id
                                             for h in target.prompt_block_hashes([prompts()[0]]))
    assert pool.num_free_blocks == 32 - 3  # pinned blocks are not free; the other imported ones are
    target.reset_prefix_cache()
    assert target.generate([prompts()[0]], GREEDY)[0].num_cached_tokens == 48  # only the pins survived


def test_pins_over_the_limit_are_not_restored_but_the_blocks_are(tmp_path):
    source = engine(num_kv_blocks=32)
    source.pin([prompts()[0]])
    snapshot_of(source, tmp_path)
    target = engine(num_kv_blocks=32, max_pinned_fraction=0.05)  # at most 1 pinned block
    loaded, _ = persistence.load_newest(target, tmp_path)
    assert loaded.num_imported == 3 and loaded.num_pinned == 0
    assert loaded.pin_refused.startswith("pinning 3 more blocks would pin 3 of 32")
    assert target.kv_manager.pool.num_pinned_blocks == 0


def test_a_snapshot_without_pin_flags_loads_unpinned(tmp_path, written):
    manifest = json.loads((written / "manifest.json").read_text())
    for block in manifest["blocks"]:
        del block["pinned"]
    (written / "manifest.json").write_text(json.dumps(manifest))
    target = engine()
    loaded, refused = persistence.load_newest(target, tmp_path)
    assert refused == [] and loaded.num_imported == loaded.num_blocks and loaded.num_pinned == 0
