"""`pipeline report JOB -o report.html`: one self-contained HTML page (plots inlined as PNG data
URIs, no script or style from elsewhere) with throughput over time, latency and TTFT histograms,
prefix-cache hit rate over time, tokens and cost by endpoint, and errors by code.

matplotlib draws (its Agg backend: no display needed). A small inline script counts the plots that
decoded (`data-plots-rendered` on <body>), which is what the browser test reads back."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Callable
from typing import Any

from pipeline.prices import Prices
from pipeline.report_data import EndpointTotals, ReportData

NUM_BUCKETS = 40  # time buckets of the throughput and hit-rate plots
PLOT_TITLES = ("Throughput over time", "Latency", "Time to first token", "Prefix-cache hit rate over time",
               "Tokens by endpoint", "Cost by endpoint", "Errors by code")


def render_report(data: ReportData, prices: Prices) -> bytes:
    """The page as UTF-8 bytes."""
    import matplotlib

    matplotlib.use("Agg")  # before pyplot is imported: never a display
    from matplotlib import pyplot as plt

    drawers: list[Callable[[Any], None]] = [
        lambda ax: _throughput(ax, data), lambda ax: _histogram(ax, data.latency_s, "latency (s)"),
        lambda ax: _histogram(ax, data.ttft_s, "time to first token (s)"), lambda ax: _hit_rate(ax, data),
        lambda ax: _tokens_by_endpoint(ax, data.by_endpoint),
        lambda ax: _cost_by_endpoint(ax, data.by_endpoint, prices, data.currency),
        lambda ax: _errors(ax, data.errors_by_code),
    ]
    figures = []
    for title, draw in zip(PLOT_TITLES, drawers, strict=True):
        fig, ax = plt.subplots(figsize=(8, 3.2), dpi=90)
        try:
            draw(ax)  # the page gives each plot its title
            fig.tight_layout()
            buffer = io.BytesIO()
            fig.savefig(buffer, format="png")
        finally:
            plt.close(fig)
        figures.append((title, base64.b64encode(buffer.getvalue()).decode("ascii")))
    return _page(data, figures).encode("utf-8")


def _empty(ax: Any, what: str) -> None:
    ax.text(0.5, 0.5, what, ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def _buckets(data: ReportData) -> tuple[float, list[int]]:
    """(bucket width in seconds, index of each result's bucket)."""
    span = max(data.finished_at[-1], 1e-3)
    width = span / NUM_BUCKETS
    return width, [min(NUM_BUCKETS - 1, int(t / width)) for t in data.finished_at]


def _throughput(ax: Any, data: ReportData) -> None:
    if len(data.finished_at) < 2:
        _empty(ax, "fewer than two results: no rate to show")
        return
    width, index = _buckets(data)
    counts = [0] * NUM_BUCKETS
    for i in index:
        counts[i] += 1
    ax.plot([(i + 0.5) * width for i in range(NUM_BUCKETS)], [n / width for n in counts], marker=".")
    ax.set_xlabel("seconds since the first result")
    ax.set_ylabel("lines/s")


def _histogram(ax: Any, values: list[float], label: str) -> None:
    if not values:
        _empty(ax, "no timings recorded")
        return
    ax.hist(values, bins=min(40, max(5, len(values) // 5)), color="tab:blue")
    ax.set_xlabel(label)
    ax.set_ylabel("requests")


def _hit_rate(ax: Any, data: ReportData) -> None:
    if len(data.finished_at) < 2:
        _empty(ax, "fewer than two results")
        return
    width, index = _buckets(data)
    prompt, cached = [0] * NUM_BUCKETS, [0] * NUM_BUCKETS
    for i, p, c in zip(index, data.prompt_tokens, data.cached_tokens, strict=True):
        prompt[i] += p
        cached[i] += c
    points = [((i + 0.5) * width, 100 * cached[i] / prompt[i]) for i in range(NUM_BUCKETS) if prompt[i]]
    ax.plot([x for x, _ in points], [y for _, y in points], marker=".", color="tab:green")
    ax.set_ylim(0, 100)
    ax.set_xlabel("seconds since the first result")
    ax.set_ylabel("% of prompt tokens cached")


def _tokens_by_endpoint(ax: Any, by_endpoint: dict[str, EndpointTotals]) -> None:
    if not by_endpoint:
        _empty(ax, "no completed results")
        return
    names = list(by_endpoint)
    x = range(len(names))
    for offset, (label, values) in enumerate((
            ("prompt (uncached)", [t.prompt_tokens - t.cached_tokens for t in by_endpoint.values()]),
            ("prompt (cached)", [t.cached_tokens for t in by_endpoint.values()]),
            ("completion", [t.completion_tokens for t in by_endpoint.values()]))):
        ax.bar([i + (offset - 1) * 0.27 for i in x], values, width=0.27, label=label)
    ax.set_xticks(list(x), names)
    ax.set_ylabel("tokens")
    ax.legend()


def _cost_by_endpoint(ax: Any, by_endpoint: dict[str, EndpointTotals], prices: Prices, currency: str) -> None:
    if not by_endpoint:
        _empty(ax, "no completed results")
        return
    ax.bar(list(by_endpoint), [float(prices.cost(t)) for t in by_endpoint.values()], color="tab:orange")
    ax.set_ylabel(currency)


def _errors(ax: Any, errors: dict[str, int]) -> None:
    if not errors:
        _empty(ax, "no errors")
        return
    ax.bar(list(errors), list(errors.values()), color="tab:red")
    ax.set_ylabel("lines")


def _page(data: ReportData, figures: list[tuple[str, str]]) -> str:
    job = data.job
    e = html.escape
    summary = (f"{e(job.status.value)}: {job.request_completed:,} completed, {job.request_failed:,} failed of "
               f"{job.request_total:,} lines; {data.compute_seconds:,.2f} s compute; cost {data.cost:f} {e(data.currency)}")
    images = "\n".join(f'<section><h2>{e(title)}</h2><img class="plot" alt="{e(title)}" '
                       f'src="data:image/png;base64,{b64}"></section>' for title, b64 in figures)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Job report {e(job.id)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:800px}} img.plot{{width:100%;border:1px solid #ddd}}</style>
</head><body data-plots="{len(figures)}">
<h1>Job {e(job.id)}</h1>
<p>{summary}</p>
<p>Model {e(job.model)}, input {e(job.input_file)}.</p>
{images}
<script>
window.addEventListener("load", function () {{
  var ok = Array.prototype.filter.call(document.querySelectorAll("img.plot"),
                                       function (img) {{ return img.complete && img.naturalWidth > 0; }});
  document.body.setAttribute("data-plots-rendered", String(ok.length));
}});
</script>
</body></html>
"""
