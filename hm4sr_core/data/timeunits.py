"""Seconds or milliseconds: the unit of a timestamp column, decided from the data.

Files say nothing about their unit, and the two differ by a factor of 1,000: an Amazon
2014 file in milliseconds would put its reviews in the year 45,000, an Amazon 2023 file
in seconds in January 1970. The rule (docs/guide.md, "Timestamps"), with M the largest
value and W the calendar window 1990-01-01 .. 2100-01-01 UTC:

1. M read in the format's own unit (seconds; milliseconds for Amazon 2023) falls in W:
   that unit.
2. Else M read in the other unit falls in W: the other unit, said in the output.
3. Else M read in the format's unit falls before 2100: the format's unit. Small numbers
   are a relative clock (synthetic worlds, hand-written files), whose gaps are read as
   seconds (milliseconds for Amazon 2023) as before.
4. Else refused, naming the row and the value.

When milliseconds are chosen, a value that falls in W only when read as seconds is
refused as a mixed unit (one file, one unit).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from .schema import DataError

WINDOW = (631_152_000, 4_102_444_800)  # 1990-01-01 and 2100-01-01 00:00 UTC, in seconds
PER_SECOND = {"seconds": 1, "milliseconds": 1000}
SECONDS_PER_DAY = 86_400  # the one definition: data, analysis, introspection, recommend and widgets read it here


def _date(seconds: float) -> str:
    if seconds >= 253_402_300_800:  # pandas stops at 2262; say the year instead
        return f"year {int(1970 + seconds // 31_556_952):,}"
    return pd.Timestamp(int(seconds), unit="s", tz="UTC").strftime("%Y-%m-%d")


def _in_window(seconds: float) -> bool:
    return WINDOW[0] <= seconds < WINDOW[1]


@dataclass(frozen=True)
class TimeUnit:
    """The unit chosen for a column, and why."""

    unit: str  # "seconds" or "milliseconds"
    declared: str  # the format's own unit
    largest: float  # the largest value in the file

    def note(self) -> str:
        """One line for the output and the manifest."""
        last = _date(self.largest / PER_SECOND[self.unit])
        if self.unit == self.declared:
            return f"{self.unit} (the format's unit; the latest timestamp is {last})"
        other = _date(self.largest / PER_SECOND[self.declared])
        return (f"{self.unit}, not the format's {self.declared}: the largest value {self.largest:.0f} is {other} "
                f"as {self.declared} and {last} as {self.unit}; converted to seconds")


def detect_unit(values: np.ndarray, declared: str, where: str, rows: np.ndarray | None = None) -> TimeUnit:
    """The unit of ``values`` ((n,) non-negative numbers) by the module's rule.

    ``declared``: the format's unit; ``where``: the file, for messages; ``rows``: each
    value's line number (default: its 1-based position, called "row")."""
    if declared not in PER_SECOND:
        raise ValueError(f"declared unit {declared!r}: expected one of {', '.join(PER_SECOND)}")
    values = np.asarray(values)
    if len(values) == 0:
        return TimeUnit(declared, declared, 0.0)
    at = int(np.argmax(values))
    largest = float(values[at])
    other = "milliseconds" if declared == "seconds" else "seconds"
    if _in_window(largest / PER_SECOND[declared]):
        unit = declared
    elif _in_window(largest / PER_SECOND[other]):
        unit = other
    elif largest / PER_SECOND[declared] < WINDOW[1]:
        unit = declared
    else:
        raise DataError(f"{where}: {_row(at, rows)}, column 'timestamp': {largest:.0f} is {_date(largest)} as seconds "
                        f"and {_date(largest / 1000)} as milliseconds; expected Unix seconds or milliseconds "
                        f"of a date between 1990 and 2100 (docs/guide.md, 'Timestamps')")
    if unit == "milliseconds":
        seconds_like = (values < WINDOW[0] * 1000) & (values >= WINDOW[0])
        if seconds_like.any():
            bad = int(np.flatnonzero(seconds_like)[0])
            raise DataError(f"{where}: {_row(bad, rows)}, column 'timestamp': {float(values[bad]):.0f} is "
                            f"{_date(values[bad])} as seconds, but the largest value {largest:.0f} is milliseconds "
                            f"({_date(largest / 1000)}); expected one unit in a file")
    return TimeUnit(unit, declared, largest)


def _row(index: int, rows: np.ndarray | None) -> str:
    return f"line {int(rows[index])}" if rows is not None else f"row {index + 1}"


def to_seconds(values: np.ndarray, unit: str) -> np.ndarray:
    """(n,) int64 seconds, floored; integers are divided exactly."""
    values = np.asarray(values)
    if np.issubdtype(values.dtype, np.integer):
        return values.astype(np.int64) // PER_SECOND[unit]
    return np.floor(values.astype(np.float64) / PER_SECOND[unit]).astype(np.int64)
