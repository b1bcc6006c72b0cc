"""Typed, frozen configuration for every stage of the workbench.

Every field has a default (the paper's where the paper has one) and a one-line
reason; invalid values raise ``ValueError`` at construction naming the allowed range.
Configs are saved in every manifest, checkpoint and result record via ``to_dict``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


class _Config:
    """Shared helpers: dict round trip and ``key=value`` overrides with type checks."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; known: {sorted(names)}")
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name in values:
                v = values[f.name]
                if isinstance(v, list):
                    v = tuple(v)
                kwargs[f.name] = v
        return cls(**kwargs)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    @classmethod
    def parse_value(cls, key: str, text: str) -> Any:
        """Parse the string ``text`` for field ``key`` into the field's type."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if key not in fields:
            raise ValueError(f"unknown {cls.__name__} key {key!r}; known: {sorted(fields)}")
        default = getattr(cls(), key)
        try:
            if isinstance(default, bool):
                low = text.strip().lower()
                if low not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return low in ("true", "1", "yes")
            if isinstance(default, int):
                return int(text)
            if isinstance(default, float):
                return float(text)
            if isinstance(default, tuple):
                parts = [p for p in text.split(",") if p.strip()]
                inner = type(default[0]) if default else str
                return tuple(inner(p.strip()) for p in parts)
            if default is None:
                low = text.strip().lower()
                if low in ("none", "null", ""):
                    return None
                try:
                    return float(text)
                except ValueError:
                    return text
            return text
        except ValueError:
            raise ValueError(
                f"{cls.__name__}.{key}: cannot read {text!r} as {type(default).__name__}"
            ) from None


@dataclass(frozen=True)
class PreprocessConfig(_Config):
    """How raw interactions become a dataset (paper: RecBole 1.2 defaults)."""

    dedup: str = "exact"  # "none" | "exact" (drop identical user,item,timestamp rows) | "first" (keep a user's first interaction with an item)
    user_core: int = 5  # iterative k-core on users (paper: 5)
    item_core: int = 5  # iterative k-core on items (paper: 5)
    max_length: int = 50  # T: sequences are left-truncated to the last T items (paper: 50)

    def __post_init__(self) -> None:
        _check(self.dedup in ("none", "exact", "first"),
               f"dedup must be 'none', 'exact' or 'first', got {self.dedup!r}")
        _check(self.user_core >= 0, f"user_core must be >= 0, got {self.user_core}")
        _check(self.item_core >= 0, f"item_core must be >= 0, got {self.item_core}")
        _check(2 <= self.max_length <= 1024, f"max_length must be in [2, 1024], got {self.max_length}")


@dataclass(frozen=True)
class SplitConfig(_Config):
    """How a dataset is split into training, validation and test examples."""

    kind: str = "leave_one_out"  # "leave_one_out" (paper) | "temporal" (one global cut-off)
    valid_quantile: float = 0.8  # temporal: validation cut-off at this quantile of interaction times
    test_quantile: float = 0.9  # temporal: test cut-off at this quantile of interaction times
    max_length: int = 50  # T of the built tensors (paper: 50)

    def __post_init__(self) -> None:
        _check(self.kind in ("leave_one_out", "temporal"),
               f"split kind must be 'leave_one_out' or 'temporal', got {self.kind!r}")
        _check(0.0 < self.valid_quantile < self.test_quantile < 1.0,
               f"need 0 < valid_quantile < test_quantile < 1, got {self.valid_quantile}, {self.test_quantile}")
        _check(2 <= self.max_length <= 1024, f"max_length must be in [2, 1024], got {self.max_length}")
