"""The benchmark workloads are the issue's sizes, seeded, and share prefixes as they claim."""

from __future__ import annotations

from workers.bench.workloads import FIRST_TOKEN, WORKLOADS, Workload, make_workload, multi_turn, skewed

VOCAB = 32000


def _ids_in_range(w: Workload) -> bool:
    return all(FIRST_TOKEN <= t < VOCAB for p in w.prompts for t in p)


def test_shared_prefix_is_one_256_token_prefix_plus_16_to_64_own() -> None:
    w = make_workload("shared-prefix", "full", VOCAB, 16)
    assert len(w.prompts) == 64 and w.max_tokens == [64] * 64
    assert all(p[:256] == w.prompts[0][:256] for p in w.prompts)
    assert all(256 + 16 <= len(p) <= 256 + 64 for p in w.prompts)
    assert len({tuple(p[256:]) for p in w.prompts}) == 64
    assert _ids_in_range(w)
    assert w.ideal_cached_tokens() == [0] + [256] * 63


def test_distinct_lengths_and_tokens_vary_within_the_ranges() -> None:
    w = make_workload("distinct", "full", VOCAB, 16)
    assert len(w.prompts) == 64 and w.waves is None
    assert all(32 <= len(p) <= 320 for p in w.prompts)
    assert all(8 <= n <= 128 for n in w.max_tokens)
    assert len(set(w.max_tokens)) > 20 and len({len(p) for p in w.prompts}) > 20
    assert len({tuple(p[:16]) for p in w.prompts}) == 64  # no shared first block
    assert _ids_in_range(w)
    assert w.ideal_cached_tokens() == [0] * 64


def test_workloads_are_seeded() -> None:
    for name in ("shared-prefix", "distinct", "multi-turn", "skewed"):
        assert make_workload(name, "full", VOCAB, 16) == make_workload(name, "full", VOCAB, 16)


def test_skewed_mixes_hot_and_one_off_prefixes_in_waves_with_a_pool_too_small_for_all() -> None:
    w = make_workload("skewed", "full", VOCAB, 16)
    hot = [i for i in w.prefix_ids if i is not None and i < 4]
    assert len(w.prompts) == 256 and 0.4 < len(hot) / 256 < 0.6
    assert set(hot) == {0, 1, 2, 3} and hot.count(0) > hot.count(3)  # Zipf: the first is the hottest
    one_off = [i for i in w.prefix_ids if i is not None and i >= 4]
    assert len(one_off) == len(set(one_off)) == 256 - len(hot)
    assert w.waves == [list(range(s, s + 8)) for s in range(0, 256, 8)]
    assert all(128 + 8 <= len(p) <= 128 + 16 for p in w.prompts)
    prefix_blocks = (4 + len(one_off)) * 128 // 16
    assert w.num_kv_blocks is not None and w.num_kv_blocks < prefix_blocks
    assert _ids_in_range(w)


def test_skewed_pool_is_the_largest_wave_plus_spare_hot_sets() -> None:
    # 2 requests of 32 + 2..4 own + 4 new tokens: 3 blocks of 16 each; one hot prefix of 2 blocks.
    w = skewed(64, 16, num_requests=2, num_hot=1, prefix_len=32, own_len=(2, 4), new_tokens=4, wave_size=2,
               spare_hot_sets=2.0)
    assert w.num_kv_blocks == 2 * 3 + 2 * 2


def test_multi_turn_is_16_conversations_of_4_turns_submitted_turn_by_turn() -> None:
    w = make_workload("multi-turn", "full", VOCAB, 16)
    assert len(w.prompts) == 64 and w.max_tokens == [32] * 64
    assert w.waves == [list(range(t * 16, (t + 1) * 16)) for t in range(4)]  # wave t: every conversation's turn t
    turn = lambda t, c: w.prompts[t * 16 + c]  # noqa: E731
    for c in range(16):
        assert [len(turn(t, c)) for t in range(4)] == [200, 280, 360, 440]
        for t in range(1, 4):
            assert turn(t, c)[: len(turn(t - 1, c))] == turn(t - 1, c)  # the whole previous prompt, then 32 + 48 new
    assert len({tuple(turn(0, c)[:16]) for c in range(16)}) == 16  # conversations share nothing
    assert len({tuple(turn(1, c)[200:232]) for c in range(16)}) == 16  # each its own assistant tokens
    assert w.prefix_ids == [c for _ in range(4) for c in range(16)]
    assert w.ideal_cached_tokens() == [0] * 16 + [200] * 16 + [280] * 16 + [360] * 16
    assert _ids_in_range(w)


def test_multi_turn_sizes_are_arguments() -> None:
    w = multi_turn(64, num_conversations=2, num_turns=3, first_len=5, assistant_len=2, user_len=3, new_tokens=4)
    assert [len(p) for p in w.prompts] == [5, 5, 10, 10, 15, 15]
    assert w.waves == [[0, 1], [2, 3], [4, 5]] and w.max_tokens == [4] * 6
    assert w.ideal_cached_tokens() == [0, 0, 5, 5, 10, 10]


def test_every_workload_has_a_small_preset() -> None:
    for name in WORKLOADS:
        small, full = make_workload(name, "small", VOCAB, 16), make_workload(name, "full", VOCAB, 16)
        assert small.name == full.name == name
        assert 0 < small.num_prompt_tokens < full.num_prompt_tokens
