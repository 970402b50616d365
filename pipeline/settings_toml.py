"""Writes `Settings` as a commented pipeline.toml that `load_settings` reads back to the same values."""

from __future__ import annotations

import json
import textwrap
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.settings import Settings

HEADER = """\
# pipeline.toml: settings of the pipeline CLI, workers and beat.
# Precedence: defaults < preset < this file < environment variables PIPELINE_<KEY> (upper case).
# Relative paths are relative to the working folder of the process that reads this file.
"""

NIGHTLY_EXAMPLE = """\
# [[nightly_runs]]
# name = "evals"
# cron = "0 2 * * *"              # minute hour day-of-month month day-of-week
# input_path = "/data/evals.jsonl"
# priority = "low"
"""


def render_toml(settings: Settings) -> str:
    from pipeline.settings import URL_FIELDS, mask_url, mask_webhook

    parts = [HEADER]
    for f in fields(settings):
        if f.name == "nightly_runs":
            continue
        value = getattr(settings, f.name)
        lines = [f"# {line}" for line in textwrap.wrap(f.metadata["doc"], 96)]
        if value is None:
            lines.append(f"# {f.name} = {f.metadata.get('example', '')}")
        elif f.name == "webhook_url":  # its path is usually the token
            lines.append("# may hold a token: set PIPELINE_WEBHOOK_URL in the environment instead")
            lines.append(f"# {f.name} = {toml_value(mask_webhook(value))}")
        elif f.name in URL_FIELDS and mask_url(value) != value:
            lines.append(f"# holds a password: set PIPELINE_{f.name.upper()} in the environment instead")
            lines.append(f"# {f.name} = {toml_value(mask_url(value))}")
        else:
            lines.append(f"{f.name} = {toml_value(value)}")
        parts.append("\n".join(lines) + "\n")
    nightly = [f"# {line}" for line in textwrap.wrap(_doc(settings, "nightly_runs"), 96)]
    parts.append("\n".join(nightly) + "\n" + _nightly_tables(settings))
    return "\n".join(parts)


def toml_value(value: Any) -> str:
    """A TOML literal for a str, bool, int, float, Path or a tuple of them (an array)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, str):
        # JSON escapes are TOML basic-string escapes, except that TOML also forbids a raw DEL.
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    raise TypeError(f"no TOML literal for {type(value).__name__}")


def _doc(settings: Settings, name: str) -> str:
    return next(f.metadata["doc"] for f in fields(settings) if f.name == name)


def _nightly_tables(settings: Settings) -> str:
    if not settings.nightly_runs:
        return NIGHTLY_EXAMPLE
    tables = []
    for run in settings.nightly_runs:
        tables.append("[[nightly_runs]]\n" + "".join(
            f"{key} = {toml_value(value)}\n"
            for key, value in (("name", run.name), ("cron", run.cron), ("input_path", run.input_path),
                               ("priority", run.priority))))
    return "\n".join(tables)
