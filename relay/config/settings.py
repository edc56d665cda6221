"""A daemon's settings as an object whose attributes are the options of its schema table.

The attribute names are the TOML keys and the defaults those of the schema, so a setting is
declared once, in :mod:`relay.config.schema`; tests and the demo override what they need by
keyword, the daemons build theirs from what :mod:`relay.config.loading` read.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

from relay.config.loading import default_value
from relay.config.schema import Option

__all__ = ["Settings"]

_S = TypeVar("_S", bound="Settings")


class Settings:
    """Every option of :attr:`OPTIONS` as an attribute; a subclass adds what it derives."""

    OPTIONS: ClassVar[tuple[Option, ...]] = ()
    ROLE: ClassVar[str] = ""

    def __init__(self, **values: Any) -> None:
        """Schema defaults, replaced by ``values`` (parsed values, keyed like the TOML file).

        An unknown keyword is a TypeError, as for any function: a misspelt setting in a
        test must not silently leave the default in place.
        """
        unknown = set(values) - {opt.key for opt in self.OPTIONS}
        if unknown:
            raise TypeError(f"unknown {self.ROLE} settings: {', '.join(sorted(unknown))}")
        for opt in self.OPTIONS:
            setattr(self, opt.key, values[opt.key] if opt.key in values else default_value(opt))

    @classmethod
    def from_values(cls: type[_S], values: Mapping[str, Any]) -> _S:
        """Settings from a loader's result, which holds every option of the table."""
        return cls(**values)
