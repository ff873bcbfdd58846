"""The rule's skip flag, handed straight to the code that holds the state.

:func:`skip_and_round` and the fused momentum step hold the rest of the state
on a step that the rule skipped. They could tell it from the rule's count,
``new.nonfinite_count != old.nonfinite_count``, but then every update that
reads the flag also reads the old count, which the new count overwrites in
place: in a scan-compiled training loop XLA:CPU fused that comparison into
each parameter update and copied the carried count first, every step (jax
0.10.2; XLA:TPU copied it too). So the rule reports the flag it computed, with
the state it returned, to whoever is collecting; the wrapper uses the flag if
the rule's state reached it unchanged (the same object, hence the same trace)
and falls back on the counts otherwise (a rule run inside a ``lax.cond``, for
example, returns a rebuilt state).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

import jax

Reports = list[tuple[Any, jax.Array]]

_REPORTS: contextvars.ContextVar[Reports | None] = contextvars.ContextVar(
    "rgclip_optax_skip_reports", default=None
)


def report(state: Any, flag: jax.Array) -> None:
    """Called by the rule's ``update``: ``flag`` says whether the step that
    returned ``state`` was skipped."""
    reports = _REPORTS.get()
    if reports is not None:
        reports.append((state, flag))


@contextlib.contextmanager
def collecting() -> Iterator[Reports]:
    """The reports of every rule update run inside the ``with`` block."""
    reports: Reports = []
    token = _REPORTS.set(reports)
    try:
        yield reports
    finally:
        _REPORTS.reset(token)


def skipped(reports: Reports, new: Any, old: Any) -> jax.Array:
    """Whether the rule skipped the step that turned its state ``old`` into
    ``new``: the flag it reported with ``new``, else from the counts."""
    for state, flag in reports:
        if state is new:
            return flag
    return new.nonfinite_count != old.nonfinite_count
