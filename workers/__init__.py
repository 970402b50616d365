"""The inference engine a worker keeps warm: pure PyTorch, no database, no Celery."""

from workers.config import EngineConfig
from workers.engine import LLMEngine
from workers.errors import PromptTooLongError
from workers.outputs import CompletionOutput, RequestMetrics
from workers.sampling import SamplingParams

__all__ = ["CompletionOutput", "EngineConfig", "LLMEngine", "PromptTooLongError", "RequestMetrics", "SamplingParams"]
