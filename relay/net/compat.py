"""Work-arounds for bugs of Python versions the relay runs on; each is a no-op where the bug
is fixed."""

from __future__ import annotations

from typing import Any


def fix_writelines_flow_control() -> bool:
    """Make asyncio's socket transport pause its protocol after ``writelines()``.

    In CPython 3.12.0 to 3.12.8 and 3.13.0 to 3.13.1, ``writelines()`` of the selector
    socket transport buffers what the socket does not take but never calls
    ``pause_writing()``, unlike ``write()`` (CPython advisory PSF-2024-14). The relay's
    pumps write with ``writelines()``: on asyncio's own loop (``--no-uvloop``, or no uvloop)
    a fast sender and a slow receiver then meet no back-pressure, and the relay buffers the
    whole transfer in memory. This adds the missing check, as the upstream fix does. True
    if it was needed.
    """
    from asyncio import selector_events

    cls: Any = getattr(selector_events, "_SelectorSocketTransport")  # noqa: B009 - private
    original = cls.__dict__.get("writelines")
    if original is None or "_maybe_pause_protocol" in original.__code__.co_names:
        return False  # before 3.12 (the mixin's writelines calls write()), or fixed

    def writelines(self: Any, list_of_data: Any) -> None:
        original(self, list_of_data)
        self._maybe_pause_protocol()

    cls.writelines = writelines  # calling this again finds the check and does nothing
    return True
