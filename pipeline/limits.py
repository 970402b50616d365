"""Size limits on input files, lines and requests.

They protect the pipeline from inputs that would exhaust memory or a worker (DESIGN.md section 4,
Security): a limit breached by the whole file is an `InputError`; one breached by a line or a field
is a `LineError` for that line only, and the rest of the file still runs.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB


@dataclass(frozen=True, slots=True)
class InputLimits:
    """The limits `read_requests` enforces. Every value must be a positive integer.

    The defaults are chosen so that any sensible batch passes and nothing can blow up a process:

    - `max_file_bytes` (10 GiB): larger files should be split into several jobs; the reader streams,
      so this bounds disk use and job size, not memory.
    - `max_line_bytes` (8 MiB): one JSONL line (without its line ending). A longer line is a
      `line_too_long` error and is skipped in bounded chunks, never read into memory whole.
    - `max_prompt_chars` (1 Mi characters, about 250k tokens): a prompt, or the total content of a
      chat's messages. Far beyond today's context windows; the worker still checks the real context
      length once the prompt is tokenized.
    - `max_tokens` (32768): the ceiling for a request's `max_tokens` / `max_length`.
    - `max_stop_strings` (16): as many as the engine's sampler accepts (`workers/sampling.py`).
    - `max_messages` (1024): messages in one chat request.
    - `max_id_chars` (512): `custom_id`, `session_id` and `model`, which are stored and indexed in
      the database.
    """

    max_file_bytes: int = 10 * GiB
    max_line_bytes: int = 8 * MiB
    max_prompt_chars: int = 1 * MiB
    max_tokens: int = 32768
    max_stop_strings: int = 16
    max_messages: int = 1024
    max_id_chars: int = 512

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"InputLimits.{f.name}={value!r} must be a positive integer")


DEFAULT_LIMITS = InputLimits()


def format_bytes(num_bytes: int) -> str:
    """A byte count for messages: "8 MiB", "10 GiB", "10.5 GiB", "1,234 bytes"."""
    # The largest unit that fits, so that a size compares at a glance with a limit written in it
    # (not "10240.0 MiB" beside "10 GiB").
    for unit, size in (("GiB", GiB), ("MiB", MiB)):
        if num_bytes >= size:
            return f"{num_bytes // size} {unit}" if num_bytes % size == 0 else f"{num_bytes / size:.1f} {unit}"
    if num_bytes >= KiB and num_bytes % KiB == 0:
        return f"{num_bytes // KiB} KiB"
    return f"{num_bytes:,} bytes"
