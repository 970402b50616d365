"""Random-weight Hugging Face models saved to a folder, for checking our engine against `transformers`."""

from __future__ import annotations

from pathlib import Path

import torch

from workers.bench.model_setup import write_tokenizer

VOCAB = 512


CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}assistant:"


SHAPE = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=1024, initializer_range=0.1, eos_token_id=1, bos_token_id=2,
)


def make_config(arch: str):
    import transformers as tf

    if arch == "llama":
        return tf.LlamaConfig(**SHAPE, rope_parameters={
            "rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
        })
    if arch == "mistral":
        return tf.MistralConfig(**SHAPE, sliding_window=None)
    if arch == "qwen2":
        return tf.Qwen2Config(**SHAPE, tie_word_embeddings=True)
    if arch == "qwen3":
        return tf.Qwen3Config(**SHAPE, head_dim=32)
    raise ValueError(arch)


def save_random_model(arch: str, folder: Path, seed: int = 0):
    """Builds the HF model with seeded random weights, saves it, returns it (eval mode, float32)."""
    import transformers as tf

    cls = {"llama": tf.LlamaForCausalLM, "mistral": tf.MistralForCausalLM,
           "qwen2": tf.Qwen2ForCausalLM, "qwen3": tf.Qwen3ForCausalLM}[arch]
    torch.manual_seed(seed)
    model = cls(make_config(arch)).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    write_tokenizer(folder, VOCAB, CHAT_TEMPLATE)
    return model


def save_corrupted_bench_model(folder: Path, token_id: int) -> Path:
    """The small benchmark Llama (word-level vocabulary `w0`..`w511`, untied embeddings) with
    embedding row `token_id` set to NaN, as a bad conversion or a flipped bit leaves a checkpoint:
    a prompt holding that token gets NaN logits, and sampling from them raises in the engine."""
    from safetensors.torch import load_file, save_file

    from workers.bench.model_setup import SMALL_SHAPE, build_model

    build_model(SMALL_SHAPE, folder)
    weights = load_file(folder / "model.safetensors")
    weights["model.embed_tokens.weight"][token_id] = float("nan")
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder
