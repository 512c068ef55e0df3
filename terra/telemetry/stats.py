"""Counters a user or a test can read: `step_fn.stats()` (always on, no cost)."""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class Stats:
    """What happened to one `terra.function` so far.

    Every call is counted once in `steps` and once in exactly one of `traced`,
    `coexecuted`, `fallbacks` or `eager` (a call Terra failed in mid-step counts
    in `internal_errors` instead).

    Example:
        >>> s = train_step.stats()
        >>> s.coexecuted, s.fallbacks, s.compiles        # doctest: +SKIP
    """

    steps: int = 0            # calls
    traced: int = 0           # steps run eagerly while recording a trace
    coexecuted: int = 0       # steps co-executed to their end (the graph ran them)
    divergences: int = 0      # steps where Python left the graph's path
    fallbacks: int = 0        # steps that started co-executed, diverged and finished eagerly
    compiles: int = 0         # graphs generated and compiled (one per TraceGraph version)
    segments_compiled: int = 0
    segments_dispatched: int = 0
    operators_replayed: int = 0  # `x + y` and friends entered from the graph, not run by JAX
    operators_reapplied: int = 0 # ... applied while tracing as the op they applied before
    feeds: int = 0            # Python values fed to the graph (live and predicted)
    fetches: int = 0          # values Python asked for
    fetch_waits: int = 0      # fetches that had to wait for the graph (sync points)
    cone_evaluations: int = 0 # values computed eagerly because no segment produced them
    eager: int = 0            # steps run without Terra (disabled, given up, nested)
    internal_errors: int = 0  # Terra failures that fell back to eager
    step_seconds: float = 0.0 # wall time inside steps that started co-executed (coexecuted + fallbacks)
    wait_seconds: float = 0.0 # of which Python was blocked waiting for the graph
    warmup_seconds: float = 0.0  # Python waited for the first graph to compile (warm-up)
    paths: int = 0            # distinct step endings in the TraceGraph
    resumed: bool = False     # the TraceGraph was loaded from TERRA_CACHE_DIR
    last_divergence: str = ""
    gave_up: str = ""

    def as_dict(self) -> dict:
        return asdict(self)
