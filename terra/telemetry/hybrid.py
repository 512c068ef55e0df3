"""The hybridization report: would whole-step `jax.jit` give the same results?

Terra watched every step run; from that it names, at `file:line`, each
reason a step is not stageable as one `jax.jit`, in the categories of the
studies of imperative-to-graph refactoring (Khatchadourian et al.):

- a third-party / NumPy call on a tensor (a fetch feeding host code),
- a branch on a tensor value (a fetch deciding Python control flow),
- a Python side effect staging would run once (a print, a random choice,
  state that changes which ops run),
- a Python scalar argument that would retrace every step,
- a shape that changes (each new shape is a retrace),

each with the change that makes it stageable. The verdict is checked against
reality: `probe` runs the step on its last arguments eagerly and under
`jax.jit` (a few calls each, Python's random state restored so both see the
same draws) and compares outputs and prints as `terra bench` does, and times
eager and jit there; Terra's speed is the one it had during the run.
"""
from __future__ import annotations

import contextlib
import inspect
import io
import random
import re
import statistics
import sysconfig
import threading
import time
import traceback
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import numpy as np

from terra.telemetry import divergence
from terra.telemetry.explain import source_line

# The studies' categories.
THIRD_PARTY = "third-party/NumPy call on a tensor"
BRANCH = "branch on a tensor value"
SIDE_EFFECT = "Python side effect staging would run once"
SCALAR = "Python scalar argument that would retrace every step"
SHAPE = "shape that changes"
OTHER = "other"

MATCHES, FAILS, DIFFERS = "matches", "fails", "runs but differs"
_VERDICT_TEXT = {MATCHES: "yes: jax.jit of the whole step gives the same results",
                 FAILS: "no: jax.jit of the whole step fails",
                 DIFFERS: "no: jax.jit of the whole step runs but gives different results"}
_PROBE_CALLS = 4    # calls per mode when probing: all but the first use jit's cached trace
_FEW_SHAPES = 8     # this many shapes are a few retraces, not a reason to change code


class Reason(NamedTuple):
    category: str
    where: str      # file:line
    what: str       # what Terra saw there
    fix: str        # the change that makes it stageable


# -- what the step's calls looked like (kept only while explain collects events) -------------
@dataclass
class Calls:
    """The step's last call (to probe with) and its Python scalar arguments' history."""
    fn: Callable
    names: list
    last: Any = None                                   # (args, kwargs), numpy leaves copied
    scalars: dict = field(default_factory=dict)        # argument name -> values seen (bounded)

    def observe(self, args: tuple, kwargs: dict) -> None:
        self.last = jax.tree.map(lambda x: x.copy() if isinstance(x, np.ndarray) else x,
                                 (args, kwargs))
        named = [(self.names[i] if i < len(self.names) else f"argument {i + 1}", a)
                 for i, a in enumerate(args)] + list(kwargs.items())
        for name, value in named:
            if type(value) in (int, float):
                seen = self.scalars.setdefault(name, [])
                if len(seen) < 16 and value not in seen:
                    seen.append(value)


_calls: "weakref.WeakValueDictionary[str, Any]" = weakref.WeakValueDictionary()
_lock = threading.Lock()


def calls_of(step) -> Calls:
    """The `Calls` of a `terra.function` (made on first use; the step is remembered weakly)."""
    calls = step._calls
    if calls is None:
        try:
            names = list(inspect.signature(step._fn).parameters)
        except (TypeError, ValueError):
            names = []
        calls = step._calls = Calls(step._fn, names)
        with _lock:
            _calls[step.telemetry_name] = step
    return calls


def step_named(name: str):
    with _lock:
        return _calls.get(name)


# -- checking against reality ---------------------------------------------------------------
@dataclass
class Probe:
    verdict: str
    detail: str = ""                 # the error, or what differed
    where: str = ""                  # the user line jit failed at / printed at
    category: str = ""
    jit_ms: float | None = None      # per call, waiting for the results (calls after the first)
    eager_ms: float | None = None


def probe(calls: Calls) -> Probe:
    """Run the last call `_PROBE_CALLS` times eagerly and under jax.jit; compare; time.

    Terra itself is not run again (at exit its compile thread is gone); its speed
    is the one measured while the program ran.
    """
    from terra import bench  # what "the same results" means: as `terra bench` compares

    args, kwargs = calls.last
    state = _random_state()
    eager, eager_printed, eager_s = _chain(calls.fn, args, kwargs)
    _set_random_state(state)
    jitted = jax.jit(calls.fn)
    try:
        out, printed, jit_s = _chain(jitted, args, kwargs)
    except Exception as err:
        _set_random_state(state)
        where = _user_line(err)
        return Probe(FAILS, bench._failure(err), where, _category(err, where),
                     eager_ms=_ms(eager_s))
    finally:
        _set_random_state(state)
    result = Probe(MATCHES, eager_ms=_ms(eager_s))
    if not bench.logs_match(eager_printed.lines, printed.lines):
        result = Probe(DIFFERS, f"printed {len(printed.lines)} lines in {_PROBE_CALLS} calls "
                       f"where eager printed {len(eager_printed.lines)}",
                       eager_printed.first_where or printed.first_where, SIDE_EFFECT)
    elif not all(bench.params_match(a, b) for a, b in zip(eager, out)):
        result = Probe(DIFFERS, "its outputs differ from eager's")
    elif _varies(eager, bench) and not _varies(out, bench):
        result = Probe(DIFFERS, f"on the same arguments eager's results change from call to call "
                       f"(Python state decides something) while jit's {_PROBE_CALLS} calls repeat "
                       "its first trace's", category=SIDE_EFFECT)
    result.eager_ms, result.jit_ms = _ms(eager_s), _ms(jit_s)
    return result


def _varies(outs: list, bench) -> bool:
    return not all(bench.params_match(outs[0], o) for o in outs[1:])


def _ms(seconds: list) -> float | None:
    return 1e3 * statistics.median(seconds) if seconds else None


def _chain(fn, args, kwargs) -> tuple[list, "_Printed", list]:
    """`_PROBE_CALLS` calls on fresh copies of the arguments: outputs, prints, times."""
    outs, printed, seconds = [], _Printed(), []
    with contextlib.redirect_stdout(printed):
        for _ in range(_PROBE_CALLS):
            a, k = _fresh(args, kwargs)
            start = time.perf_counter()
            out = jax.block_until_ready(fn(*a, **k))
            seconds.append(time.perf_counter() - start)
            outs.append(out)
    return outs, printed, seconds[1:]


def _fresh(args, kwargs):
    return jax.tree.map(lambda x: x.copy() if isinstance(x, np.ndarray) else x, (args, kwargs))


class _Printed(io.StringIO):
    """Captured stdout that also remembers the user line of the first print."""

    first_where = ""

    def write(self, text: str) -> int:
        if not self.first_where and text.strip():
            self.first_where = _caller_line()
        return super().write(text)

    @property
    def lines(self) -> list:
        return self.getvalue().splitlines()


def _caller_line() -> str:
    from terra.intercept import user_location
    return user_location()


_LIBRARY_DIRS = (str(Path(__file__).resolve().parent.parent), sysconfig.get_paths()["stdlib"],
                 sysconfig.get_paths()["purelib"], "<")


def _user_line(err: BaseException) -> str:
    """The innermost frame of the user's code in the error's traceback."""
    where = ""
    for frame in traceback.extract_tb(err.__traceback__):
        name = frame.filename
        if not name.startswith(_LIBRARY_DIRS) and "site-packages" not in name:
            where = f"{name}:{frame.lineno}"
    return where


def _category(err: BaseException, where: str) -> str:
    name, line = type(err).__name__, source_line(where)
    if name == "TracerArrayConversionError" or _host_call(line):
        return THIRD_PARTY
    if name in ("TracerBoolConversionError", "TracerIntegerConversionError",
                "ConcretizationTypeError"):
        return BRANCH
    if name == "UnexpectedTracerError":
        return SIDE_EFFECT
    return OTHER


def _random_state() -> tuple:
    return random.getstate(), np.random.get_state()


def _set_random_state(state: tuple) -> None:
    random.setstate(state[0])
    np.random.set_state(state[1])


# -- reasons from what Terra saw ------------------------------------------------------------
def _host_call(line: str) -> bool:
    return any(h in line for h in ("np.", "numpy", ".tolist(", "__array__", "scipy", "cv2."))


def fetch_reason(where: str, line: str, name: str) -> Reason:
    """Why a value Python fetched inside the step would stop jax.jit, and the fix."""
    value = f"`{name}`" if name else "a value"
    if _host_call(line):
        return Reason(THIRD_PARTY, where, f"host code reads {value}",
                      "write it with jax.numpy (jnp has most numpy functions) so it is traced, "
                      "or move it out of the step and pass its result in as an argument")
    if line.startswith(("if ", "elif ", "while ")) or " if " in line:
        return Reason(BRANCH, where, f"Python branches on {value}",
                      "select with jnp.where(cond, a, b), or branch with "
                      "jax.lax.cond(cond, true_fn, false_fn, ...) / jax.lax.while_loop")
    if line.startswith("assert ") or "raise " in line:
        return Reason(BRANCH, where, f"a check reads {value}",
                      "check it outside the step on the returned value, or with "
                      "jax.experimental.checkify")
    if "print(" in line or "log" in line:
        return Reason(SIDE_EFFECT, where, f"prints {value}: under jit it would print once, "
                      "at trace time, a tracer", "print with jax.debug.print(\"{x}\", x=...)")
    return Reason(BRANCH, where, f"Python converts {value} to a Python number",
                  "keep it an array (jnp ops) inside the step; convert the returned value "
                  "outside it")


def branch_reasons(graph) -> tuple[list, list]:
    """Where the recorded paths split without Python having read a tensor just before.

    Different ops there: Python state (a random choice, a counter) chose them,
    and jit would freeze the first trace's choice. The same op on new shapes:
    a retrace each.
    """
    reasons, shapes, stack, seen = [], {}, [graph.root], 0
    while stack and seen < 1_000_000:
        node = stack.pop()
        seen += 1
        stack.extend(node.children)
        if len(node.children) < 2 or node.fetch_after:
            continue
        labels = {c.op.label for c in node.children}
        where = next((c.op.where for c in node.children if c.op.where), "")
        if len(labels) > 1:
            names = " or ".join(sorted(divergence.call_name(x) for x in labels)[:3])
            reasons.append(Reason(SIDE_EFFECT, where or "?", f"Python chose between {names} "
                                  "without reading a tensor (a random choice or Python state "
                                  "decides): jit would freeze the first trace's choice",
                                  "draw the choice with jax.random inside the step and select "
                                  "with jnp.where / jax.lax.switch, or pass it in as an array"))
        elif where:
            shapes[where] = shapes.get(where, 1) + len(node.children) - 1
    notes = [Reason(SHAPE, where, f"{n} shapes so far: jit would trace and compile each",
                    "nothing to change" if n <= _FEW_SHAPES else
                    "pad to a few fixed sizes (e.g. lengths rounded up to a multiple of 32)")
             for where, n in shapes.items()]
    return _unique(reasons), notes


def _unique(reasons: list) -> list:
    out, seen = [], set()
    for r in reasons:
        if (r.category, r.where) not in seen:
            seen.add((r.category, r.where))
            out.append(r)
    return out


def observed_reasons(agg, calls: Calls | None, graph=None) -> tuple[list, list]:
    """(reasons jit would fail or differ, notes: retraces) from what Terra kept."""
    reasons, notes = branch_reasons(graph) if graph is not None else ([], [])
    if agg is not None:
        for where, site in sorted(agg.fetch_sites.items()):
            if site.in_step:
                name = site.names.most_common(1)[0][0] if site.names else ""
                reasons.append(fetch_reason(where, source_line(where), name))
        for (where, cause), site in sorted(agg.divergences.items()):
            if cause == divergence.FEED:
                reasons.append(Reason(SIDE_EFFECT, where, "a Python value the ops use "
                                      "changed between steps: jit bakes the first trace's "
                                      "value into the graph", "pass the value in as an "
                                      "argument (it is then traced)"))
            elif cause == divergence.VALUE:
                notes.append(Reason(SCALAR, where, "a Python number baked into an op changed: "
                                    "jit would retrace for each new value",
                                    "pass it in as an array (jnp.asarray) so it is traced"))
    if calls is not None:
        for name, seen in calls.scalars.items():
            if len(seen) > 1:
                notes.append(Reason(SCALAR, f"argument `{name}`",
                                    f"a Python {type(seen[0]).__name__} that changes "
                                    f"({', '.join(map(repr, seen[:3]))}, ...): as a static "
                                    "argument jit would retrace every step",
                                    f"leave `{name}` traced (not in static_argnums) or pass "
                                    f"jnp.asarray({name})"))
    return reasons, notes


def inferred_verdict(reasons: list) -> str:
    if any(r.category != SIDE_EFFECT for r in reasons):
        return FAILS
    return DIFFERS if reasons else MATCHES


def _failure_reason(checked: Probe, calls: Calls | None) -> Reason:
    """The line jax.jit failed at: a Python scalar argument used there, or what the line does."""
    line = source_line(checked.where)
    for name, seen in (calls.scalars.items() if calls is not None else ()):
        if len(seen) > 1 and re.search(rf"\b{re.escape(name)}\b", line):
            return Reason(SCALAR, checked.where,
                          f"the Python {type(seen[0]).__name__} argument `{name}` (it changes: "
                          f"{', '.join(map(repr, seen[:3]))}, ...) is used by Python here; under "
                          f"jit it is a tracer ({checked.detail.split(':')[0]}), and "
                          "static_argnums would retrace every step",
                          "compute this with jax.numpy so it can stay traced, or compute it "
                          "outside the step and pass the result in as an array")
    guess = fetch_reason(checked.where, line, "")
    return Reason(checked.category or guess.category, checked.where, checked.detail, guess.fix)


class Assessment(NamedTuple):
    verdict: str
    inferred: str          # from Terra's observations alone
    reasons: list          # why jit would fail or differ
    notes: list            # retraces and the like: jit still gives eager's results
    checked: Probe | None
    frozen_choice: bool    # jit matched on the probe's calls, but the run showed Python choosing


def assess(agg, calls: Calls | None, checked: Probe | None, graph=None) -> Assessment:
    """The verdict: the jit check where it ran, else what Terra observed.

    A check that matched on its few calls does not clear a step whose recorded
    paths split without a tensor deciding: on the steps where Python chose
    differently, jit would replay its first trace's choice.
    """
    reasons, notes = observed_reasons(agg, calls, graph)
    inferred = inferred_verdict(reasons)
    if checked is not None and checked.verdict == FAILS and checked.where and not any(
            r.where == checked.where for r in reasons):
        reasons.insert(0, _failure_reason(checked, calls))
    if checked is not None and checked.verdict == DIFFERS and checked.category == SIDE_EFFECT \
            and not any(r.category == SIDE_EFFECT for r in reasons):
        printed = checked.detail.startswith("printed")
        reasons.append(Reason(SIDE_EFFECT, checked.where or "?", checked.detail,
                              "print with jax.debug.print" if printed else
                              "draw random choices with jax.random inside the step, and pass "
                              "changing Python values in as arguments"))
    verdict = checked.verdict if checked is not None else inferred
    frozen = verdict == MATCHES and any(r.category == SIDE_EFFECT for r in reasons)
    return Assessment(DIFFERS if frozen else verdict, inferred, reasons, notes, checked, frozen)


def render(agg, calls: Calls | None, checked: Probe | None, graph=None) -> list[str]:
    """The report's lines (indented under `terra explain: NAME`)."""
    a = assess(agg, calls, checked, graph)
    how = ("checked: ran the last step's arguments eagerly and under jax.jit"
           if checked is not None else "inferred from the steps Terra ran (not run under jit)")
    lines = [f"  whole-step jax.jit: {_VERDICT_TEXT[a.verdict]} ({how})"]
    if a.frozen_choice:
        lines.append(f"    observed: jit matched on {_PROBE_CALLS} calls on the last arguments, "
                     "but during the run Python chose different ops without reading a tensor; "
                     "on the steps it chooses differently jit would replay its first trace")
    elif checked is not None and checked.verdict != MATCHES and checked.detail:
        lines.append(f"    observed: {checked.detail}")
    if checked is not None and a.verdict != a.inferred:
        lines.append(f"    (Terra's observations alone predicted: {a.inferred})")
    if a.verdict != MATCHES:
        for r in a.reasons:
            lines.append(f"    - [{r.category}] {r.where}  `{_source(r.where)}`")
            lines.append(f"        {r.what}; to stage it: {r.fix}")
    for r in a.notes:
        if r.category == SCALAR and any(r.where.split("`")[1:2][0] in x.what for x in a.reasons
                                        if "`" in r.where):
            continue  # named by the reason it causes
        lines.append(f"    note [{r.category}] {r.where}: {r.what}; {r.fix}")
    if checked is not None:
        lines.append("    speed: " + _speeds(checked, agg))
    return lines


def _speeds(p: Probe, agg) -> str:
    """Eager and jit on the last arguments; terra as it ran."""
    parts = [] if p.eager_ms is None else [f"eager {p.eager_ms:.2f} ms"]
    if p.jit_ms is not None:
        parts.append(f"jax.jit {p.jit_ms:.2f} ms"
                     + (" (but its results differ)" if p.verdict == DIFFERS else ""))
    elif p.verdict == FAILS:
        parts.append("jax.jit does not run")
    text = "per call on the last step's arguments, waiting for the results: " + ", ".join(parts)
    if agg is not None and agg.coexec_steps:
        text += (f"; terra {agg.coexec_us / agg.coexec_steps / 1000:.2f} ms per co-executed step "
                 "during the run (the call's wall time; its graph may still run after it "
                 "returns: `python -m terra bench` times whole rounds)")
    return text


def _source(where: str) -> str:
    return source_line(where)
