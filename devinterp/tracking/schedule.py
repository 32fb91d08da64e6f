"""When λ̂ is estimated: every n-th step, explicit steps and log-spaced steps, plus step 0."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["Schedule", "log_spaced_steps"]


def log_spaced_steps(num: int, max_steps: int) -> list[int]:
    """About ``num`` steps spaced evenly in log-time over ``[1, max_steps]`` (duplicates dropped)."""
    if num < 1 or max_steps < 1:
        return []
    return sorted({int(s) for s in np.round(np.geomspace(1, max_steps, num))})


@dataclass(frozen=True)
class Schedule:
    """The steps at which λ̂ is estimated: the union of every n-th step, explicit steps and
    log-spaced steps (the papers use ~100 log-spaced steps union many linear ones), plus step 0
    (the initialization) when ``include_init``.

    Args:
        every_n_steps: every n-th step (n, 2n, ...).
        steps: explicit steps.
        log_spaced: about this many steps spaced evenly in log(step) over ``[1, max_steps]``.
        max_steps: the last training step; needed by ``log_spaced``.
        include_init: include step 0.

    Raises:
        ValueError: a non-positive interval, a negative step, ``log_spaced`` without
            ``max_steps``, or a schedule with no step at all.
    """

    every_n_steps: int | None = None
    steps: tuple[int, ...] = ()
    log_spaced: int | None = None
    max_steps: int | None = None
    include_init: bool = True
    _explicit: frozenset[int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.every_n_steps is not None and (
            not _is_int(self.every_n_steps) or self.every_n_steps < 1
        ):
            raise ValueError(f"every_n_steps must be an integer >= 1, got {self.every_n_steps!r}")
        if self.log_spaced is not None and (not _is_int(self.log_spaced) or self.log_spaced < 1):
            raise ValueError(f"log_spaced must be an integer >= 1, got {self.log_spaced!r}")
        bad = [s for s in self.steps if not _is_int(s) or s < 0]
        if bad:
            raise ValueError(f"steps must be integers >= 0, got {bad}")
        if self.log_spaced is not None and self.max_steps is None:
            raise ValueError("log_spaced needs the number of training steps: set max_steps "
                             "(or max_epochs with a dataloader of known length)")
        explicit = set(self.steps)
        if self.log_spaced is not None:
            explicit.update(log_spaced_steps(self.log_spaced, int(self.max_steps)))
        object.__setattr__(self, "_explicit", frozenset(explicit))
        if not explicit and self.every_n_steps is None and not self.include_init:
            raise ValueError("the schedule is empty: give every_n_steps, steps or log_spaced")

    def __contains__(self, step: object) -> bool:
        if not _is_int(step) or step < 0:
            return False
        if step == 0 and self.include_init:
            return True
        if step in self._explicit:
            return True
        return self.every_n_steps is not None and step > 0 and step % self.every_n_steps == 0

    def planned(self, max_steps: int | None = None) -> list[int]:
        """All scheduled steps up to ``max_steps`` (default: the schedule's own)."""
        last = self.max_steps if max_steps is None else max_steps
        if last is None:
            raise ValueError("planned() needs max_steps")
        out = {s for s in self._explicit if s <= last}
        if self.include_init:
            out.add(0)
        if self.every_n_steps is not None:
            out.update(range(self.every_n_steps, last + 1, self.every_n_steps))
        return sorted(out)

    def beyond(self, max_steps: int) -> list[int]:
        """Explicit steps that a run of ``max_steps`` steps never reaches."""
        return sorted(s for s in self._explicit if s > max_steps)


def _is_int(x: object) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)

