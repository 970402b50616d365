"""POST a JSON summary to the configured webhook (`webhook_url`): a few tries with a timeout each; a
webhook that fails is logged (its URL masked: it often holds a token) and never raises, since a
notification must not fail the job it reports on."""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from typing import Any

from pipeline.settings import mask_webhook

log = logging.getLogger(__name__)
BACKOFF_S = 1.0  # before the first retry; doubled before each next one


def post_json(url: str, payload: dict[str, Any], *, timeout_s: float, retries: int,
              backoff_s: float = BACKOFF_S) -> bool:
    """POST `payload` to `url`; True once a try gets a 2xx answer, False when every try failed."""
    body = json.dumps(payload).encode("utf-8")
    shown = mask_webhook(url)
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff_s * 2 ** (attempt - 1))
        request = urllib.request.Request(url, data=body, method="POST",
                                         headers={"Content-Type": "application/json",
                                                  "User-Agent": "llm-batch-pipeline"})
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                response.read()
            return True
        except urllib.error.HTTPError as e:
            problem = f"HTTP {e.code}"
        except (urllib.error.URLError, OSError) as e:  # refused, unreachable, timed out
            problem = str(getattr(e, "reason", None) or e)
        log.warning("webhook %s: try %d of %d failed: %s", shown, attempt + 1, retries + 1, problem)
    log.error("webhook %s: gave up after %d tries; the job is unaffected", shown, retries + 1)
    return False
