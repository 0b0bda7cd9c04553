"""How every benchmark measures and prints a figure, so that `make bench` reads as one table.

A figure is a measurement against a baseline measured in the same run (never an absolute
time, which says more about the machine than about deployhealth), its target, and whether
it meets it. Medians of at least `MIN_ROUNDS` rounds, with the rounds of the figure and its
baseline interleaved so that drift on the machine affects both alike.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

MIN_ROUNDS = 7


@dataclass(frozen=True)
class Figure:
    """One line of the results: `value` compared with `target` the way `better` says."""

    name: str
    value: float
    target: float
    # "lower": value <= target meets it (a ratio of costs); "higher": value >= target (a
    # ratio of throughputs).
    better: str = "lower"
    unit: str = "x"
    detail: str = ""  # the measured numbers behind the ratio, for the reader

    @property
    def meets(self) -> bool:
        return self.value <= self.target if self.better == "lower" else self.value >= self.target

    def line(self) -> str:
        bound = "<=" if self.better == "lower" else ">="
        mark = "pass" if self.meets else "MISS"
        text = (
            f"   [{mark}] {self.name}: {self.value:.2f}{self.unit} "
            f"(target {bound} {self.target:g}{self.unit})"
        )
        return f"{text}\n          {self.detail}" if self.detail else text


# Every figure printed in this run, for the summary at the end of `make bench`.
RECORDED: list[Figure] = []


def record(figure: Figure) -> Figure:
    RECORDED.append(figure)
    print(figure.line(), flush=True)
    return figure


def interleaved_medians(
    measured: Callable[[], object], baseline: Callable[[], object], rounds: int = MIN_ROUNDS
) -> tuple[float, float]:
    """Median seconds of `measured` and of `baseline`, rounds alternating between them."""
    if rounds < MIN_ROUNDS:
        raise ValueError(f"a figure needs at least {MIN_ROUNDS} rounds, not {rounds}")
    ours, theirs = [], []
    for _ in range(rounds):
        theirs.append(_seconds(baseline))
        ours.append(_seconds(measured))
    return statistics.median(ours), statistics.median(theirs)


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start
