"""Terra's phases as `jax.profiler` annotations, next to XLA's own ops.

While a profile is being captured (`jax.profiler.trace(dir)`,
`jax.profiler.start_trace`, or a TensorBoard/XProf capture through
`jax.profiler.start_server`), each step is a `StepTraceAnnotation` (XProf's
step markers) named after the step function, with its phase; fetches
(Python waiting for a value), segment dispatches, divergences and compiles
are `TraceAnnotation`s on the thread that did them. Otherwise every site costs
one `TraceAnnotation.is_enabled()` call.
"""
from __future__ import annotations

import contextlib
from typing import ContextManager

from jax.profiler import StepTraceAnnotation, TraceAnnotation

OFF = contextlib.nullcontext()  # the span of a site while no profile is captured


def step(fn: str, number: int, phase: str) -> ContextManager:
    """The span of one step call (`fn`, step `number`, starting in `phase`)."""
    if not TraceAnnotation.is_enabled():
        return OFF
    return StepTraceAnnotation(annotation_name(fn), step_num=number, phase=phase)


def annotation_name(fn: str) -> str:
    """A step function's telemetry name as a profiler name: `#` starts TraceMe metadata."""
    return fn.replace("#", "/")


def span(name: str, **metadata) -> ContextManager:
    """A named span on the current thread (`terra fetch`, `terra dispatch`, ...)."""
    if not TraceAnnotation.is_enabled():
        return OFF
    return TraceAnnotation(name, **metadata)


def mark(name: str, **metadata) -> None:
    """An instant (a zero-length span): a divergence."""
    if TraceAnnotation.is_enabled():
        with TraceAnnotation(name, **metadata):
            pass


def active() -> bool:
    return TraceAnnotation.is_enabled()
