"""How many tasks wait in each queue: the broker's lists, read directly from Redis.

kombu's Redis transport keeps a queue as one list per message-priority step: the queue's own name
for priority 0 (all our tasks) and `<name>\\x06\\x16<step>` for the others; all of them are counted.
With a key prefix (`redis_key_prefix`) every list name starts with it.
"""

from __future__ import annotations

import redis

from pipeline.queues import QUEUE_NAMES

PRIORITY_SEPARATOR = "\x06\x16"
PRIORITY_STEPS = (0, 3, 6, 9)  # kombu's default `priority_steps`


def queue_keys(key_prefix: str, queue: str) -> list[str]:
    return [f"{key_prefix}{queue}" if step == 0 else f"{key_prefix}{queue}{PRIORITY_SEPARATOR}{step}"
            for step in PRIORITY_STEPS]


def queue_depths(client: redis.Redis, key_prefix: str) -> dict[str, int]:
    """Tasks waiting per queue, highest priority first (not those a worker has taken). Raises
    redis.RedisError when Redis cannot be reached."""
    pipe = client.pipeline(transaction=False)
    for queue in QUEUE_NAMES:
        for key in queue_keys(key_prefix, queue):
            pipe.llen(key)
    counts = pipe.execute()
    n = len(PRIORITY_STEPS)
    return {queue: sum(counts[i * n:(i + 1) * n]) for i, queue in enumerate(QUEUE_NAMES)}
