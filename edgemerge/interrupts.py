"""Ctrl-C that reaches the user while llama.cpp runs.

llama.cpp calls back into Python (llama-cpp-python's log callback) from inside its C functions. Python runs a
pending SIGINT handler at the first bytecode it executes, which is then the callback's: the KeyboardInterrupt
is raised inside a ctypes callback, printed as "Exception ignored" and lost, and the call carries on. Around
every llama.cpp call, `llama_call` replaces Python's SIGINT handler by one that only records the signal, and
raises KeyboardInterrupt once the call has returned (or at `raise_if_interrupted`, which Python code that
llama-cpp-python runs between its C calls may use). Long calls with no such point (quantization) run in a
child process instead, which the parent kills (see quantize.py).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

_state = {"depth": 0, "pending": False}


def _record(signum: int, frame: object) -> None:
    _state["pending"] = True


def raise_if_interrupted(*_args: object) -> bool:
    """Raise KeyboardInterrupt if Ctrl-C came during a `llama_call`; else False (a llama-cpp-python stopping
    criterion: "do not stop")."""
    if _state["pending"]:
        _state["pending"] = False
        raise KeyboardInterrupt
    return False


@contextlib.contextmanager
def llama_call() -> Iterator[None]:
    """Defer SIGINT while the block runs (a llama.cpp call), then raise it as KeyboardInterrupt.

    A no-op outside the main thread (only it receives signals) and when SIGINT does not raise
    KeyboardInterrupt anyway (ignored, or a handler of the application's own)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if _state["depth"] > 0:  # nested: the outermost call installed the handler and raises
        _state["depth"] += 1
        try:
            yield
        finally:
            _state["depth"] -= 1
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous is not signal.default_int_handler:
        yield
        return
    _state["depth"], _state["pending"] = 1, False
    signal.signal(signal.SIGINT, _record)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _state["depth"] = 0
        raise_if_interrupted()
