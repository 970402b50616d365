"""Loads a model (built-in `tiny` or a local Hugging Face folder) onto a device."""

from __future__ import annotations

import hashlib
import json
import logging
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

import torch

from workers.chat_template import RENDER_BUDGET_S
from workers.layers.rotary import RotaryEmbedding
from workers.models.config import ModelConfig
from workers.models.llama import LlamaForCausalLM
from workers.tiny import TINY_CONFIG, TINY_FINGERPRINT, TINY_WARNING, tiny_weights
from workers.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FOLDER_HINT = "use 'tiny' or a local Hugging Face folder with config.json, *.safetensors and tokenizer.json"


@dataclass(frozen=True, slots=True)
class LoadedModel:
    model: LlamaForCausalLM
    tokenizer: Tokenizer
    config: ModelConfig
    fingerprint: str  # identifies the weights; part of every prefix-cache hash
    max_model_len: int
    is_demo: bool


def load_model(name: str, device: torch.device, dtype: str, max_model_len: int | None, *,
               chat_template_timeout_s: float = RENDER_BUDGET_S) -> LoadedModel:
    if name == "tiny":
        log.warning(TINY_WARNING)
        cfg = ModelConfig.from_hf(TINY_CONFIG, "tiny")
        tokenizer: Tokenizer = ByteTokenizer()
        weights: Iterator[tuple[str, torch.Tensor]] = iter(tiny_weights().items())
        fingerprint, source = TINY_FINGERPRINT, "tiny"
    else:
        folder = Path(name).expanduser()
        if not folder.is_dir():
            raise ValueError(f"model {name!r}: no such folder; {FOLDER_HINT}")
        config_path = folder / "config.json"
        if not config_path.is_file():
            raise ValueError(f"{folder}: config.json is missing; {FOLDER_HINT}")
        raw = json.loads(config_path.read_text())
        cfg = ModelConfig.from_hf(raw, str(config_path))
        gen_path = folder / "generation_config.json"
        gen_eos = _as_ids(json.loads(gen_path.read_text()).get("eos_token_id")) if gen_path.is_file() else ()
        tokenizer = HFTokenizer(folder, extra_eos_ids=cfg.eos_token_ids + gen_eos,
                                chat_template_budget_s=chat_template_timeout_s)
        files = safetensors_files(folder)
        fingerprint = fingerprint_folder(config_path, files)
        weights = iter_safetensors(files)
        source = str(folder)

    max_len = resolve_max_model_len(cfg, max_model_len, source)
    model = build_model(cfg, max_len, device, DTYPES[dtype])
    model.load_weights(weights, source)
    model.eval()
    return LoadedModel(model, tokenizer, cfg, fingerprint, max_len, is_demo=name == "tiny")


def resolve_max_model_len(cfg: ModelConfig, requested: int | None, source: str) -> int:
    # A sliding window caps the context we serve: within it, full attention is exact.
    limit = min(cfg.max_position_embeddings, cfg.sliding_window or cfg.max_position_embeddings)
    if requested is None:
        return limit
    if requested > limit:
        raise ValueError(f"max_model_len={requested} exceeds what {source} supports ({limit}); lower it or leave it None")
    return requested


def build_model(cfg: ModelConfig, max_len: int, device: torch.device, dtype: torch.dtype) -> LlamaForCausalLM:
    # Built on the meta device and then given empty storage: no time spent on a random init that
    # the checkpoint overwrites. The rotary tables are the one thing not in the checkpoint.
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg, max_len)
    model = model.to(dtype).to_empty(device=device)
    model.tie_weights()
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.build_tables(device)
    return model


def safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(_shard_names(index)))
        files = [folder / n for n in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ValueError(f"{folder}: shards listed in model.safetensors.index.json are missing: {', '.join(missing)}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{folder}: no *.safetensors weights (pickled .bin checkpoints are not loaded); {FOLDER_HINT}")
    return files


def _shard_names(index: Path) -> list[str]:
    """The shard file names `index` lists, each checked to name a file inside its folder: the index
    is data, and a name such as `../../secret` or `/etc/passwd` must not make us open what it names.
    The check is on the name only (no symlink is resolved): a Hugging Face cache folder's shards are
    symlinks into its blob store, outside the folder, and are fine."""
    raw = json.loads(index.read_text())
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index}: 'weight_map' must map weight names to shard file names; re-save the checkpoint")
    names = list(weight_map.values())
    for name in names:
        if not _inside_folder(name):
            raise ValueError(f"{index}: shard name {json.dumps(name)} is not a file name inside the model folder; "
                             "each shard must be a file of that folder, such as 'model-00001-of-00002.safetensors'")
    return names


def _inside_folder(name: object) -> bool:
    if not isinstance(name, str) or not name or "\x00" in name or "\\" in name or PureWindowsPath(name).drive:
        return False
    path = PurePosixPath(name)
    return not path.is_absolute() and ".." not in path.parts and bool(path.parts)


def iter_safetensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)


def fingerprint_folder(config_path: Path, files: list[Path]) -> str:
    """sha256 of config.json, each shard's header (names, shapes, dtypes, offsets), size and first
    MiB of data: it tells checkpoints apart without reading gigabytes at every start."""
    h = hashlib.sha256(config_path.read_bytes())
    for path in files:
        with path.open("rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            h.update(path.name.encode())
            h.update(str(path.stat().st_size).encode())
            h.update(f.read(header_len))
            h.update(f.read(1 << 20))
    return h.hexdigest()


def _as_ids(value: object) -> tuple[int, ...]:
    if isinstance(value, list):
        return tuple(int(v) for v in value)
    return () if value is None else (int(value),)
