"""The vLLM peer of `pipeline bench engine --peer vllm`, run as a script by vLLM's own Python:

    VLLM_PYTHON workers/bench/vllm_peer.py REQUEST.json RESULT.json

It imports nothing from this package (vLLM's virtual environment lacks it) except `cpu_load.py`
beside it, which needs only the standard library. Everything it needs comes in REQUEST.json:

    {"model": folder, "dtype": "float32" | "bfloat16", "max_model_len": int, "repeat": int,
     "warmup": {"prompts": [[id, ...], ...], "max_tokens": [int, ...]},
     "workloads": [{"name": str, "prompts": [[id, ...], ...], "max_tokens": [int, ...],
                    "waves": [[prompt index, ...], ...]}, ...]}

After a warm-up it runs each workload `repeat` times from an empty prefix cache, each wave one
`generate` call run to completion before the next (multi-turn: one call per turn), greedy with EOS
ignored, and writes RESULT.json:

    {"vllm_version": str, "block_size": int, "startup_seconds": float,
     "workloads": [{"name": str, "token_ids": [[id, ...], ...],  # the last run's
                    "runs": [{"seconds": float, "hit_rate": float, "load": {CpuLoad's fields}}, ...]}]}

JSON both ways, never pickle. Progress and vLLM's own log go to stderr.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

DTYPES = ("float32", "bfloat16")
EXIT_NO_VLLM = 3  # `import vllm` failed: the caller names the Python it was given


class RequestError(ValueError):
    """REQUEST.json does not hold what this script needs."""


def parse_request(text: str) -> dict[str, Any]:
    """The request, checked field by field so that a caller's mistake is one clear line."""
    try:
        request = json.loads(text)
    except json.JSONDecodeError as e:
        raise RequestError(f"request is not JSON: {e}") from None
    if not isinstance(request, dict):
        raise RequestError("request must be a JSON object")
    _field(request, "model", str)
    if _field(request, "dtype", str) not in DTYPES:
        raise RequestError(f"dtype {request['dtype']!r} is not one of {', '.join(DTYPES)}")
    for name in ("max_model_len", "repeat"):
        if _field(request, name, int) < 1:
            raise RequestError(f"{name} must be at least 1")
    _check_prompts("warmup", _field(request, "warmup", dict))
    for i, w in enumerate(_field(request, "workloads", list)):
        if not isinstance(w, dict):
            raise RequestError(f"workloads[{i}] must be an object")
        _field(w, "name", str)
        _check_prompts(f"workloads[{i}]", w)
        waves = _field(w, "waves", list)
        indices = sorted(i for wave in waves for i in wave)
        if indices != list(range(len(w["prompts"]))):
            raise RequestError(f"workloads[{i}].waves must hold every prompt index once")
    return request


def _field(obj: dict[str, Any], name: str, kind: type) -> Any:
    value = obj.get(name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise RequestError(f"field {name!r} must be a {kind.__name__}, got {value!r:.40}")
    return value


def _check_prompts(where: str, obj: dict[str, Any]) -> None:
    prompts, max_tokens = _field(obj, "prompts", list), _field(obj, "max_tokens", list)
    if len(prompts) != len(max_tokens):
        raise RequestError(f"{where}: {len(prompts)} prompts but {len(max_tokens)} max_tokens")
    for p in prompts:
        if not isinstance(p, list) or not p or not all(isinstance(t, int) and t >= 0 for t in p):
            raise RequestError(f"{where}: every prompt must be a non-empty list of token ids")
    if not all(isinstance(n, int) and n >= 1 for n in max_tokens):
        raise RequestError(f"{where}: every max_tokens must be a positive integer")


def hit_rate(num_cached_tokens: list[int], prompt_lens: list[int]) -> float:
    """Prompt tokens served from vLLM's prefix cache, from each output's `num_cached_tokens`."""
    total = sum(prompt_lens)
    return sum(num_cached_tokens) / total if total else 0.0


def log(message: str) -> None:
    print(f"vllm peer: {message}", file=sys.stderr, flush=True)


class Peer:
    """One vLLM engine over the model folder, as the request describes it."""

    def __init__(self, request: dict[str, Any]) -> None:
        from vllm import LLM

        started = time.perf_counter()
        self.llm = LLM(
            model=request["model"], dtype=request["dtype"], enable_prefix_caching=True,
            max_model_len=request["max_model_len"], seed=0,
        )
        self.startup_seconds = time.perf_counter() - started
        self.block_size = int(self.llm.llm_engine.vllm_config.cache_config.block_size)

    def generate(self, prompts: list[list[int]], max_tokens: list[int]) -> tuple[list[list[int]], list[int]]:
        """Greedy, EOS ignored: the token ids of each prompt and how many of its tokens were cached."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in max_tokens]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs], [int(o.num_cached_tokens or 0) for o in outs]

    def run(self, workload: dict[str, Any]) -> tuple[list[list[int]], float, float]:
        """One timed run from an empty prefix cache: token ids, seconds, hit rate."""
        prompts, max_tokens = workload["prompts"], workload["max_tokens"]
        self.llm.reset_prefix_cache()
        token_ids: list[list[int]] = [[] for _ in prompts]
        cached = [0] * len(prompts)
        started = time.perf_counter()
        for wave in workload["waves"]:
            outs, hits = self.generate([prompts[i] for i in wave], [max_tokens[i] for i in wave])
            for i, out, hit in zip(wave, outs, hits):
                token_ids[i], cached[i] = out, hit
        seconds = time.perf_counter() - started
        return token_ids, seconds, hit_rate(cached, [len(p) for p in prompts])


def serve(request: dict[str, Any]) -> dict[str, Any]:
    from dataclasses import asdict

    import vllm
    from cpu_load import CpuMeter  # beside this script: sys.path[0] is its folder

    log(f"starting vLLM {vllm.__version__} on {request['model']} ({request['dtype']})")
    peer = Peer(request)
    log(f"started in {peer.startup_seconds:.1f}s, block size {peer.block_size}; warming up")
    peer.generate(request["warmup"]["prompts"], request["warmup"]["max_tokens"])
    results = []
    for w in request["workloads"]:
        runs, token_ids = [], []
        for r in range(request["repeat"]):
            log(f"{w['name']}: run {r + 1}/{request['repeat']}")
            meter = CpuMeter()
            meter.start()
            token_ids, seconds, rate = peer.run(w)
            runs.append({"seconds": seconds, "hit_rate": rate, "load": asdict(meter.stop())})
        results.append({"name": w["name"], "token_ids": token_ids, "runs": runs})
    return {"vllm_version": vllm.__version__, "block_size": peer.block_size,
            "startup_seconds": peer.startup_seconds, "workloads": results}


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: vllm_peer.py REQUEST.json RESULT.json", file=sys.stderr)
        return 2
    try:
        request = parse_request(Path(argv[0]).read_text())
    except RequestError as e:
        print(f"error: {argv[0]}: {e}", file=sys.stderr)
        return 2
    try:
        import vllm  # noqa: F401
    except ImportError as e:
        print(f"error: cannot import vllm: {e}", file=sys.stderr)
        return EXIT_NO_VLLM
    result = serve(request)
    out = Path(argv[1])
    partial = out.with_name(out.name + ".partial")
    partial.write_text(json.dumps(result))
    partial.replace(out)  # the caller never reads half a file
    return 0


if __name__ == "__main__":  # vLLM spawns processes that import this file again: run only as the script
    sys.exit(main(sys.argv[1:]))
