"""Which workers are running, by node name: each worker keeps a key `<prefix>worker:<name>` in the
broker's Redis, with a short expiry that a thread of the worker renews, and deletes it when it stops.

Why: a Celery broadcast cannot know how many workers will answer, so a command that wants every
worker's answer waits out its whole timeout. With the count of registered workers as its `limit`,
it returns as soon as that many have answered; a worker killed without a warm shutdown stays
registered until its key expires, and then costs the caller that timeout, as before.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time

import redis

EXPIRY_S = 30  # a registration not renewed for this long is gone
RENEW_S = 10  # how often a running worker renews it

log = logging.getLogger(__name__)


def _key(key_prefix: str, name: str) -> str:
    return f"{key_prefix}worker:{name}"


def registered_workers(client: redis.Redis, key_prefix: str) -> list[str]:
    """The node names of the registered workers, sorted."""
    start = len(_key(key_prefix, ""))
    return sorted(key.decode()[start:] for key in client.scan_iter(match=_key(_escape(key_prefix), "*"), count=500))


def expected_answers(client: redis.Redis, key_prefix: str) -> int | None:
    """How many answers a broadcast to every worker can stop at: the registered workers; None (wait
    out the timeout) where none is registered or Redis cannot say."""
    try:
        return len(registered_workers(client, key_prefix)) or None
    except redis.RedisError:
        return None


def expected_answers_at(broker_url: str, key_prefix: str) -> int | None:
    """`expected_answers` over a connection of its own."""
    client = redis.Redis.from_url(broker_url, socket_timeout=5, socket_connect_timeout=5)
    try:
        return expected_answers(client, key_prefix)
    finally:
        client.close()


def _escape(text: str) -> str:
    """`text` for a Redis MATCH pattern, matching itself only."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


class Registration:
    """A running worker's key, renewed by a daemon thread until `stop`."""

    def __init__(self, client: redis.Redis, key_prefix: str, name: str) -> None:
        self.client, self.key = client, _key(key_prefix, name)
        self.value = json.dumps({"pid": os.getpid(), "started": time.time()})
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._renew, name="worker-registration", daemon=True)

    def start(self) -> None:
        try:
            self._write()
        except redis.RedisError as e:  # the renewals try again
            log.warning("worker registration %s not written: %s", self.key, e)
        self._thread.start()

    def stop(self) -> None:
        """Ends the renewals and deletes the key (also where `start` never ran: a worker stopped
        while it was starting)."""
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join(timeout=RENEW_S)
        try:
            self.client.delete(self.key)
        except redis.RedisError as e:  # it expires on its own
            log.warning("worker registration %s not deleted: %s", self.key, e)

    def _renew(self) -> None:
        while not self._stopped.wait(RENEW_S):
            try:
                self._write()
            except redis.RedisError as e:  # Redis away for a moment: the next renewal tries again
                log.warning("worker registration %s not renewed: %s", self.key, e)

    def _write(self) -> None:
        self.client.set(self.key, self.value, ex=EXPIRY_S)
