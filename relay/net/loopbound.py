"""Asyncio objects made inside the loop that uses them.

Before Python 3.10, ``asyncio.Lock``, ``Event``, ``Condition``, ``Semaphore`` and ``Queue``
bind to ``asyncio.get_event_loop()`` when they are created. One created before
``asyncio.run`` binds to a loop other than the one that later waits on it (the wait fails
with "attached to a different loop"), and under uvloop's event loop policy its creation
fails at once ("There is no current event loop"). The daemons, the ``--workers``
supervisor and the wrapper's parts may be built before their loop runs, so such objects
are attributes made on first use, from inside the running loop::

    class Hop:
        _lock = LoopBound(asyncio.Lock)

``tests/loopback/test_loop_bound.py`` keeps asyncio objects out of ``__init__``, class bodies and
module level in ``relay/`` and ``glidein_wrapper/``.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable, Generic, Optional, TypeVar, overload

T = TypeVar("T")


class LoopBound(Generic[T]):
    """A per-instance attribute made by ``factory()`` on first access, which must come from
    inside a running event loop (outside one it raises RuntimeError rather than binding the
    object to some other loop). Later accesses find it in the instance's ``__dict__``."""

    def __init__(self, factory: Callable[[], T]) -> None:
        self.factory = factory
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, obj: None, owner: Optional[type] = None) -> LoopBound[T]: ...

    @overload
    def __get__(self, obj: object, owner: Optional[type] = None) -> T: ...

    def __get__(self, obj: Any, owner: Optional[type] = None) -> Any:
        if obj is None:
            return self
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError(
                f"{type(obj).__name__}.{self.name} is an asyncio object: first use it inside "
                "the running event loop"
            ) from None
        value = self.factory()
        obj.__dict__[self.name] = value  # a non-data descriptor: the instance's wins from now
        return value
