"""`pipeline report JOB -o report.html`: one self-contained page whose every plot renders in a real
headless browser. NEEDS Debian's `chromium` (`apt-get install -y chromium`; .ci/run installs it):
without it the browser test fails."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from db.migrate import upgrade
from db.session import make_engine, session_factory
from jobs.engine_host import get_engine_loop
from jobs.execution import execute_chunk
from pipeline.report import PLOT_TITLES
from pipeline.settings import Settings
from pipeline.submit import submit_file

from support.processes import cli, cli_ok, pipeline_env

# matplotlib's tab:blue, tab:green, tab:orange and tab:red: the bars and lines of the plots.
PLOT_COLOURS = {"blue": (31, 119, 180), "green": (44, 160, 44), "orange": (255, 127, 14), "red": (214, 39, 40)}


@pytest.fixture(scope="module")
def finished_job(tmp_path_factory) -> tuple[dict[str, str], Path, str]:
    """(env, folder, job id) of a job with completions on both endpoints and a rejected line."""
    folder = tmp_path_factory.mktemp("report")
    url = f"sqlite:///{folder / 'jobs.sqlite3'}"
    upgrade(url)
    settings = Settings(database_url=url, chunk_size=8)
    source = folder / "in.jsonl"
    lines = [{"custom_id": f"c{i}", "text": f"Shared header. Question {i}", "max_tokens": 6 + i % 5,
              "temperature": 0.7, "seed": i} for i in range(24)]
    lines += [{"custom_id": f"chat{i}", "messages": [{"role": "user", "content": f"Hi {i}"}], "max_tokens": 5,
               "temperature": 0} for i in range(4)]
    source.write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"custom_id": "broken"}\n')
    factory = session_factory(make_engine(url))
    sent: list[int] = []
    summary = submit_file(settings, factory, source, send_chunk=lambda chunk_id, queue: sent.append(chunk_id))
    for chunk in sent:
        execute_chunk(factory, get_engine_loop(settings), chunk, "w")
    env = pipeline_env(PIPELINE_DATABASE_URL=url, PIPELINE_PRICE_PER_1K_PROMPT_TOKENS="1",
                       PIPELINE_PRICE_PER_1K_COMPLETION_TOKENS="3")
    return env, folder, summary["id"]


def test_the_report_is_one_self_contained_page(finished_job) -> None:
    env, folder, job_id = finished_job
    cli_ok(env, folder, "report", job_id, "-o", "report.html")
    page = (folder / "report.html").read_text()
    assert page.count('<img class="plot"') == len(PLOT_TITLES)
    assert page.count("src=\"data:image/png;base64,") == len(PLOT_TITLES)
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", page) and "<link" not in page
    assert job_id in page
    assert oct((folder / "report.html").stat().st_mode & 0o777) in ("0o644", "0o640", "0o600")


def test_bad_report_requests_are_one_error_line(finished_job) -> None:
    env, folder, job_id = finished_job
    for args, mentions in ((("batch_nope", "-o", "r.html"), "no job 'batch_nope'"),
                           ((job_id, "-o", "r.txt"), "a report is an .html file"),
                           ((job_id, "-o", "missing/r.html"), "does not exist")):
        result = cli(env, folder, "report", *args)
        assert result.returncode == 1 and result.stderr.startswith("error: "), result.stderr
        assert mentions in result.stderr and "Traceback" not in result.stderr


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:  # a failure, not a skip: a suite that passes without its browser check proves less
        pytest.fail("chromium is missing: install Debian's chromium (apt-get install -y chromium), as .ci/run does")
    return path


def test_every_plot_renders_in_a_headless_browser(finished_job, tmp_path: Path) -> None:
    chromium = _chromium()
    env, folder, job_id = finished_job
    report = tmp_path / "report.html"
    cli_ok(env, folder, "report", job_id, "-o", str(report))
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000"]
    dom = subprocess.run([*flags, "--dump-dom", report.as_uri()], capture_output=True, text=True, timeout=120)
    # The page's own script counted the <img> plots that decoded, once everything had loaded.
    assert f'data-plots-rendered="{len(PLOT_TITLES)}"' in dom.stdout, dom.stderr[-2000:]

    shot = tmp_path / "shot.png"
    subprocess.run([*flags, f"--screenshot={shot}", "--window-size=900,3400", report.as_uri()],
                   capture_output=True, timeout=120, check=True)
    image = Image.open(shot).convert("RGB")
    assert image.size == (900, 3400)
    colours = {name for name, rgb in PLOT_COLOURS.items()
               if any(_near(pixel, rgb) for _, pixel in image.getcolors(maxcolors=1 << 20))}
    assert colours == set(PLOT_COLOURS)  # throughput/histograms, hit rate, cost, errors all drawn


def _near(pixel: tuple[int, int, int], rgb: tuple[int, int, int]) -> bool:
    return all(abs(a - b) <= 6 for a, b in zip(pixel, rgb))
