"""Shared fixtures: engines on the built-in tiny model and random-weight Hugging Face models."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # `import hf_models` from any test folder


@pytest.fixture(scope="session")
def hf_model_dirs(tmp_path_factory):
    """arch -> (folder, transformers model); built once per session, lazily per architecture."""
    from hf_models import save_random_model

    root = tmp_path_factory.mktemp("hf")
    built: dict[str, tuple[Path, object]] = {}

    def get(arch: str):
        if arch not in built:
            folder = root / arch
            built[arch] = (folder, save_random_model(arch, folder))
        return built[arch]

    return get
