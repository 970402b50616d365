"""One engine shared by many callers: a thread steps it while callers wait on futures.

A worker process runs several tasks at once (threads); each hands its requests to the loop, and
the scheduler batches them together in the same steps, which is where continuous batching and the
shared prefix cache pay off. The engine itself is not thread-safe: only the loop thread touches it.

The loop thread also builds the engine, so every torch operation of the process runs on that one
thread. PyTorch's OpenMP pool is per calling thread: an engine built (or warmed up) on one thread
and stepped on another leaves two thread teams competing for the cores, and its steps ran 10-12%
slower here (2 CPU cores) than the same engine built and stepped on one thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future

from workers.engine import LLMEngine, Prompt
from workers.outputs import CompletionOutput
from workers.sampling import SamplingParams

log = logging.getLogger(__name__)


class EngineLoop:
    def __init__(self, build_engine: Callable[[], LLMEngine], name: str = "engine-loop") -> None:
        """Starts the loop thread, which calls `build_engine`; returns once the engine is built, or
        raises what `build_engine` raised."""
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._incoming: list[tuple[Prompt, SamplingParams, str | None, Future]] = []
        self._futures: dict[str, Future] = {}
        self._closed = False
        built: Future = Future()
        self._thread = threading.Thread(target=self._run, args=(build_engine, built), name=name, daemon=True)
        self._thread.start()
        self.engine: LLMEngine = built.result()

    def submit(self, prompt: Prompt, params: SamplingParams, cache_salt: str | None = None) -> Future:
        """Queues one request; the future resolves to its CompletionOutput, or raises the
        ValueError the engine gave for it (a prompt too long, say)."""
        future: Future = Future()
        with self._wake:
            if self._closed:
                raise RuntimeError("the engine loop is closed")
            self._incoming.append((prompt, params, cache_salt, future))
            self._wake.notify()
        return future

    def generate(
        self, prompts: Sequence[Prompt], params: Sequence[SamplingParams], cache_salt: str | None = None
    ) -> list[CompletionOutput | ValueError]:
        """Completes every prompt, in order; a prompt the engine refused comes back as its
        ValueError instead of failing the others."""
        futures = [self.submit(p, sp, cache_salt) for p, sp in zip(prompts, params, strict=True)]
        results: list[CompletionOutput | ValueError] = []
        for future in futures:
            try:
                results.append(future.result())
            except ValueError as e:
                results.append(e)
        return results

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
                while not self._incoming and not self._futures and not self._closed:
                    self._wake.wait()
                if self._closed and not self._incoming and not self._futures:
                    return
                incoming, self._incoming = self._incoming, []
            for prompt, params, salt, future in incoming:
                try:
                    request_id = self.engine.add_request(prompt, params, cache_salt=salt)
                except ValueError as e:
                    future.set_exception(e)
                    continue
                self._futures[request_id] = future
            if not self._futures:
                continue
            try:
                finished = self.engine.step()
            except Exception as e:  # noqa: BLE001 - every waiter must learn of it, then the loop goes on
                log.exception("engine step failed; failing the %d requests in flight", len(self._futures))
                for request_id, future in self._futures.items():
                    self.engine.abort_request(request_id)
                    future.set_exception(e)
                self._futures.clear()
                continue
            for output in finished:
                self._futures.pop(output.request_id).set_result(output)
