"""The valid range of each numeric flag, checked when the command line is parsed.

An arguments dataclass lists its numeric flags' `Range`s in its class attribute RANGES; `check_ranges` refuses a
value outside its range with one line naming the flag, the value and the range, and why where a bound is not
obvious. NaN is outside every range. An int flag without a stated upper bound is capped at INT64_MAX: counts and
seeds reach torch and numpy, which hold them as int64 and overflow beyond it. A float must also be finite.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..parallel.ds_config import ConfigError

INT64_MAX = 2**63 - 1


@dataclass(frozen=True)
class Range:
    low: float
    high: float | None = None  # None: INT64_MAX for an int, no bound but finiteness for a float
    low_open: bool = False
    high_open: bool = False
    why: str = ""  # why the upper bound is where it is

    def check(self, flag: str, value) -> None:
        if value is None:  # the flag was not given: its default applies
            return
        is_int = isinstance(value, int)
        high = self.high if self.high is not None else (INT64_MAX if is_int else math.inf)
        above = value > self.low if self.low_open else value >= self.low
        below = value < high if self.high_open or high == math.inf else value <= high
        if above and below:
            return
        shown = value if is_int else f"{value:g}"
        if is_int:  # ints: name the side that was crossed
            rule = (
                f"{'>' if self.low_open else '>='} {self.low}"
                if not above
                else f"{'<' if self.high_open else '<='} {high}"
            )
        else:
            rule = (
                f"in {'(' if self.low_open else '['}{self.low:g}, {high:g}"
                f"{')' if self.high_open or high == math.inf else ']'}"
            )
        reason = f" ({self.why})" if self.why and not below else ""
        raise ConfigError(f"--{flag}={shown} is invalid: must be {rule}{reason}")


def check_ranges(args) -> None:
    """Refuse the first flag of the arguments dataclass `args` whose value is outside its range (`args.RANGES`)."""
    for name, valid in args.RANGES.items():
        valid.check(name, getattr(args, name))
