"""Engine configuration: validated once, frozen, passed down (never written back)."""

from __future__ import annotations

from dataclasses import dataclass

from workers.chat_template import RENDER_BUDGET_S

SUPPORTED_DTYPES = ("auto", "float32", "bfloat16", "float16")
KV_CACHE_DTYPES = ("auto", "int8", "fp8")
ATTENTION_BACKENDS = ("auto", "reference", "cpu", "triton")  # workers/attention
EVICTION_POLICIES = ("lru", "lfu", "fifo", "adaptive")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """What a worker's engine is built from.

    `num_kv_blocks=None` sizes the KV pool from `kv_cache_memory_bytes`, or, when that is None too,
    from the memory the device has free. `max_model_len=None` takes the model's own context length.
    """

    model: str = "tiny"
    device: str = "cpu"
    dtype: str = "auto"  # bfloat16 where the device computes it natively, else float32 (workers/dtype_choice.py)
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory_bytes: int | None = None
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    eviction_policy: str = "lru"
    # Pinned (warmed) prefix blocks may fill at most this share of the pool: the rest stays for work.
    max_pinned_fraction: float = 0.5
    kv_cache_dtype: str = "auto"
    attention_backend: str = "auto"  # workers/attention: "reference", "cpu", "triton"; auto: the fastest here
    # Decode steps replayed as CUDA graphs (workers/decode_graphs.py) where the triton backend runs
    # on a CUDA GPU. False: every kernel is launched from Python each step.
    cuda_graphs: bool = True
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    seed: int = 0
    # Threads of torch's CPU pool (process-wide); None: torch's default, one per core. Several
    # workers on one machine must split the cores: two pools of all cores on the same cores made
    # a 2-worker job 8x slower here than with one thread each (OpenMP threads spin while they wait).
    cpu_threads: int | None = None
    # Seconds a chat template may take to render one conversation; past it that request fails with
    # `chat_template_error` (workers/chat_template.py). A normal template takes milliseconds.
    chat_template_timeout_s: float = RENDER_BUDGET_S

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model must be 'tiny' or the path of a local Hugging Face model folder")
        if not (self.device in ("cpu", "cuda") or (self.device.startswith("cuda:") and _is_index(self.device[5:]))):
            raise ValueError(f"device={self.device!r} is not supported; use 'cpu', 'cuda' or 'cuda:N'")
        if self.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is not supported; use one of {', '.join(SUPPORTED_DTYPES)}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(
                f"kv_cache_dtype={self.kv_cache_dtype!r} is not supported; use one of {', '.join(KV_CACHE_DTYPES)}"
            )
        if self.kv_cache_dtype == "fp8" and self.device == "cpu":
            raise ValueError("kv_cache_dtype='fp8' needs a CUDA GPU with fp8 support; on the CPU use 'int8'")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"attention_backend={self.attention_backend!r} is unknown; use one of {', '.join(ATTENTION_BACKENDS)}"
            )
        if not isinstance(self.cuda_graphs, bool):
            raise ValueError(f"cuda_graphs={self.cuda_graphs!r} must be True or False")
        if self.eviction_policy not in EVICTION_POLICIES:
            raise ValueError(
                f"eviction_policy={self.eviction_policy!r} is unknown; use one of {', '.join(EVICTION_POLICIES)}"
            )
        if isinstance(self.max_pinned_fraction, bool) or not isinstance(self.max_pinned_fraction, (int, float)) \
                or not 0.0 <= self.max_pinned_fraction < 1.0:
            raise ValueError(f"max_pinned_fraction={self.max_pinned_fraction!r} must be in [0, 1)")
        if not 1 <= self.block_size <= 256:
            raise ValueError(f"block_size={self.block_size} must be between 1 and 256 tokens (16 is usual)")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 2:
            raise ValueError(f"num_kv_blocks={self.num_kv_blocks} must be at least 2, or None to size it from memory")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes <= 0:
            raise ValueError("kv_cache_memory_bytes must be positive, or None to size it from free memory")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization={self.gpu_memory_utilization} must be in (0, 1]")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs={self.max_num_seqs} must be at least 1")
        if self.max_num_batched_tokens < self.block_size:
            raise ValueError(
                f"max_num_batched_tokens={self.max_num_batched_tokens} must be at least block_size={self.block_size}"
            )
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len={self.max_model_len} must be at least 2, or None for the model's own")
        if self.cpu_threads is not None and (isinstance(self.cpu_threads, bool) or not isinstance(self.cpu_threads, int)
                                             or self.cpu_threads < 1):
            raise ValueError(f"cpu_threads={self.cpu_threads!r} must be a positive integer, or None for one per core")
        if isinstance(self.chat_template_timeout_s, bool) or not isinstance(self.chat_template_timeout_s, (int, float)) \
                or not 0 < self.chat_template_timeout_s <= 3600:
            raise ValueError(f"chat_template_timeout_s={self.chat_template_timeout_s!r} must be a number of seconds "
                             "in (0, 3600]")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ValueError(f"seed={self.seed!r} must be an integer in [0, 2**63)")


def _is_index(text: str) -> bool:
    return text.isascii() and text.isdigit()
