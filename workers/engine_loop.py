"""One engine shared by many callers: a thread steps it while callers wait on futures.

A worker process runs several tasks at once (threads); each hands its requests to the loop, and
the scheduler batches them together in the same steps, which is where continuous batching and the
shared prefix cache pay off. The engine itself is not thread-safe: only the loop thread touches it.

The loop thread also builds the engine, so every torch operation of the process runs on that one
thread. PyTorch's OpenMP pool is per calling thread: an engine built (or warmed up) on one thread
and stepped on another leaves two thread teams competing for the cores, and its steps ran 10-12%
slower here (2 CPU cores) than the same engine built and stepped on one thread.

A step that raises cannot tell which of its requests broke it, and it may hold requests of several
callers (tasks). So every request it held runs again, alone and one at a time: the innocent ones
complete with the outputs they would have had, and a request that makes the engine raise even
alone (a poison request) fails by itself with `RequestEngineError`. Only this loop knows which
requests shared the step, which is why the isolation lives here and not in its callers.
"""

from __future__ import annotations

import logging
import threading
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

from workers.engine import LLMEngine, Prompt
from workers.errors import RequestEngineError
from workers.outputs import CompletionOutput
from workers.sampling import SamplingParams

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class _Submitted:
    """A request as its caller gave it, kept while it is in the engine so it can run again alone."""

    prompt: Prompt
    params: SamplingParams
    cache_salt: str | None
    future: Future


class EngineLoop:
    def __init__(self, build_engine: Callable[[], LLMEngine], name: str = "engine-loop") -> None:
        """Starts the loop thread, which calls `build_engine`; returns once the engine is built, or
        raises what `build_engine` raised."""
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._incoming: list[_Submitted] = []
        self._calls: list[tuple[Callable[[LLMEngine], Any], Future]] = []
        self._in_flight: dict[str, _Submitted] = {}  # engine request id -> its request
        self._closed = False
        # Engine steps completed (or failed): a caller's watchdog reads it to tell a busy engine from
        # a hung one. Written by the loop thread only; reading an int from another thread is safe.
        self.num_steps = 0
        built: Future = Future()
        self._thread = threading.Thread(target=self._run, args=(build_engine, built), name=name, daemon=True)
        self._thread.start()
        self.engine: LLMEngine = built.result()

    def submit(self, prompt: Prompt, params: SamplingParams, cache_salt: str | None = None) -> Future:
        """Queues one request; the future resolves to its CompletionOutput, or raises the
        ValueError the engine gave for it (a prompt too long, say), or `RequestEngineError` when the
        engine raised while running it alone."""
        future: Future = Future()
        with self._wake:
            if self._closed:
                raise RuntimeError("the engine loop is closed")
            self._incoming.append(_Submitted(prompt, params, cache_salt, future))
            self._wake.notify()
        return future

    def call(self, fn: Callable[[LLMEngine], T]) -> T:
        """Runs `fn(engine)` on the loop thread between two steps (the engine is not thread-safe)
        and returns its result, or raises what it raised. For cache work: pins, snapshots, stats."""
        future: Future = Future()
        with self._wake:
            if self._closed:
                raise RuntimeError("the engine loop is closed")
            self._calls.append((fn, future))
            self._wake.notify()
        return future.result()

    def generate(
        self, prompts: Sequence[Prompt], params: Sequence[SamplingParams], cache_salt: str | None = None
    ) -> list[CompletionOutput | ValueError | RequestEngineError]:
        """Completes every prompt, in order; a prompt the engine refused (ValueError) or one that
        made it raise when run alone (RequestEngineError) comes back as that error instead of
        failing the others."""
        futures = [self.submit(p, sp, cache_salt) for p, sp in zip(prompts, params, strict=True)]
        results: list[CompletionOutput | ValueError | RequestEngineError] = []
        for future in futures:
            try:
                results.append(future.result())
            except (ValueError, RequestEngineError) as e:
                results.append(e)
        return results

    @property
    def num_in_flight(self) -> int:
        """Requests handed to the loop and not finished (queued for the engine or in it)."""
        with self._lock:
            return len(self._incoming) + len(self._in_flight)

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join()

    def _run(self, build_engine: Callable[[], LLMEngine], built: Future) -> None:
        try:
            built.set_result(build_engine())
        except BaseException as e:  # noqa: BLE001 - handed to the constructor, which raises it
            built.set_exception(e)
            return
        while True:
            with self._wake:
                while not self._incoming and not self._in_flight and not self._calls and not self._closed:
                    self._wake.wait()
                if self._closed and not self._incoming and not self._in_flight and not self._calls:
                    return
                incoming, self._incoming = self._incoming, []
                calls, self._calls = self._calls, []
            for fn, future in calls:
                try:
                    future.set_result(fn(self.engine))
                except BaseException as e:  # noqa: BLE001 - the caller's to handle
                    future.set_exception(e)
            for request in incoming:
                try:
                    request_id = self.engine.add_request(request.prompt, request.params, cache_salt=request.cache_salt)
                except ValueError as e:
                    request.future.set_exception(e)
                    continue
                self._in_flight[request_id] = request
            if not self._in_flight:
                continue
            try:
                finished = self._step()
            except Exception as e:  # noqa: BLE001 - isolated below, then the loop goes on
                # One line: the request that breaks the step fails alone below, its traceback kept
                # in its error (the error history), never on the user's terminal.
                log.warning("engine step failed (%s); running its %d requests again one at a time",
                            _one_line(e), len(self._in_flight))
                log.debug("the failed step's traceback", exc_info=True)
                self._isolate()
                continue
            for output in finished:
                self._in_flight.pop(output.request_id).future.set_result(output)

    def _isolate(self) -> None:
        """After a failed step: abort every request in flight, then run each again alone."""
        suspects = list(self._in_flight.items())
        self._in_flight.clear()
        for request_id, _ in suspects:
            self.engine.abort_request(request_id)
        # The failed step may have left blocks registered in the prefix cache but never written, or
        # NaN in blocks others will reuse; nothing holds blocks now.
        self.engine.scrub_kv_cache()
        for _, request in suspects:
            try:
                request.future.set_result(self._run_alone(request))
            except ValueError as e:  # refused on re-admission: not expected, but it is the request's error
                request.future.set_exception(e)
            except Exception as e:  # noqa: BLE001 - the request's own failure, reported to its caller
                log.warning("a request failed alone in the engine (%s); failing it", _one_line(e))
                self.engine.scrub_kv_cache()
                request.future.set_exception(RequestEngineError(
                    f"the engine failed on this request run alone: {type(e).__name__}: {e}", traceback.format_exc()))

    def _step(self) -> list[CompletionOutput]:
        try:
            return self.engine.step()
        finally:
            self.num_steps += 1

    def _run_alone(self, request: _Submitted) -> CompletionOutput:
        request_id = self.engine.add_request(request.prompt, request.params, cache_salt=request.cache_salt)
        try:
            while True:
                for output in self._step():
                    if output.request_id == request_id:
                        return output
        except BaseException:
            self.engine.abort_request(request_id)
            raise


def _one_line(error: BaseException) -> str:
    """`Type: message` on one line, cut short: for a log line, not for the error history."""
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text if len(text) <= 200 else text[:197] + "..."
