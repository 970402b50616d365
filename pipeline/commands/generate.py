"""`pipeline generate "PROMPT" [--stream]`: one prompt through the configured model, in this
process; with --stream each token's text is printed as the engine produces it."""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from pipeline.commands.common import guarded


def register(app: typer.Typer) -> None:
    app.command("generate")(generate)


def generate(
    prompt: Annotated[str, typer.Argument(help="The prompt (a completion prompt, not a chat).")],
    stream: Annotated[bool, typer.Option("--stream", help="Print tokens as they are produced.")] = False,
    max_tokens: Annotated[int, typer.Option(min=1, max=32768, help="Tokens to generate at most.")] = 64,
    temperature: Annotated[float, typer.Option(min=0.0, max=2.0, help="0: greedy.")] = 0.0,
    seed: Annotated[Optional[int], typer.Option(help="Seed of a sampled (temperature > 0) answer.")] = None,
) -> None:
    """Generate an answer to PROMPT with PIPELINE_MODEL (loaded here; no services)."""
    from pipeline.settings import load_settings

    settings = guarded(load_settings)

    def action() -> str:
        from workers import EngineConfig, LLMEngine, SamplingParams
        from workers.streaming import TokenStream

        engine = LLMEngine(EngineConfig(**settings.engine_kwargs()))
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed)
        request_id = engine.add_request(prompt, params)  # ValueError for a prompt it cannot serve
        if stream:
            engine.add_step_callback(TokenStream(engine, request_id, _write))
        while True:
            for output in engine.step():
                return output.text

    text = guarded(action)
    if stream:
        sys.stdout.write("\n")
    else:
        sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _write(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()
