"""Why a co-executed step left the graph's path, in the user's terms.

`op_mismatch` compares the op Python applied with the ops the graph expected
next and names what changed: a different function (Python took another
branch), an argument whose shape or dtype changed, a Python value baked into
the op that changed, or an input that came from a different value. Built only
when a step diverges, so it may take its time.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Sequence

# Causes, one per way the graph's next op and Python's can differ.
BRANCH = "branch"        # Python applied a different op: another path through the step
SHAPE = "shape"          # same op, an argument's shape or dtype changed
VALUE = "value"          # same op and avals, a Python value baked into its params changed
ORIGIN = "origin"        # same op and avals, an input came from a different value
LONGER = "longer"        # the step did more after every recorded step had ended
UNCOVERED = "uncovered"  # a learned path whose segments are still compiling
FEED = "feed"            # a Python value predicted constant changed (fed live from now on)
GRADIENT = "gradient"    # a differentiated function took a new path
DEBUGGING = "debugging"  # a JAX debugging flag (debug_nans, disable_jit) makes ops run eagerly
DELETED = "deleted"      # a step argument was deleted or donated: the eager op raises


class Divergence(NamedTuple):
    reason: str   # one sentence naming the call and what changed
    cause: str    # one of the causes above
    key: str      # what Python did instead (counting distinct ones tells learning from churn)


class Expected(NamedTuple):
    """One op the graph expected next."""
    label: str                # `jit:_take`, `dot_general`
    input_avals: Sequence[Any]
    params: dict
    where: str                # where it was recorded ('' when telemetry was off then)
    origins: Sequence[Any]    # the recorded input origins


def call_name(label: str) -> str:
    """`jit:_take` -> `_take (a jitted function)`; a primitive stays as it is."""
    prim, _, name = label.partition(":")
    return f"`{name}` ({prim})" if name else f"`{prim}`"


def aval_text(aval: Any) -> str:
    short = getattr(aval, "str_short", None)
    return short() if callable(short) else str(aval)


def _recorded_at(exp: Expected) -> str:
    return f" (recorded at {exp.where})" if exp.where else ""


def op_mismatch(expected: Sequence[Expected], label: str, avals: Sequence[Any], params: dict,
                origins: Sequence[Any], params_equal) -> Divergence:
    """Python applied `label` on `avals`; the graph expected one of `expected`."""
    name = call_name(label)
    if not expected:
        return Divergence(f"Python called {name} after the point where every recorded step "
                          "ended: this step does more than the steps seen so far", LONGER, label)
    same = [e for e in expected if e.label == label]
    if not same:
        listed = ", ".join(f"{call_name(e.label)}{_recorded_at(e)}" for e in expected[:3])
        more = f" and {len(expected) - 3} more" if len(expected) > 3 else ""
        return Divergence(f"Python called {name} where the graph expected {listed}{more}: "
                          "the step took a path not seen before", BRANCH, label)
    exp = same[0]
    changed = _changed_avals(exp.input_avals, avals)
    if changed:
        what = "; ".join(f"argument {k + 1}: {aval_text(a)} -> {aval_text(b)}" for k, a, b in changed)
        kind = "shape" if any(getattr(a, "shape", None) != getattr(b, "shape", None)
                              for _, a, b in changed) else "dtype"
        return Divergence(f"{name} was called with a new {kind} ({what}){_recorded_at(exp)}; "
                          "the graph learns it", SHAPE,
                          f"{label}{tuple(aval_text(a) for a in avals)}")
    differ = sorted(k for k in set(exp.params) | set(params)
                    if not params_equal({k: exp.params.get(k)}, {k: params.get(k)}))
    if differ:
        what = ", ".join(f"{k}={_short(exp.params.get(k))} -> {_short(params.get(k))}"
                         for k in differ[:3])
        return Divergence(f"{name} was called with a different Python value baked into it "
                          f"({what}){_recorded_at(exp)}", VALUE,
                          f"{label}:{','.join(f'{k}={_short(params.get(k))}' for k in differ)}")
    moved = [k + 1 for k, (a, b) in enumerate(zip(exp.origins, origins)) if a != b]
    where = ", ".join(map(str, moved)) or "?"
    return Divergence(f"argument {where} of {name} came from a different value than when the "
                      f"graph was recorded{_recorded_at(exp)}: the step's data flow changed",
                      ORIGIN, f"{label}:{where}")


def _changed_avals(old: Sequence[Any], new: Sequence[Any]) -> list:
    if len(old) != len(new):
        return []
    return [(k, a, b) for k, (a, b) in enumerate(zip(old, new))
            if a is not None and b is not None and
            (getattr(a, "shape", None), getattr(a, "dtype", None))
            != (getattr(b, "shape", None), getattr(b, "dtype", None))]


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
