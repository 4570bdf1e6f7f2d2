"""Ctrl-C during a run: the run stops within milliseconds and ends with reason ``interrupted``.

Python runs a signal handler only between bytecodes of the main thread, and the main thread spends a run
inside ``emu_start``, a C call (ctypes releases the GIL around it) that may not call back into Python for
seconds. So the signal also goes to a file descriptor (``signal.set_wakeup_fd``: CPython's C-level
handler writes the signal number there at once), where a watcher thread waits; it asks the running
machine to stop (``Machine.request_stop``, which makes Unicorn stop before the next counted instruction)
and repeats that every ``RETRY`` seconds until the run loop has noticed, in case the signal fell between
two chunks. The run loop then ends the run with the partial result.

What happens afterwards is the caller's choice: ``popek run`` prints the partial result and exits 130.
Code that starts several runs checks ``pending()`` between them; ``popek.monitors.run_guest`` raises
``KeyboardInterrupt`` when a SIGINT arrived since the last ``reset()``, so a loop of runs stops at the next
one instead of running every remaining run to its interruption.

Only the main thread can install signal handlers; a run in another thread is not interruptible this way.
"""
from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from popek.machine.machine import Machine

RETRY = 0.02

_lock = threading.Lock()
_running: list[Machine] = []        # machines in a run, innermost last
_received = threading.Event()       # a SIGINT arrived since reset()
_pipe: tuple[int, int] | None = None


def pending() -> bool:
    """A SIGINT arrived (during a run) since the last ``reset``."""
    return _received.is_set()


def reset() -> None:
    _received.clear()


def _watch(read_fd: int) -> None:
    while True:
        data = os.read(read_fd, 64)
        if signal.SIGINT not in data:
            continue
        _received.set()
        while True:
            with _lock:
                machines = [m for m in _running if m.end is None]
            if not machines:
                break
            for m in machines:
                m.request_stop()
            threading.Event().wait(RETRY)


def _start_watcher() -> int:
    global _pipe
    if _pipe is None:
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        threading.Thread(target=_watch, args=(read_fd,), name="popek-sigint", daemon=True).start()
        _pipe = (read_fd, write_fd)
    return _pipe[1]


def _on_sigint(signum, frame) -> None:
    """The Python-level handler: the watcher does the work; this only keeps KeyboardInterrupt away."""
    _received.set()


@contextmanager
def interruptible(machine: Machine):
    """Make ``machine``'s run stoppable by SIGINT while the block runs (a no-op outside the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    with _lock:
        _running.append(machine)
    outer = len(_running) == 1
    if outer:
        write_fd = _start_watcher()
        previous_handler = signal.signal(signal.SIGINT, _on_sigint)
        previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    try:
        if _received.is_set():
            machine.request_stop()          # Ctrl-C came just before this run: end it at once
        yield
    finally:
        with _lock:
            _running.remove(machine)
        if outer:
            signal.set_wakeup_fd(previous_fd)
            signal.signal(signal.SIGINT, previous_handler)
