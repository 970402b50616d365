"""How many KV blocks the engine preallocates."""

from __future__ import annotations

import torch

from workers.config import EngineConfig

CPU_DEFAULT_FRACTION = 0.2  # of the memory available when the engine starts
CPU_DEFAULT_CAP = 1 << 30  # the pool is zeroed, so all of it is resident: set kv_cache_memory_bytes for more


def kv_cache_budget(config: EngineConfig, device: torch.device) -> int:
    """Bytes for the KV pool when the config does not fix the number of blocks."""
    if config.kv_cache_memory_bytes is not None:
        return config.kv_cache_memory_bytes
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * config.gpu_memory_utilization)
    return min(int(_available_ram() * CPU_DEFAULT_FRACTION), CPU_DEFAULT_CAP)


def num_kv_blocks(config: EngineConfig, device: torch.device, bytes_per_block: int, max_model_len: int) -> int:
    per_seq = -(-max_model_len // config.block_size)
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks
    budget = kv_cache_budget(config, device)
    # More blocks than every sequence at full length could use would only sit idle.
    n = min(budget // bytes_per_block, config.max_num_seqs * per_seq)
    if n < per_seq:
        raise ValueError(
            f"the KV cache budget of {budget} bytes holds {n} blocks, but one sequence of max_model_len="
            f"{max_model_len} needs {per_seq}; raise kv_cache_memory_bytes or lower max_model_len"
        )
    return n


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30
