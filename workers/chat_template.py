"""A model's chat template: compiled when the model loads, rendered in Jinja's immutable sandbox
under a time budget.

A template is code from the model folder, run on every conversation. A broken one (a syntax error,
an unknown filter, something the sandbox forbids even for a one-line conversation, a loop that
never ends) is refused when the model loads, so a worker or `pipeline run` does not start on it. A
conversation the template cannot render (its own `raise_exception`, a method that does not exist,
a sandbox violation, running out of time) is that request's `ChatTemplateError`, nobody else's.

The time budget: Jinja compiles a template to Python, so a loop in it runs Python lines. While a
template renders, its thread has a trace function that raises once the deadline has passed
(`sys.settrace` is per thread: other threads run untraced). It sees lines of the template's own
code and every Python call, which is where a template spends its time. What tracing cannot stop is
a single long C operation, so the two that a template can make arbitrarily long, `*` on a string or
a list and `**`, are bounded by the sandbox instead.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from datetime import datetime
from types import FrameType
from typing import Any

from jinja2 import TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from workers.errors import ChatTemplateError

log = logging.getLogger(__name__)

RENDER_BUDGET_S = 10.0  # a normal template renders in milliseconds
MAX_REPEAT_ITEMS = 10_000_000  # `"x" * n` or `[x] * n` longer than this is refused
MAX_POWER_BITS = 1_000_000  # `a ** b` whose integer result would be longer than this is refused
PROBE = ({"role": "user", "content": "Hello"},)  # rendered at load: it must not break the sandbox or hang
_TEMPLATE_FILE = "<template>"  # the file name Jinja gives the code of a template built from a string


class _Sandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox, with `*` and `**` bounded (see the module docstring)."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_REPEAT_ITEMS:
                    raise SecurityError(f"repeating a sequence {n:,} times makes more than {MAX_REPEAT_ITEMS:,} items")
        if operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0 \
                and left.bit_length() * right > MAX_POWER_BITS:
            raise SecurityError(f"the power {left} ** {right} is too large to compute")
        return super().call_binop(context, operator, left, right)


class _OverBudget(Exception):
    """Raised inside the rendering thread when the budget has run out (caught in `render`)."""


class ChatTemplate:
    """A compiled chat template. `origin` names where it came from, for messages."""

    def __init__(self, source: str, origin: str, *, bos_token: str, eos_token: str,
                 budget_s: float = RENDER_BUDGET_S) -> None:
        """Compiles `source` and renders a one-message conversation with it; raises ValueError
        (one line, naming `origin`) when it does not compile, breaks the sandbox or overruns the
        budget there. A probe that the template refuses (its own raise_exception, say) is fine."""
        if not budget_s > 0:
            raise ValueError(f"chat template budget_s={budget_s!r} must be a positive number of seconds")
        self.origin, self.budget_s = origin, budget_s
        self._tokens = {"bos_token": bos_token, "eos_token": eos_token}
        env = _Sandbox(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_template_error
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(source)
        except TemplateSyntaxError as e:
            raise ValueError(f"{origin}: the chat template does not compile: {_one_line(e.message)} "
                             f"(template line {e.lineno}); fix the template or remove it") from None
        try:
            self.render(list(PROBE))
        except ChatTemplateError as e:
            if e.cause in ("sandbox", "budget"):
                raise ValueError(f"{origin}: the chat template fails on a one-message conversation: {e}; "
                                 "fix the template or remove it") from None
            if e.cause == "render":  # it may only need what a probe lacks (a system message, say)
                log.warning("%s: the chat template fails on a one-message conversation (%s); chat lines it "
                            "cannot render fail with chat_template_error", origin, e)

    def render(self, messages: list[dict[str, Any]]) -> str:
        """The prompt text for `messages`, ending where the assistant's answer begins. Raises
        ChatTemplateError when the template cannot render them within the budget."""
        try:
            return _within(self.budget_s, lambda: self._template.render(
                messages=messages, add_generation_prompt=True, **self._tokens))
        except _OverBudget:
            raise ChatTemplateError(f"the chat template did not finish rendering within {self.budget_s:g} s",
                                    "budget") from None
        except ChatTemplateError:
            raise
        except SecurityError as e:
            raise ChatTemplateError(f"the chat template did something the sandbox forbids: {_one_line(e)}",
                                    "sandbox") from None
        except Exception as e:  # noqa: BLE001 - whatever the template's code raised is this request's failure
            raise ChatTemplateError(f"the chat template failed on these messages: {type(e).__name__}: "
                                    f"{_one_line(e)}", "render") from None


def _within(budget_s: float, call: Callable[[], str]) -> str:
    """`call()`, with a trace function on this thread that raises `_OverBudget` past the deadline."""
    deadline = time.monotonic() + budget_s

    def trace(frame: FrameType, event: str, arg: Any) -> Any:
        if time.monotonic() > deadline:
            raise _OverBudget
        # Line events only in the template's own code: its loops are where the time goes.
        return trace if frame.f_code.co_filename == _TEMPLATE_FILE else None

    previous = sys.gettrace()
    sys.settrace(trace)
    try:
        return call()
    finally:
        sys.settrace(previous)


def _raise_template_error(message: str) -> None:
    raise ChatTemplateError(f"the chat template refused the messages: {message}", "refused")


def _one_line(text: object) -> str:
    line = " ".join(str(text).split()).rstrip(".")
    return line if len(line) <= 300 else line[:297] + "..."
