"""The peer: `transformers` generate with static batching (fixed batches in submission order,
left padding, every row of a batch decoded as long as its longest request)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from workers.bench.model_setup import PAD_ID

HF_BATCH_SIZE = 32


@dataclass(frozen=True, slots=True)
class PeerResult:
    token_ids: list[list[int]]  # the tokens each prompt asked for (the batch may have decoded more)
    seconds: float
    peak_kv_bytes: int  # largest past_key_values of any batch


def left_pad(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask [B, longest], prompts right-aligned after PAD_ID."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), PAD_ID, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[row, width - len(prompt):] = 1
    return input_ids, attention_mask


def cache_bytes(past_key_values: Any) -> int:
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in past_key_values.layers)


def run_hf(model: Any, prompts: list[list[int]], max_tokens: list[int], batch_size: int = HF_BATCH_SIZE) -> PeerResult:
    """Greedy-decodes every prompt in batches of `batch_size`. EOS is switched off (`eos_token_id=None`
    overrides the model's) so every row runs to the batch's longest request, as ours runs with
    `ignore_eos`."""
    outputs: list[list[int]] = []
    peak = 0
    started = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start:start + batch_size]
            wanted = max_tokens[start:start + batch_size]
            input_ids, attention_mask = left_pad(batch)
            out = model.generate(
                input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max(wanted), do_sample=False,
                eos_token_id=None, pad_token_id=PAD_ID, return_dict_in_generate=True,
            )
            new = out.sequences[:, input_ids.shape[1]:].tolist()
            outputs.extend(row[:n] for row, n in zip(new, wanted))
            peak = max(peak, cache_bytes(out.past_key_values))
    return PeerResult(outputs, time.perf_counter() - started, peak)
