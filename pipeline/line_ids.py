"""The opaque ids of an output line, as OpenAI's batch output has them: the line's `batch_req_<hex>`,
the response's `req_<hex>` and the completion's `cmpl-<hex>` / `chatcmpl-<hex>`.

They are derived from what the database keeps (the job id and the request row's id, or, for a
line rejected at submit, its line number), never drawn at random, so exporting a job twice gives
the same ids, and results and errors share one scheme. A sha256 keyed by the id's kind keeps the
three ids of a line unrelated to each other and to the row numbers behind them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

HEX_CHARS = 32  # OpenAI's ids carry 32 hex digits after the prefix


@dataclass(frozen=True, slots=True)
class LineIds:
    """`line_id` is the output line's `id`; `request_id` its response's `request_id`; `completion_hex`
    follows `cmpl-` or `chatcmpl-` in the response body's `id`."""

    line_id: str
    request_id: str
    completion_hex: str


def request_line_ids(job_id: str, request_row_id: int) -> LineIds:
    """The ids of the line of request row `request_row_id` of job `job_id`."""
    return _ids(f"{job_id}\0request\0{request_row_id}")


def rejected_line_ids(job_id: str, line: int) -> LineIds:
    """The ids of input line `line` of job `job_id`, rejected at submit (it has no request row)."""
    return _ids(f"{job_id}\0line\0{line}")


def _ids(source: str) -> LineIds:
    return LineIds(line_id="batch_req_" + _hex("line", source), request_id="req_" + _hex("request", source),
                   completion_hex=_hex("completion", source))


def _hex(kind: str, source: str) -> str:
    return hashlib.sha256(f"{kind}\0{source}".encode("utf-8", "surrogatepass")).hexdigest()[:HEX_CHARS]
