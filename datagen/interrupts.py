"""Ctrl-C that is never lost during a long data-generation run.

Python raises ``KeyboardInterrupt`` wherever the main thread is when SIGINT arrives; if that is
inside a finaliser or a weakref callback, Python prints "Exception ignored" and goes on, and the
run continues as if nothing had been pressed. Inside :func:`catching_interrupts` (the CLI's
runs) a SIGINT is remembered as well as raised, and :func:`raise_if_interrupted`, called by the
producers once per frame, raises it again if it was swallowed; the "Exception ignored"
traceback Python would print for it is left out (the run then ends with the CLI's one line on
the interrupt), while every other unraisable exception is printed as before. Outside the block,
and outside the main thread, Python's own handling is unchanged.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator

_interrupted = False


def _on_sigint(signum, frame) -> None:
    global _interrupted
    _interrupted = True
    raise KeyboardInterrupt


def _quiet_interrupts(previous):
    """An ``sys.unraisablehook`` that drops a swallowed ``KeyboardInterrupt`` (remembered, and
    raised again at the next frame) and hands anything else to ``previous``."""
    def hook(unraisable) -> None:
        global _interrupted
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            _interrupted = True
            return
        previous(unraisable)

    return hook


@contextlib.contextmanager
def catching_interrupts() -> Iterator[None]:
    """Remember SIGINT while the block runs (see the module docstring)."""
    global _interrupted
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _interrupted = False
    previous = signal.signal(signal.SIGINT, _on_sigint)
    hook = sys.unraisablehook
    sys.unraisablehook = _quiet_interrupts(hook)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        sys.unraisablehook = hook
        _interrupted = False


def raise_if_interrupted() -> None:
    """Raise ``KeyboardInterrupt`` again if a SIGINT arrived inside :func:`catching_interrupts`
    and the run is still going (its first raise was swallowed)."""
    if _interrupted:
        raise KeyboardInterrupt
