"""Reads settings from their sources (a preset, pipeline.toml, PIPELINE_* variables), converting each
raw value to its field's type; an error names the source and what is expected."""

from __future__ import annotations

import difflib
import json
import re
import sys
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.presets import PRESETS
from pipeline.settings import (
    CONFIG_ENV_VAR, CONFIG_FILE_NAME, ENV_PREFIX, FIELD_NAMES, FIELD_TYPES, SIZE_UNITS, URL_FIELDS, CombinationError,
    NightlyRun, Settings, env_var, field_problem, mask_url,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 needs the `tomli` backport
    import tomli as tomllib


def load(
    env: Mapping[str, str], config_path: str | Path | None, preset: str | None
) -> tuple[Settings, dict[str, str]]:
    """See `pipeline.settings.load_settings_with_sources`."""
    path = _config_path(env, config_path)
    file_values = _read_toml(path) if path is not None else {}
    env_values = _read_env(env)
    layers: list[tuple[str, dict[str, tuple[Any, str]]]] = []
    # preset: the argument, else the environment, else the file
    preset_source, preset_name = "argument --preset", preset
    if preset_name is None and "preset" in env_values:
        preset_name, preset_source = env_values["preset"]
        preset_name = preset_name or None
    if preset_name is None and "preset" in file_values:
        preset_name, preset_source = file_values["preset"]
    if preset_name is not None:
        if not isinstance(preset_name, str) or preset_name not in PRESETS:
            raise ValueError(f"{preset_source}: unknown preset {preset_name!r}; expected one of {', '.join(PRESETS)}")
        source = f"preset {preset_name!r}"
        layers.append(("preset", {k: (v, source) for k, v in PRESETS[preset_name].overrides.items()}))
    layers.append(("toml", file_values))
    layers.append(("env", env_values))

    values: dict[str, Any] = {"preset": preset_name}
    sources: dict[str, str] = {name: "default" for name in FIELD_NAMES}
    if preset_name is not None:
        sources["preset"] = preset_source
    for origin, layer in layers:
        for name, (raw, source) in layer.items():
            if name == "preset":
                continue
            values[name] = _parse(name, raw, origin, source)
            sources[name] = source
    try:
        return Settings(**values), sources
    except CombinationError as e:
        where = "; ".join(f"{name} from {sources[name]}" for name in e.field_names)
        raise ValueError(f"{e} ({where})") from None


def _config_path(env: Mapping[str, str], config_path: str | Path | None) -> Path | None:
    if config_path is not None:
        path, source = Path(config_path), "config file"
    elif env.get(CONFIG_ENV_VAR):
        path, source = Path(env[CONFIG_ENV_VAR]), f"environment variable {CONFIG_ENV_VAR}"
    else:
        path = Path.cwd() / CONFIG_FILE_NAME
        return path if path.is_file() else None
    if not path.is_file():
        raise ValueError(f"{source}: {path} does not exist or is not a file")
    return path.resolve()


def _read_toml(path: Path) -> dict[str, tuple[Any, str]]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ValueError(f"{path}: cannot read the config file: {e.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid TOML: {e}") from None
    unknown = [key for key in data if key not in FIELD_NAMES]
    if unknown:
        hint = _did_you_mean(unknown[0], FIELD_NAMES)
        raise ValueError(f"{path}: key {unknown[0]!r} is not a setting{hint}")
    return {key: (value, f"{path}: key {key!r}") for key, value in data.items()}


def _read_env(env: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    known = {env_var(name): name for name in FIELD_NAMES}
    values: dict[str, tuple[str, str]] = {}
    for key, raw in env.items():
        if key in known:
            values[known[key]] = (raw, f"environment variable {key}")
        elif key.startswith(ENV_PREFIX) and key != CONFIG_ENV_VAR:
            # Other tools use PIPELINE_* too (Azure Pipelines sets PIPELINE_WORKSPACE): only near-misses fail.
            hint = _did_you_mean(key, list(known) + [CONFIG_ENV_VAR], cutoff=0.85)
            if hint:
                raise ValueError(f"environment variable {key} is not a setting{hint}")
    return values


def _did_you_mean(word: str, candidates: typing.Iterable[str], cutoff: float = 0.6) -> str:
    match = difflib.get_close_matches(word, list(candidates), n=1, cutoff=cutoff)
    return f"; did you mean {match[0]}?" if match else ""


def _parse(name: str, raw: Any, origin: str, source: str) -> Any:
    """`raw` from the environment (a string) or a TOML file / preset (a TOML value) as the field's type."""
    hint = FIELD_TYPES[name]
    try:
        value = _convert(name, hint, raw, from_env=origin == "env")
        problem = field_problem(name, value)
    except ValueError as e:
        problem = str(e)
    if problem is not None:
        shown = repr(mask_url(raw)) if name in URL_FIELDS and isinstance(raw, str) else repr(raw)
        raise ValueError(f"{source}: {problem}; got {shown}")
    return value


def _convert(name: str, hint: Any, raw: Any, from_env: bool) -> Any:
    if from_env:
        return _convert_env(name, hint, raw)
    if hint is Path:
        return _path(raw) if isinstance(raw, str) else raw
    if hint is float and isinstance(raw, int) and not isinstance(raw, bool):
        return float(raw)
    if hint == int | None and isinstance(raw, str):
        return _size(raw)
    if hint == tuple[NightlyRun, ...]:
        return _nightly_runs(raw)
    if hint == tuple[str, ...] and isinstance(raw, list):
        return tuple(raw)  # the element types are the field check's business
    return raw


def _convert_env(name: str, hint: Any, raw: str) -> Any:
    text = raw.strip()
    if hint is str:
        return raw
    if hint == str | None:
        return text or None
    if hint is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError("expected an integer") from None
    if hint == int | None:
        return None if text.lower() in ("", "none", "auto") else _size(text)
    if hint is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError("expected a number") from None
    if hint is bool:
        flags = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False,
                 "off": False}
        if text.lower() not in flags:
            raise ValueError("expected true or false")
        return flags[text.lower()]
    if hint is Path:
        return _path(text)
    if hint == tuple[str, ...]:
        return tuple(part.strip() for part in text.split(",")) if text else ()
    if hint == tuple[NightlyRun, ...]:
        try:
            data = json.loads(text) if text else []
        except json.JSONDecodeError as e:
            raise ValueError(f"expected a JSON list of {{name, cron, input_path, priority}} objects ({e})") from None
        return _nightly_runs(data)
    raise AssertionError(f"no parser for {name}: {hint}")


def _path(text: str) -> Path:
    path = Path(text).expanduser()
    return path if path.is_absolute() else Path.cwd() / path  # relative to the working folder


def _size(text: str) -> int:
    match = re.fullmatch(r"\s*([0-9]+)\s*([KMGT]iB)?\s*", text, flags=re.IGNORECASE)
    if match is None:
        raise ValueError("expected a size in bytes or with a unit: KiB, MiB, GiB, TiB (e.g. '4GiB')")
    return int(match[1]) * (SIZE_UNITS[match[2].lower()] if match[2] else 1)


def _nightly_runs(data: Any) -> tuple[NightlyRun, ...]:
    if not isinstance(data, list):
        raise ValueError("expected a list of {name, cron, input_path, priority} tables")
    runs = []
    for index, item in enumerate(data):
        where = f"nightly_runs[{index}]"
        if not isinstance(item, dict):
            raise ValueError(f"{where}: expected a table with name, cron, input_path and optionally priority")
        unknown = sorted(set(item) - {"name", "cron", "input_path", "priority"})
        missing = sorted({"name", "cron", "input_path"} - set(item))
        if unknown or missing:
            raise ValueError(f"{where}: " + "; ".join(
                ([f"unknown keys {', '.join(unknown)}"] if unknown else [])
                + ([f"missing keys {', '.join(missing)}"] if missing else [])))
        if not all(isinstance(item[key], str) for key in item):
            raise ValueError(f"{where}: expected string values")
        try:
            runs.append(NightlyRun(item["name"], item["cron"], _path(item["input_path"]),
                                   item.get("priority", "low")))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    return tuple(runs)
