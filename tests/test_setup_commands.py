"""The README's set-up commands install the CPU build of PyTorch on any Linux machine, and `.ci/run`
runs exactly those commands, so CI tests what the README tells a user to type."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from packaging.requirements import Requirement

REPO_ROOT = Path(__file__).resolve().parents[1]
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def readme_setup_commands() -> list[str]:
    """The `pip install` lines of the README's "# Set up" block."""
    text = (REPO_ROOT / "README.md").read_text()
    block = re.search(r"^# Set up.*?\n\n", text, flags=re.M | re.S)
    assert block, "README.md has no '# Set up' block"
    return [line for line in block[0].splitlines() if line.startswith("pip install ")]


def ci_install_commands() -> list[str]:
    return [line for line in (REPO_ROOT / ".ci" / "run").read_text().splitlines() if line.startswith("pip install ")]


def test_ci_runs_the_readme_setup_commands_word_for_word() -> None:
    assert readme_setup_commands() and ci_install_commands() == readme_setup_commands()


def test_torch_comes_alone_from_the_cpu_index_and_is_pinned_to_a_cpu_build() -> None:
    torch_step, package_step = (shlex.split(line) for line in readme_setup_commands())
    # Only torch reads PyTorch's index (--no-deps, its dependencies come from PyPI in the next step):
    # a machine that cannot reach that index pays its retries for one package, not for every one.
    assert torch_step[torch_step.index("--index-url") + 1] == CPU_INDEX and "--no-deps" in torch_step
    assert torch_step[-1] == "torch"
    assert "--index-url" not in package_step and "--extra-index-url" not in package_step
    assert package_step[-2:] == ["-e", ".[test]"]
    for step in (torch_step, package_step):
        constraints = REPO_ROOT / step[step.index("-c") + 1]
        pins = [Requirement(line) for line in constraints.read_text().splitlines()
                if line.strip() and not line.startswith("#")]
        torch = [pin for pin in pins if pin.name == "torch"]
        # The second step finds that same build installed: PyPI's CUDA build cannot replace it.
        assert len(torch) == 1 and re.fullmatch(r"==\d+\.\d+\.\d+\+cpu", str(torch[0].specifier)), torch


def test_the_readme_says_how_to_get_the_cuda_build() -> None:
    text = (REPO_ROOT / "README.md").read_text()
    assert "For a CUDA machine" in text and "https://download.pytorch.org/whl/cu" in text
