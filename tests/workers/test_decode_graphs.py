"""The parts of CUDA-graph decoding that need no GPU and no Triton interpreter: the recorded batch
sizes, the scratch block's bounds, and the fallback when recording fails. The static inputs and
their padding run in `test_triton_backend.py` (under the interpreter), the recording itself only
on a GPU (`python -m workers.bench.gpu_check`)."""

from __future__ import annotations

import pytest
import torch

from workers import EngineConfig, LLMEngine
from workers.attention.triton_backend import TritonBackend
from workers.decode_graphs import StaticDecode, capture_sizes, make_static_decode


def test_capture_sizes() -> None:
    assert capture_sizes(1) == [1]
    assert capture_sizes(3) == [1, 2, 4]
    assert capture_sizes(9) == [1, 2, 4, 8, 16]
    assert capture_sizes(256) == [1, 2, 4, *range(8, 257, 8)]
    assert capture_sizes(10_000)[-1] == 512  # larger decode steps run eagerly


@pytest.fixture(scope="module")
def parts():
    engine = LLMEngine(EngineConfig(dtype="float32", attention_backend="reference", num_kv_blocks=16, max_num_seqs=6))
    cfg = engine.loaded.config
    backend = TritonBackend(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
    cache = backend.make_cache(cfg.num_layers, 17, 16, torch.float32, torch.device("cpu"), "auto")
    return engine.loaded.model, backend, cache


def test_buffers_hold_the_largest_size_and_the_longest_table(parts) -> None:
    static = make_static_decode(*parts, scratch_block=16, max_num_seqs=6, max_blocks_per_seq=5, record=False)
    assert static.sizes == [1, 2, 4, 8] and static.max_size == 8
    assert static.fits(8, 8) and not static.fits(9, 9) and not static.fits(3, 2)  # a prefill chunk: eager
    assert tuple(static.tokens.shape) == (3, 8) and static.meta.numel() == 8 + 8 * 5
    assert static.scratch_slot == 16 * 16


def test_scratch_block_must_lie_in_the_cache(parts) -> None:
    with pytest.raises(ValueError, match="scratch block 17 is outside the cache's 17 blocks"):
        StaticDecode(*parts, scratch_block=17, max_num_seqs=6, max_blocks_per_seq=5, record=False)


def test_a_failed_recording_warns_and_leaves_decode_eager(parts, monkeypatch) -> None:
    def fail(self) -> None:
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(StaticDecode, "_record", fail)
    with pytest.warns(RuntimeWarning, match=r"^CUDA graphs could not be recorded \(RuntimeError: operation not "
                                            r"permitted when stream is capturing\); decode steps launch"):
        assert make_static_decode(*parts, scratch_block=16, max_num_seqs=6, max_blocks_per_seq=5, record=True) is None
