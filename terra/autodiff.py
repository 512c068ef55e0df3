"""Autodiff elision: a gradient is one op of the trace, not hundreds.

When a step calls `jax.value_and_grad(f)` / `jax.grad(f)` / `jax.vjp(f)`,
Terra runs only f's primal Python (its side effects and validation still
happen) and records one *gradient op*: for grad right after f's ops, for vjp
each time the pullback is called. The gradient op is evaluated by replaying
f's recorded primal ops under `jax.vjp` — inside the generated segment when
co-executing, and while tracing through the jaxpr of that replay, traced once
per region shape and then run one equation at a time (`run_gradient`) — so
the primal op sequence determines the backward pass and JAX's
linearize/transpose machinery never runs in the Python skeleton once a region
was seen. While tracing, the replay's primal values are also the values of
the region's ops: those are recorded without being run (see
`coexec.StepRun._defer`), so the forward pass runs once, as in eager.

A region's ops are those recorded while f runs; regions do not nest (a grad
inside f runs JAX's own autodiff, recorded as ordinary ops of the region).
The gradient op's inputs are the cotangents (vjp only: grad seeds ones), the
differentiated values (fresh copies of the differentiated leaves, made at the
region's start), then every value the region reads from outside itself.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import jax
import jax.numpy as jnp

from terra.intercept import aval_of, bind_op, run_jaxpr, trace_function
from terra.trace import ARG, FEED_REF, NODE, params_equal


class _GradPrimitive:
    """Marks the gradient op of an elided region (not a JAX primitive)."""

    name = "terra_grad"
    multiple_results = True

    def __repr__(self) -> str:
        return self.name

    def __reduce__(self) -> str:
        return "GRAD"  # pickled by reference: the module's one instance


GRAD = _GradPrimitive()


@dataclass(frozen=True, eq=False)
class GradSpec:
    """What a gradient op differentiates. Equality ignores `ops` (values recorded per step)."""

    start: int                 # position of the region's first op
    end: int                   # position after the region's last op
    diff: tuple                # ValueKeys of the differentiated inputs (the copies)
    outs: tuple                # ValueKeys of the differentiated outputs
    seeded: bool               # the cotangents are inputs (vjp); else ones (grad)
    ops: tuple = field(default=())  # ((pos, Op), ...) the region's ops, for replay

    def key(self) -> tuple:
        return (self.start, self.end, self.diff, self.outs, self.seeded)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, GradSpec) and self.key() == other.key()

    def __hash__(self) -> int:
        return hash(self.key())


def external_inputs(spec: GradSpec) -> list:
    """Inputs of the region's ops that come from outside the region, in first-use order.

    NODE inputs before the region stay NODE; ARG stays ARG; a feed of op q slot
    k becomes (FEED_REF, q, k): the same value that op q was fed.
    """
    seen: dict = {}
    for pos, op in spec.ops:
        if op.host_effect:
            continue
        for k, (kind, a, b) in enumerate(op.inputs):
            if kind == NODE:
                if a >= spec.start or (a, b) in spec.diff:
                    continue
                inp = (NODE, a, b)
            elif kind == ARG:
                inp = (ARG, a, b)
            else:
                inp = (FEED_REF, pos, k)
            seen.setdefault(inp, None)
    return list(seen)


def replay(spec: GradSpec, external: Callable[[tuple], Any], keep: tuple = ()) -> Callable:
    """The region as a function: diff values -> (its outputs `spec.outs`, the
    values of the region's ValueKeys `keep`).

    `external(inp)` returns the value of an external input (see
    `external_inputs`). Works on concrete arrays (eagerly) and inside jit.
    """
    def primal(*diff_vals):
        env = dict(zip(spec.diff, diff_vals))
        for pos, op in spec.ops:
            if op.host_effect:
                continue
            vals = []
            for k, (kind, a, b) in enumerate(op.inputs):
                if kind == NODE:
                    v = env.get((a, b))
                    vals.append(v if v is not None else external((NODE, a, b)))
                elif kind == ARG:
                    vals.append(external((ARG, a, b)))
                else:
                    vals.append(external((FEED_REF, pos, k)))
            out = bind_op(op.prim, vals, op.params)
            outs = out if op.multiple_results else (out,)
            for o, v in enumerate(outs):
                env[(pos, o)] = v
        return tuple(env[key] for key in spec.outs), [env[key] for key in keep]

    return primal


def gradient(spec: GradSpec, diff_values: list, external: Callable[[tuple], Any],
             cotangents: list | None = None, keep: tuple = ()) -> tuple[list, list]:
    """The region's vjp at `diff_values`, seeded with `cotangents` (grad: ones),
    and the primal values of the region's ValueKeys `keep` on the way."""
    values, pullback, kept = jax.vjp(replay(spec, external, keep), *diff_values, has_aux=True)
    if cotangents is None:
        cotangents = [jnp.ones_like(v) for v in values]
    return list(pullback(tuple(cotangents))), kept


def _layout(op) -> tuple[GradSpec, int, int]:
    """(spec, k, n): a gradient op's inputs are cotangents [:k], diff values [k:n]
    and the region's external inputs [n:]."""
    spec = op.params["spec"]
    k = len(spec.outs) if spec.seeded else 0
    return spec, k, k + len(spec.diff)


def apply_gradient_op(op, vals: list) -> list:
    """A gradient op on its input values, as JAX functions: the generated
    segment's jit traces this (`run_gradient` traces the same function)."""
    return _gradient_function(op, ())(*_gradient_args(op, vals))


# -- the gradient op, evaluated eagerly -----------------------------------------
# jax.vjp of the replay runs JAX's autodiff in Python on every call: a JVP and
# a partial-evaluation rule per op forward, a transpose rule per op backward.
# For a region recorded before (same ops, same input avals), the ops that
# autodiff ran are those of the same jaxpr: trace it once, then run its
# equations as eager JAX runs ops (one dispatch each, no autodiff rules).
_programs: dict = {}   # fingerprint -> [(region params, gradient jaxpr), ...]
_PROGRAMS = 256
_PROGRAMS_PER_FINGERPRINT = 8   # regions that differ only in params (an exponent, ...)


def run_gradient(op, vals: list, keep: tuple = ()) -> tuple[list, list]:
    """A gradient op on concrete input values: its gradients, and the primal
    values of the region's ValueKeys `keep`."""
    spec, _, n = _layout(op)
    args = _gradient_args(op, vals)
    replayed = [o for _, o in spec.ops if not o.host_effect]  # what the replay runs
    key = (spec.key(), keep, op.inputs[n:], tuple(aval_of(x) for x in args),
           tuple((o.prim, o.inputs, o.out_avals) for o in replayed))
    params = [o.params for o in replayed]
    known = _programs.get(key, [])
    for seen, program in known:
        if all(a is b or params_equal(a, b) for a, b in zip(seen, params)):
            break
    else:
        program = trace_function(_gradient_function(op, keep), args)
        if len(known) >= _PROGRAMS_PER_FINGERPRINT:
            known.pop(0)
        known.append((params, program))
        if key not in _programs and len(_programs) >= _PROGRAMS:
            _programs.pop(next(iter(_programs)))
        _programs[key] = known
    outs = run_jaxpr(program, args)
    return outs[:len(spec.diff)], outs[len(spec.diff):]


def _gradient_args(op, vals: list) -> list:
    """A gradient op's input values in `_gradient_function`'s order."""
    _, k, n = _layout(op)
    return [*vals[k:n], *vals[n:], *vals[:k]]


def _gradient_function(op, keep: tuple) -> Callable:
    """(diff values, externals, cotangents) -> [*gradients, *kept values]:
    jax.vjp of the region's replay."""
    spec, _, n = _layout(op)
    ext_keys = op.inputs[n:]
    d, e = len(spec.diff), len(ext_keys)

    def fn(*args):
        external = dict(zip(ext_keys, args[d:d + e]))
        cts = list(args[d + e:]) if spec.seeded else None
        grads, kept = gradient(spec, list(args[:d]), external.__getitem__, cts, keep)
        return [*grads, *kept]
    return fn
