"""The Docker image installs the project as a package (no checkout beside it): the migrations must
travel inside it and `db.migrate` must find them there."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import sqlalchemy as sa

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_a_non_editable_install_migrates(tmp_path: Path) -> None:
    target = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), str(REPO_ROOT)],
        capture_output=True, text=True, timeout=300,
    )
    assert install.returncode == 0, install.stderr
    assert (target / "migrations" / "script.py.mako").is_file()
    url = f"sqlite:///{tmp_path / 'installed.sqlite3'}"
    code = f"import db.migrate as m; assert m.SCRIPT_LOCATION.parent == __import__('pathlib').Path({str(target)!r}); m.upgrade({url!r})"
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert {"jobs", "requests", "alembic_version"} <= set(sa.inspect(sa.create_engine(url)).get_table_names())
