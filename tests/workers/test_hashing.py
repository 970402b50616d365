"""Chained block hashes: exact digests, what changes them, and incremental extension."""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import sys
from pathlib import Path

from workers.hashing import hash_block_tokens, hash_full_blocks, root_hash

REPO_ROOT = Path(__file__).resolve().parents[2]

# Pinned digests: a change of encoding (separators, byte order, hash function) breaks every KV
# snapshot on disk, so it must show up here.
ROOT_TINY = "8ee8e8061713138b20d1e25dda26e9f1547e0e8796e24168805a61f3fdd42ef7"
ROOT_TINY_SALTED = "f13e46f01a012f0ec71ba2787a759dda838f3a32707662e9bf4368f9cee34925"
BLOCK_1234 = "cb97bc50d2934bf577d0d156e051063b54a50007e5a04f23fb959320c15c04da"


def test_root_hash_is_pinned() -> None:
    assert root_hash("tiny", None).hex() == ROOT_TINY
    assert root_hash("tiny", "tenant-a").hex() == ROOT_TINY_SALTED


def test_block_hash_is_pinned() -> None:
    assert hash_block_tokens(root_hash("tiny", None), [1, 2, 3, 4]).hex() == BLOCK_1234


def test_block_hash_encoding_is_sha256_of_parent_and_le_uint32() -> None:
    parent = bytes(range(32))
    expected = hashlib.sha256(parent + struct.pack("<3I", 7, 256, 2**32 - 1)).digest()
    assert hash_block_tokens(parent, [7, 256, 2**32 - 1]) == expected


def test_empty_salt_is_no_salt() -> None:
    assert root_hash("tiny", "") == root_hash("tiny", None)


def test_hash_depends_on_parent_salt_model_and_order() -> None:
    root = root_hash("tiny", None)
    tokens = [1, 2, 3, 4]
    base = hash_block_tokens(root, tokens)
    variants = {
        "parent": hash_block_tokens(base, tokens),
        "salt": hash_block_tokens(root_hash("tiny", "tenant-a"), tokens),
        "model": hash_block_tokens(root_hash("other-model", None), tokens),
        "order": hash_block_tokens(root, [2, 1, 3, 4]),
        "value": hash_block_tokens(root, [1, 2, 3, 5]),
    }
    assert all(h != base for h in variants.values())
    assert len(set(variants.values())) == len(variants)


def test_model_and_salt_fields_do_not_run_together() -> None:
    # "ab" + salt "c" must not equal "a" + salt "bc": the separator keeps the fields apart.
    assert root_hash("ab", "c") != root_hash("a", "bc")


def test_hash_full_blocks_hashes_only_full_blocks() -> None:
    root = root_hash("tiny", None)
    tokens = list(range(10))
    hashes = hash_full_blocks(root, tokens, 4, [])
    first = hash_block_tokens(root, [0, 1, 2, 3])
    second = hash_block_tokens(first, [4, 5, 6, 7])
    assert hashes == [first, second]  # tokens 8 and 9 fill no block
    assert hash_full_blocks(root, tokens[:3], 4, []) == []
    assert hash_full_blocks(root, tokens[:8], 4, []) == [first, second]


def test_hash_full_blocks_extends_known_in_place() -> None:
    root = root_hash("tiny", None)
    tokens = list(range(13))
    known: list[bytes] = []
    out = hash_full_blocks(root, tokens[:5], 4, known)
    assert out is known
    assert len(known) == 1
    first = known[0]
    assert hash_full_blocks(root, tokens, 4, known) is known
    assert known == hash_full_blocks(root, tokens, 4, [])
    assert len(known) == 3
    assert known[0] is first  # the existing entry was kept, not recomputed
    # Nothing new to hash: the list is returned unchanged.
    assert hash_full_blocks(root, tokens, 4, known) == known
    assert len(known) == 3


def test_hash_full_blocks_continues_from_the_last_known_hash() -> None:
    # The incremental path chains from known[-1], not from the root: a fake known hash shows it.
    root = root_hash("tiny", None)
    fake = b"\x01" * 32
    assert hash_full_blocks(root, list(range(8)), 4, [fake]) == [fake, hash_block_tokens(fake, [4, 5, 6, 7])]


def test_digest_is_the_same_in_another_process_with_another_hash_seed() -> None:
    code = (
        "from workers.hashing import hash_block_tokens, root_hash;"
        "print(hash_block_tokens(root_hash('tiny', None), [1, 2, 3, 4]).hex())"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == BLOCK_1234
