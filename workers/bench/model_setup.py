"""The benchmark model: a seeded random-weight Llama built with `transformers`, saved to a folder
our loader reads (config.json, safetensors, a word-level tokenizer.json)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

PAD_ID, EOS_ID, BOS_ID = 0, 1, 2


@dataclass(frozen=True, slots=True)
class ModelShape:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int = 2048


# The shape: a small Llama whose matmuls are big enough that kernels, not Python, dominate.
FULL_SHAPE = ModelShape(32000, 512, 1408, 8, 8, 2)
# head_dim 32: the smallest vLLM's CPU attention takes (32, 64, 80, ...), so the smoke run can use it as a peer.
SMALL_SHAPE = ModelShape(512, 128, 320, 2, 4, 2, max_position_embeddings=512)
SHAPES = {"full": FULL_SHAPE, "small": SMALL_SHAPE}


BENCH_INIT_RANGE = 0.1
DEFAULT_INIT_RANGE = 0.02  # transformers' own default


def build_model(shape: ModelShape, folder: Path, seed: int = 0, initializer_range: float = BENCH_INIT_RANGE) -> Any:
    """Builds the `transformers` LlamaForCausalLM (eval, float32) with seeded weights, saves it and
    its tokenizer into `folder`, and returns it. The benchmark's `initializer_range` 0.1 spreads the
    logits enough that float32 rounding cannot flip a greedy choice between two implementations; it
    also makes attention nearly one-hot, which no trained model does, so KV quantization is measured
    at the default 0.02 as well."""
    import transformers as tf

    config = tf.LlamaConfig(
        **asdict(shape), initializer_range=initializer_range, tie_word_embeddings=False,
        pad_token_id=PAD_ID, eos_token_id=EOS_ID, bos_token_id=BOS_ID,
    )
    torch.manual_seed(seed)
    model = tf.LlamaForCausalLM(config).to(torch.float32).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    write_tokenizer(folder, shape.vocab_size)
    return model


def write_tokenizer(folder: Path, vocab_size: int, chat_template: str | None = None) -> None:
    """A word-level tokenizer (`w0` ... `wN`, whitespace split): the engine needs tokenizer.json to
    load a folder, and the benchmark feeds token ids, so any vocabulary of the right size will do."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=f"w{PAD_ID}"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))
    config = {"eos_token": f"w{EOS_ID}", "bos_token": f"w{BOS_ID}"}
    if chat_template is not None:
        config["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
