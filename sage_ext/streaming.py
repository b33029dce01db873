"""Streaming a speculative generation as a Python iterator (`SpeculativeGenerator.stream`, `sage_ext.stream`).

The engine has one decoding loop, which reports its tokens through the ``streamer`` hook (``put`` / ``end``,
like transformers' streamers). `GenerationStream` runs that same ``generate`` call in a worker thread with a
queue-backed streamer and yields, in the caller's thread, what the hook received: the new tokens of every
step as a 1-D LongTensor, or, given a tokenizer, the decoded text pieces (transformers' `TextStreamer`
decoding: a piece ends at a word boundary, the rest comes with ``end()``). No second code path for a step.

Leaving early (``close()``, ``stop()``, a ``with`` block, the iterator being garbage-collected after a
``break``) stops the generation at its next step; an exception raised by ``generate`` is raised again in the caller's thread. After the last
piece, ``stream.output`` holds the ``GenerationOutput`` (sequences, stats) of the run.
"""
from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Iterator

import torch
from torch import Tensor
from transformers import TextStreamer

_DONE = object()


class _Cancelled(Exception):
    """Raised inside the worker thread's streamer hook when the consumer stopped iterating."""


class _TokenQueue:
    """Streamer hook that forwards each step's new tokens (after the prompt) to a queue."""

    def __init__(self, out: queue.Queue, cancelled: threading.Event):
        self._out, self._cancelled = out, cancelled
        self._prompt_seen = False

    def put(self, value: Tensor) -> None:
        if self._cancelled.is_set():
            raise _Cancelled
        if not self._prompt_seen:  # the engine (like HF) sends the prompt first
            self._prompt_seen = True
            return
        self._out.put(value.reshape(-1).clone())

    def end(self) -> None:
        pass


class _TextQueue(TextStreamer):
    """transformers' TextStreamer decoding, with the finished text pieces sent to a queue instead of stdout."""

    def __init__(self, tokenizer, out: queue.Queue, cancelled: threading.Event, **decode_kwargs):
        super().__init__(tokenizer, skip_prompt=True, **decode_kwargs)
        self._out, self._cancelled = out, cancelled

    def put(self, value: Tensor) -> None:
        if self._cancelled.is_set():
            raise _Cancelled
        super().put(value)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self._out.put(text)


def _work(generate, kwargs, streamer, out: queue.Queue, result: dict, threads: int) -> None:
    """The worker thread: the engine's ``generate`` with the queue streamer; always ends the queue."""
    torch.set_num_threads(threads)  # torch's intra-op thread count is per thread: keep the caller's
    try:
        result["output"] = generate(**kwargs, streamer=streamer)
    except _Cancelled:
        pass
    except BaseException as error:  # noqa: BLE001 - handed to the consumer's thread
        result["error"] = error
    finally:
        out.put(_DONE)


class GenerationStream:
    """Iterator over a running generation's output pieces (str with a tokenizer, else 1-D LongTensor per step).

    ``output`` is the run's ``GenerationOutput`` once the iteration has finished (None before).
    """

    def __init__(self, generate: Callable[..., Any], kwargs: dict[str, Any], tokenizer=None,
                 skip_special_tokens: bool = True):
        if kwargs.get("streamer") is not None:
            raise ValueError("stream() makes its own streamer; call generate(streamer=...) to pass one")
        self._queue: queue.Queue = queue.Queue()
        self._cancelled = threading.Event()
        self._result: dict[str, Any] = {}  # "output" or "error", written by the worker
        self._closed = False
        if tokenizer is not None:
            decoder = getattr(tokenizer, "tokenizer", tokenizer)  # a processor: its tokenizer decodes
            streamer = _TextQueue(decoder, self._queue, self._cancelled, skip_special_tokens=skip_special_tokens)
        else:
            streamer = _TokenQueue(self._queue, self._cancelled)
        # the worker holds no reference to this object, so dropping the iterator (-> __del__) stops the generation
        self._thread = threading.Thread(
            target=_work, args=(generate, kwargs, streamer, self._queue, self._result, torch.get_num_threads()),
            name="sage_ext-stream", daemon=True)
        self._thread.start()

    @property
    def output(self):
        """The run's ``GenerationOutput`` once the iteration has ended; None before (and after an early stop)."""
        return self._result.get("output")

    def __iter__(self) -> Iterator:
        return self

    def __next__(self):
        if self._closed:
            raise StopIteration
        item = self._queue.get()
        if item is _DONE:
            self._queue.put(_DONE)  # later calls stop again
            self._thread.join()
            error = self._result.pop("error", None)
            if error is not None:
                raise error
            raise StopIteration
        return item

    def stop(self) -> None:
        """Ask the generation to stop at its next step (returns at once; ``close`` also waits for it)."""
        self._cancelled.set()

    def close(self) -> None:
        """Stop the generation at its next step and wait for the worker thread; the iteration ends here."""
        self._cancelled.set()
        self._thread.join()
        self._closed = True

    def __enter__(self) -> "GenerationStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        cancelled = getattr(self, "_cancelled", None)  # None when __init__ refused its arguments
        if cancelled is not None:
            cancelled.set()
