"""`pipeline config`: show or write the settings."""

from __future__ import annotations

import enum
import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.presets import PRESETS


config_app = typer.Typer(help="Show or write the settings.", no_args_is_help=True)

PresetChoice = enum.Enum("PresetChoice", {name: name for name in PRESETS}, type=str)
PresetOption = Annotated[
    Optional[PresetChoice], typer.Option(help="Apply this preset under pipeline.toml and the environment.")
]



@config_app.callback()
def config() -> None:
    """Show or write the settings (pipeline.toml, PIPELINE_* variables)."""


@config_app.command("show")
def config_show(
    preset: PresetOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object instead of a table.")] = False,
) -> None:
    """The settings in effect here, each with where it came from; passwords are masked."""
    from pipeline.settings import load_settings_with_sources

    try:
        settings, sources = load_settings_with_sources(preset=preset.value if preset else None)
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    values = settings.as_dict()
    if as_json:
        typer.echo(json.dumps(values, indent=2))
        return
    width = max(map(len, values))
    for name, value in values.items():
        typer.echo(f"{name:<{width}}  {json.dumps(value)}  ({sources[name]})")


@config_app.command("generate")
def config_generate(
    preset: PresetOption = None,
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Write here instead of stdout.")] = None,
    force: Annotated[bool, typer.Option(help="Replace the output file if it exists.")] = False,
) -> None:
    """A commented pipeline.toml: the defaults plus the preset; pipeline.toml and PIPELINE_* are not read."""
    from pipeline.settings import preset_settings

    if output is not None and output.exists() and not force:
        typer.echo(f"error: {output} exists; pass --force to replace it", err=True)
        raise typer.Exit(1)
    text = preset_settings(preset.value if preset else None).to_toml()
    if output is None:
        typer.echo(text, nl=False)
        return
    try:
        output.write_text(text, encoding="utf-8")
    except OSError as e:
        typer.echo(f"error: cannot write {output}: {e.strerror}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"settings written to {output}", err=True)

