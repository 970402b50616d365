"""Surfaces sit on top: the CLI (`pipeline/cli.py`, `pipeline/commands/`) and the API server
(`pipeline/api/`). Nothing below them imports either, at module level or inside a function; the
server does not import the CLI; the CLI reaches the server only to start it (`pipeline serve`)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = ("pipeline.cli", "pipeline.commands")
SERVER = ("pipeline.api",)


def imports(path: Path) -> set[str]:
    """Every module `path` imports, wherever the import statement is."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def reaches(modules: set[str], packages: tuple[str, ...]) -> set[str]:
    return {m for m in modules if any(m == p or m.startswith(p + ".") for p in packages)}


def module_files(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def test_nothing_below_the_surfaces_imports_them() -> None:
    below = [*module_files("db"), *module_files("workers"), *module_files("jobs"),
             *(p for p in (ROOT / "pipeline").glob("*.py") if p.name not in ("cli.py", "__main__.py"))]
    assert len(below) > 50
    offenders = {str(p.relative_to(ROOT)): sorted(reaches(imports(p), CLI + SERVER)) for p in below}
    assert {path: found for path, found in offenders.items() if found} == {}


def test_the_server_and_the_cli_stay_apart() -> None:
    server = {str(p.relative_to(ROOT)): sorted(reaches(imports(p), CLI)) for p in module_files("pipeline/api")}
    assert {path: found for path, found in server.items() if found} == {}
    cli = {str(p.relative_to(ROOT)): sorted(reaches(imports(p), SERVER)) for p in module_files("pipeline/commands")}
    # The check sees imports inside functions: serve's own import of the app is found, and is the only one.
    assert {path: found for path, found in cli.items() if found} == {
        "pipeline/commands/serve.py": ["pipeline.api.app", "pipeline.api.app.create_app"]}
