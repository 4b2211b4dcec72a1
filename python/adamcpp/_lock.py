"""One call at a time: the lock every optimizer call takes (docs/api.md, "Concurrency").

A call from another thread waits (the GIL is released meanwhile); a call from
the thread already running one (Python code the call ran, such as a schedule)
is refused with a message naming the owner, instead of deadlocking. Native
(cpp/py/call_lock.cpp), so that a step's fast path takes and leaves it
without a Python call: `CallLock(owner)` with enter(), leave(), held_here()."""

from __future__ import annotations

from ._core import CallLock

__all__ = ["CallLock"]
