"""Loading models: what goes wrong says what to do."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from workers import EngineConfig, LLMEngine, SamplingParams
from workers.tiny import TINY_WARNING


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_folder(tmp_path):
    with pytest.raises(ValueError, match="no such folder; use 'tiny' or a local Hugging Face folder"):
        LLMEngine(EngineConfig(model=str(tmp_path / "nope")))


def test_missing_config(tmp_path):
    with pytest.raises(ValueError, match="config.json is missing"):
        LLMEngine(EngineConfig(model=str(tmp_path)))


def test_unsupported_architecture(tmp_path, hf_model_dirs):
    folder = _copy(hf_model_dirs("llama")[0], tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"architecture \['GPT2LMHeadModel'\] is not supported; supported: LlamaForCausalLM"):
        LLMEngine(EngineConfig(model=str(folder)))


def test_missing_weights_and_tokenizer(tmp_path, hf_model_dirs):
    folder = _copy(hf_model_dirs("llama")[0], tmp_path / "m")
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="tokenizer.json is missing"):
        LLMEngine(EngineConfig(model=str(folder)))
    folder2 = _copy(hf_model_dirs("llama")[0], tmp_path / "m2")
    (folder2 / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"no \*.safetensors weights \(pickled .bin checkpoints are not loaded\)"):
        LLMEngine(EngineConfig(model=str(folder2)))


def test_wrong_shape_is_named(tmp_path, hf_model_dirs):
    folder = _copy(hf_model_dirs("llama")[0], tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"weight 'model.layers.0.mlp.down_proj.weight' has shape \(64, 160\), expected \(64, 96\)"):
        LLMEngine(EngineConfig(model=str(folder)))


def test_sharded_checkpoint_loads_the_same_model(tmp_path, hf_model_dirs):
    folder, hf = hf_model_dirs("qwen2")
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="100KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(folder / name, sharded / name)
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    prompt = [[5, 9, 300, 41, 7]]
    one = LLMEngine(EngineConfig(model=str(folder), num_kv_blocks=32)).next_token_logits(prompt)[0]
    many = LLMEngine(EngineConfig(model=str(sharded), num_kv_blocks=32)).next_token_logits(prompt)[0]
    assert torch.equal(one, many)


@pytest.mark.parametrize("outside", ["../{name}", "{folder}/../{name}", "sub/../../{name}"])
def test_shard_names_that_leave_the_folder_are_refused(tmp_path, hf_model_dirs, outside):
    """The index is data: a shard name must not make the loader open a file outside the folder."""
    folder, hf = hf_model_dirs("qwen2")
    sharded = tmp_path / "models" / "sharded"
    hf.save_pretrained(sharded, max_shard_size="100KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(folder / name, sharded / name)
    index_path = sharded / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    shutil.move(sharded / first, tmp_path / "models" / first)  # a real shard, outside the folder
    bad = outside.format(folder=sharded, name=first)
    index["weight_map"] = {k: bad if v == first else v for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"model.safetensors.index.json: shard name \".*\" is not a file name "
                                         r"inside the model folder"):
        LLMEngine(EngineConfig(model=str(sharded), num_kv_blocks=32))


def test_max_model_len_beyond_the_model_is_refused(hf_model_dirs):
    folder, _ = hf_model_dirs("llama")
    with pytest.raises(ValueError, match=r"max_model_len=4096 exceeds what .* supports \(1024\)"):
        LLMEngine(EngineConfig(model=str(folder), max_model_len=4096))


def test_chat_template_of_the_folder_is_used(hf_model_dirs):
    engine = LLMEngine(EngineConfig(model=str(hf_model_dirs("llama")[0]), num_kv_blocks=32))
    text = engine.tokenizer.render_chat([{"role": "user", "content": "w5 w6"}])
    assert text == "user: w5 w6 assistant:"
    assert engine.tokenizer.encode_chat([{"role": "user", "content": "w5 w6"}]) == [0, 5, 6, 0]


def test_tiny_model_is_deterministic_and_says_it_is_a_demo(caplog):
    with caplog.at_level("WARNING"):
        a = LLMEngine(EngineConfig(num_kv_blocks=32))
    assert TINY_WARNING in caplog.text
    b = LLMEngine(EngineConfig(num_kv_blocks=32))
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    assert a.generate(["hello"], params)[0].token_ids == b.generate(["hello"], params)[0].token_ids
    assert a.loaded.is_demo
