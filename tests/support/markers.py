"""Which tests need which services, as pytest markers a developer selects with `-m`:

- `postgres`: a PostgreSQL server (the shared one at PIPELINE_TEST_POSTGRES_URL, or a private one);
- `redis`: the Redis at PIPELINE_BROKER_URL;
- `workers`: real worker processes (these need Redis too, so they are marked `redis` as well).

Marks come from the fixtures a test uses (`FIXTURE_MARKERS`, applied at collection by
tests/conftest.py), or are written on the test. They are enforced: the fixtures and helpers that
reach a service call `require_marker`, which fails a test that reaches it unmarked, so the marks
cannot drift from what the tests do.
"""

from __future__ import annotations

import pytest

MARKERS = ("postgres", "redis", "workers")  # registered, with their meaning, in pyproject.toml
# fixture name -> the markers every test using it gets (fixtures see their own dependencies too).
FIXTURE_MARKERS = {"pg_admin": ("postgres",), "redis_client": ("redis",), "module_server": ("redis",)}
IMPLIED = {"workers": ("redis",)}

_current: pytest.Item | None = None


def markers_for(item: pytest.Item) -> set[str]:
    """The markers `item` gets from its fixtures, its parameters and the markers it implies."""
    names = {m.name for m in item.iter_markers() if m.name in MARKERS}
    for fixture in getattr(item, "fixturenames", ()):
        names.update(FIXTURE_MARKERS.get(fixture, ()))
    callspec = getattr(item, "callspec", None)
    # Fixtures parametrised on both databases (`db_url`) ask for `pg_url` by name only for "postgresql".
    if callspec is not None and any(isinstance(v, str) and v == "postgresql" for v in callspec.params.values()):
        names.add("postgres")
    for name in list(names):
        names.update(IMPLIED.get(name, ()))
    return names


def track(item: pytest.Item | None) -> None:
    """Remembers the running test (tests/conftest.py calls this around each test)."""
    global _current
    _current = item


def require_marker(name: str) -> None:
    """Fails the running test unless it carries marker `name`."""
    if _current is not None and _current.get_closest_marker(name) is None:
        pytest.fail(f"{_current.nodeid} reaches what marker `{name}` stands for but is not marked: "
                    f"add @pytest.mark.{name}", pytrace=False)
