"""In-process CLI tests: run in a folder of the test's own with no PIPELINE_ variable set, so no
`pipeline.toml` and no setting of the machine running the tests reaches the command (the default
SQLite file lands in that folder)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def clean_workdir(monkeypatch: pytest.MonkeyPatch, folder: Path) -> Path:
    monkeypatch.chdir(folder)
    for key in list(os.environ):
        if key.startswith("PIPELINE_"):
            monkeypatch.delenv(key)
    return folder
