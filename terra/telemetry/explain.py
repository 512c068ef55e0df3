"""The explain report: where a step function syncs, diverges and compiles, and what to do.

`ExplainSink` aggregates events per step function (bounded: one entry per
source location); `render` turns one aggregate into text that names each sync
point and divergence by `file:line` with its source and gives concrete advice.
"""
from __future__ import annotations

import collections
import linecache
import threading
from dataclasses import dataclass, field

from terra.telemetry import divergence
from terra.telemetry.events import (
    COMPILE, DIVERGENCE, FETCH, GAVE_UP, INTERNAL_ERROR, STEP, Event,
)

_EVERY = 10  # the "do it every k-th step" the advice suggests
_FEW = 6     # this many variants of a divergence are learned once each; more keep coming
_KEYS = 64   # distinct variants remembered per divergence site


@dataclass
class FetchSite:
    """Every fetch made at one line of user code."""
    fetches: int = 0
    waits: int = 0            # fetches that found the value not computed yet: sync points
    wait_us: float = 0.0
    steps: int = 0            # distinct steps that fetched here
    in_step: bool = False     # fetched inside the step function (not by the loop around it)
    last_step: int = -1
    names: collections.Counter = field(default_factory=collections.Counter)
    ops: collections.Counter = field(default_factory=collections.Counter)


@dataclass
class DivergenceSite:
    """Every divergence at one line of user code for one cause."""
    count: int = 0
    reason: str = ""          # the latest one's
    keys: set = field(default_factory=set)   # distinct things Python did instead (bounded)
    new_keys: int = 0         # divergences that brought a key not seen before here

    def add(self, reason: str, key: str) -> None:
        self.count += 1
        self.reason = reason
        if key not in self.keys and len(self.keys) < _KEYS:
            self.keys.add(key)
            self.new_keys += 1

    @property
    def churning(self) -> bool:
        """New variants keep coming: Terra cannot learn them all (a few it learns once each)."""
        return len(self.keys) >= _FEW and 2 * self.new_keys >= self.count


@dataclass
class FunctionAggregate:
    """What one step function did, summed over its steps."""
    phases: collections.Counter = field(default_factory=collections.Counter)
    coexec_steps: int = 0
    coexec_us: float = 0.0
    coexec_wait_us: float = 0.0
    fetch_sites: dict = field(default_factory=dict)        # "file:line" -> FetchSite
    divergences: dict = field(default_factory=dict)        # (where, cause) -> DivergenceSite
    internal_errors: collections.Counter = field(default_factory=collections.Counter)
    compile_us: list = field(default_factory=list)
    graph: dict = field(default_factory=dict)               # the last compiled graph's size
    gave_up: str = ""


class ExplainSink:
    """Aggregates events into one `FunctionAggregate` per step function."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.functions: dict[str, FunctionAggregate] = {}

    def consume(self, events: list[Event]) -> None:
        with self._lock:
            for ev in events:
                if ev.kind in _HANDLERS:
                    agg = self.functions.setdefault(ev.fn, FunctionAggregate())
                    _HANDLERS[ev.kind](agg, ev, ev.data or {})

    def aggregate(self, fn: str) -> FunctionAggregate | None:
        with self._lock:
            return self.functions.get(fn)

    def close(self) -> None:
        pass


def _on_step(agg: FunctionAggregate, ev: Event, data: dict) -> None:
    phase = data.get("phase", "?")
    agg.phases[phase] += 1
    if phase == "coexec":
        agg.coexec_steps += 1
        agg.coexec_us += ev.dur_ns / 1000
        agg.coexec_wait_us += data.get("wait_us", 0.0)


def _on_fetch(agg: FunctionAggregate, ev: Event, data: dict) -> None:
    site = agg.fetch_sites.setdefault(data.get("where", "<unknown>"), FetchSite())
    site.fetches += 1
    site.in_step = site.in_step or bool(data.get("in_step"))
    if ev.step != site.last_step:
        site.steps += 1
        site.last_step = ev.step
    wait = data.get("wait_us", 0.0)
    if wait > 0:
        site.waits += 1
        site.wait_us += wait
    if data.get("name"):
        site.names[data["name"]] += 1
    if data.get("op"):
        site.ops[data["op"]] += 1


def _on_divergence(agg: FunctionAggregate, ev: Event, data: dict) -> None:
    site = (data.get("where", "<unknown>"), data.get("cause", "?"))
    agg.divergences.setdefault(site, DivergenceSite()).add(data.get("reason", "?"),
                                                          data.get("key", ""))


def _on_compile(agg: FunctionAggregate, ev: Event, data: dict) -> None:
    agg.compile_us.append(ev.dur_ns / 1000)
    agg.graph = data


def _on_gave_up(agg: FunctionAggregate, ev: Event, data: dict) -> None:
    agg.gave_up = data.get("reason", "")


def _on_internal_error(agg: FunctionAggregate, ev: Event, data: dict) -> None:
    agg.internal_errors[f"{data.get('doing', '?')}: {data.get('error', '?')}"] += 1


_HANDLERS = {STEP: _on_step, FETCH: _on_fetch, DIVERGENCE: _on_divergence, COMPILE: _on_compile,
             GAVE_UP: _on_gave_up, INTERNAL_ERROR: _on_internal_error}


# -- the report ----------------------------------------------------------------------
def source_line(where: str) -> str:
    """The stripped source text at `file:line` ('' when unavailable)."""
    path, _, line = where.rpartition(":")
    return linecache.getline(path, int(line)).strip() if line.isdigit() else ""


def render(fn: str, agg: FunctionAggregate | None, hybrid: list[str] = ()) -> str:
    """The explain report of one step function; `hybrid`: its hybridization lines."""
    lines = [f"terra explain: {fn}"]
    if agg is None or not agg.phases:
        lines.append("  no steps recorded")
        return "\n".join(lines)
    p = agg.phases
    total = sum(p.values())
    lines.append(f"  steps: {total} (tracing {p['tracing']}, co-executed {p['coexec']}, "
                 f"fell back {p['fallback']}, eager {p['eager'] + p['passthrough']})")
    if agg.graph:
        g = agg.graph
        lines.append(f"  graph: {g.get('paths', '?')} path(s), {g.get('segments', '?')} segment(s), "
                     f"{g.get('ops', '?')} ops")
    if agg.compile_us:
        c = agg.compile_us
        lines.append(f"  compiles: {len(c)}, {sum(c) / 1e6:.2f} s in total, mean {sum(c) / len(c) / 1e6:.2f} s "
                     "(on the compile thread; Python kept running)")
    if agg.coexec_steps:
        mean = agg.coexec_us / agg.coexec_steps / 1000
        wait = agg.coexec_wait_us / agg.coexec_steps / 1000
        share = 100 * agg.coexec_wait_us / agg.coexec_us if agg.coexec_us else 0.0
        lines.append(f"  co-executed step: mean {mean:.2f} ms, of which Python waited for the "
                     f"graph {wait:.2f} ms ({share:.0f}%)")
    if agg.fetch_sites:
        lines.append("  sync points (Python needed a value; 'waits' = the graph had not computed it yet):")
        for where, site in sorted(agg.fetch_sites.items(), key=lambda kv: -kv[1].wait_us):
            mean = site.wait_us / site.waits / 1000 if site.waits else 0.0
            lines.append(f"    {where}  `{source_line(where)}`")
            lines.append(f"        {site.fetches} fetches in {site.steps} steps, {site.waits} waits, "
                         f"mean wait {mean:.3f} ms")
    if agg.divergences:
        lines.append("  divergences (each finished its step eagerly and taught the graph a new path):")
        for (where, cause), site in _by_count(agg.divergences):
            lines.append(f"    {where}  `{source_line(where)}`  x{site.count}")
            lines.append(f"        {site.reason}")
            if len(site.keys) > 1 and not site.churning:
                lines.append(f"        {len(site.keys)} variants so far, each learned once "
                             "(an eager step and a compile each): nothing to change")
    for what, n in agg.internal_errors.most_common():
        lines.append(f"  internal error (step finished eagerly) x{n}: {what}")
    if agg.gave_up:
        lines.append(f"  stays eager: {agg.gave_up}")
    lines.extend(hybrid)
    advice = _advice(agg)
    if advice:
        lines.append("  advice:")
        lines.extend(f"    - {a}" for a in advice)
    return "\n".join(lines)


def _by_count(sites: dict) -> list:
    return sorted(sites.items(), key=lambda kv: -kv[1].count)


def _churn_advice(where: str, cause: str, site: DivergenceSite) -> str:
    """What to change where new variants keep arriving (each costs an eager step)."""
    what = (f"at {where} the step keeps meeting new variants ({len(site.keys)} distinct in "
            f"{site.count} divergences; each costs an eager step and a compile)")
    if cause == divergence.SHAPE:
        return (f"{what}: the shapes keep changing; pad them to a few fixed sizes "
                "(e.g. round lengths up to a multiple of 32) so the graph can learn them all")
    if cause == divergence.VALUE:
        return (f"{what}: a Python number baked into the op keeps changing; pass it as an array "
                "(jnp.asarray(x)) so it is fed instead of baked")
    if cause == divergence.BRANCH:
        return (f"{what}: Python keeps choosing new paths here; if a Python value (a counter, "
                "a random choice) selects the ops, compute both with jnp.where / jax.lax.cond "
                "so the path stays the same")
    return f"{what}: {site.reason}"


def _advice(agg: FunctionAggregate) -> list[str]:
    out = []
    steps = max(agg.coexec_steps, 1)
    for where, site in sorted(agg.fetch_sites.items(), key=lambda kv: -kv[1].wait_us):
        if site.waits < max(2, steps // 4):
            continue  # rare or free: not worth changing code for
        name = f"`{site.names.most_common(1)[0][0]}`" if site.names else "a value"
        if not site.names and site.ops:
            name = f"a `{site.ops.most_common(1)[0][0]}` result"
        text = source_line(where)
        share = 100 * (1 - 1 / _EVERY)  # of the waits, if the fetch happened every k-th step
        what = f"this fetch of {name} at {where} splits the graph and waited in {site.waits} steps"
        if text.startswith(("if ", "elif ", "while ", "assert ")):
            out.append(f"{what}: the branch needs the value every step. If it only selects "
                       "values, write it with jnp.where / jax.lax.cond so it stays in the graph; "
                       f"if it is a check, doing it every {_EVERY}th step would remove "
                       f"{share:.0f}% of the waits")
        elif "print(" in text or "log" in text:
            out.append(f"{what}: moving the print to every {_EVERY}th step "
                       f"(`if step % {_EVERY} == 0:`) would remove {share:.0f}% of the waits")
        elif any(host in text for host in ("np.", "numpy", ".tolist(", "__array__")):
            out.append(f"{what}: host (NumPy) code needs the value here. If that code can be "
                       "written with jnp it stays in the graph; otherwise the graph already runs "
                       "everything independent of it ahead, so the wait is the device time of "
                       "what it depends on")
        else:
            out.append(f"{what}: keep it as an array (e.g. append the array and convert after the "
                       f"loop), or convert every {_EVERY}th step to remove {share:.0f}% of the waits")
    for (where, cause), site in _by_count(agg.divergences)[:3]:
        if site.churning and site.count * 10 >= steps:
            out.append(_churn_advice(where, cause, site))
    if agg.gave_up:
        out.append("raise terra.function(max_graphs=...) if the new paths are few and stable, "
                   "or remove what changes the graph every step (see the divergences above)")
    if agg.coexec_steps and agg.coexec_us and not out:
        share = agg.coexec_wait_us / agg.coexec_us
        out.append("nothing to fix: Python waits for the graph "
                   f"{100 * share:.0f}% of the step; "
                   + ("the Python skeleton bounds the step (less Python per step is faster)"
                      if share < 0.5 else "the graph bounds the step (the device is the limit)"))
    return out
