"""Per-tenant quotas, kept in Redis and decided there atomically (Lua scripts and a per-tenant
lock), so every server process and the CLI's `submit` share one count.

- Requests per minute (`requests_per_minute`): a token bucket per tenant, `requests_per_minute`
  deep, refilled continuously at that rate: a burst of a minute's worth is allowed, then one
  request per 60/rate seconds. The script reads Redis's own clock, so servers' clocks never matter.
- Active batches (`max_active_jobs`): batches validating or in progress. The count is read from
  the database (the truth; workers finish batches without telling Redis) while a per-tenant Redis
  lock is held around the check and the creation, so two concurrent creates cannot both take the
  last place.
- Tokens per day (`tokens_per_day`): prompt and completion tokens of the tenant's results written
  this UTC day, counted in Redis by the workers as they write results. A new batch is admitted only
  while the day's count is under the limit; a running batch is never stopped halfway.

A refusal is `QuotaExceeded`, with the seconds after which a retry can succeed (`Retry-After`).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import redis

from pipeline.errors import PipelineError

LOCK_TTL_MS = 120_000  # the longest a crashed holder can block its tenant's creates
LOCK_WAIT_S = 30.0  # how long a create waits for another create of the same tenant
DAY_KEY_TTL_S = 2 * 86400

# KEYS[1] the bucket; ARGV[1] capacity (= requests per minute). Returns {allowed (0/1), wait in ms}.
_TOKEN_BUCKET = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local capacity = tonumber(ARGV[1])
local per_ms = capacity / 60000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1]) or capacity
local at = tonumber(state[2]) or now
tokens = math.min(capacity, tokens + math.max(0, now - at) * per_ms)
local allowed, wait_ms = 0, 0
if tokens >= 1 then
  tokens = tokens - 1
  allowed = 1
else
  wait_ms = math.ceil((1 - tokens) / per_ms)
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('PEXPIRE', KEYS[1], 120000)
return {allowed, wait_ms}
"""
# Delete the lock only if it is still ours (it may have expired and been taken by another).
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class QuotaExceeded(PipelineError):
    """A tenant's quota is used up; `retry_after_s` says when to try again."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message, retry_after_s)
        self.message, self.retry_after_s = message, max(1, retry_after_s)

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True, slots=True)
class TenantQuota:
    """A tenant's limits; None means unlimited."""

    tenant_id: str
    tenant_name: str
    requests_per_minute: int | None
    max_active_batches: int | None
    tokens_per_day: int | None

    @classmethod
    def of(cls, tenant) -> TenantQuota:
        return cls(tenant.id, tenant.name, tenant.requests_per_minute, tenant.max_active_jobs, tenant.tokens_per_day)


class Quotas:
    """The quota counters of one deployment (its Redis and key prefix)."""

    def __init__(self, client: redis.Redis, key_prefix: str) -> None:
        self._client = client
        self._prefix = key_prefix
        self._bucket = client.register_script(_TOKEN_BUCKET)
        self._release = client.register_script(_RELEASE)

    @classmethod
    def from_settings(cls, settings) -> Quotas:
        return cls(redis.Redis.from_url(settings.broker_url, socket_timeout=10, socket_connect_timeout=10),
                   settings.redis_key_prefix)

    def close(self) -> None:
        self._client.close()

    def take_request(self, quota: TenantQuota) -> None:
        """Count one API request; QuotaExceeded when the tenant's bucket is empty."""
        if quota.requests_per_minute is None:
            return
        allowed, wait_ms = self._bucket(keys=[self._key("rpm", quota.tenant_id)], args=[quota.requests_per_minute])
        if not allowed:
            raise QuotaExceeded(f"tenant {quota.tenant_name!r} sent more than {quota.requests_per_minute} requests "
                                "in a minute; retry after the Retry-After seconds", -(-int(wait_ms) // 1000))

    @contextmanager
    def admit_batch(self, quota: TenantQuota, count_active: Callable[[], int]) -> Iterator[None]:
        """Hold the tenant's creation lock while the caller creates a batch; QuotaExceeded before
        yielding when the tenant has `max_active_batches` active ones (`count_active()`, read
        under the lock) or has used its tokens of the day."""
        if quota.max_active_batches is None and quota.tokens_per_day is None:
            yield
            return
        key, token = self._key("create-lock", quota.tenant_id), secrets.token_hex(16)
        deadline = time.monotonic() + LOCK_WAIT_S
        while not self._client.set(key, token, nx=True, px=LOCK_TTL_MS):
            if time.monotonic() > deadline:
                raise QuotaExceeded(f"tenant {quota.tenant_name!r} is creating another batch; retry shortly", 5)
            time.sleep(0.05)
        try:
            if quota.tokens_per_day is not None:
                used = int(self._client.get(self._day_key(quota.tenant_id)) or 0)
                if used >= quota.tokens_per_day:
                    raise QuotaExceeded(f"tenant {quota.tenant_name!r} has used its {quota.tokens_per_day:,} tokens "
                                        "of the day (UTC); retry tomorrow", _seconds_to_midnight())
            if quota.max_active_batches is not None and count_active() >= quota.max_active_batches:
                raise QuotaExceeded(f"tenant {quota.tenant_name!r} has {quota.max_active_batches} active batches, "
                                    "its limit; retry when one has finished", 60)
            yield
        finally:
            self._release(keys=[key], args=[token])

    def add_tokens(self, tenant_id: str, tokens: int, *, now: datetime | None = None) -> None:
        """Count `tokens` against the tenant's day (the worker calls this as it writes results)."""
        if tokens <= 0:
            return
        key = self._day_key(tenant_id, now)
        pipe = self._client.pipeline()
        pipe.incrby(key, tokens)
        pipe.expire(key, DAY_KEY_TTL_S)
        pipe.execute()

    def tokens_today(self, tenant_id: str) -> int:
        return int(self._client.get(self._day_key(tenant_id)) or 0)

    def _key(self, kind: str, tenant_id: str) -> str:
        return f"{self._prefix}quota:{kind}:{tenant_id}"

    def _day_key(self, tenant_id: str, now: datetime | None = None) -> str:
        day = (now or datetime.now(timezone.utc)).strftime("%Y%m%d")
        return f"{self._prefix}quota:tokens:{tenant_id}:{day}"


def _seconds_to_midnight() -> int:
    now = datetime.now(timezone.utc)
    midnight = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return int((midnight - now).total_seconds()) + 1
