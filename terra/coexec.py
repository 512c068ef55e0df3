"""Co-execution of one step: placeholders, feed/fetch, validation, fallback.

A `StepRun` is the handler of one step's `TerraTrace`. It is in one mode:

- TRACING: run each op eagerly, record it (op key + input origins). Inside
  a function being differentiated, an op is recorded without running it
  (deferred): the gradient op's replay computes its value, as eager's
  linearize would, so the forward pass runs once.
- COEXEC: check each op against the TraceGraph node Python is expected to
  reach next; return placeholders; hand segments to the executor (XLA's
  asynchronous dispatch) as soon as their inputs exist; feed Python values; fetch on demand.
- FALLBACK: after a divergence, finish the step like TRACING. Values of the
  co-executed prefix resolve from dispatched segments or by evaluating their
  recorded dependency cone.
- PASSTHROUGH: after an internal failure, plain eager execution, no record.
"""
from __future__ import annotations

import functools
import itertools
import time
import warnings
from collections import deque
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import numpy as np

from runtime.executor import RemoteValue, TerraExecutorError, wait
from terra.telemetry import divergence, events, profiler
from terra.autodiff import (
    GRAD, GradSpec, external_inputs, replay, run_gradient,
)
from terra.generate import ARG_IN, ENV, LIVE, Program, Segment
from terra.intercept import (
    GradCall, Placeholder, TerraTrace, VjpCall, aval_of, check_gradient_output, copy_value,
    current_handler, debugging_op_by_op, deferrable, dispatch_context, eager, eval_primitive,
    frozen_copy, apply_op, has_host_effect, local_value, operand_value, operator_signature,
    output_avals, placement_of, user_frame, user_location,
)
from terra.trace import (
    ARG, DATA, FEED, FEED_REF, NODE, GraphNode, Op, Recording, feed_token, params_equal, placements,
    tokens_equal,
)

if TYPE_CHECKING:
    from terra.api import StepFunction

TRACING, COEXEC, FALLBACK, PASSTHROUGH = "tracing", "coexec", "fallback", "passthrough"

# Under jax.debug_nans/debug_infs/disable_jit eager runs (and checks) op by op: so must Terra.
_CHECKED_EAGERLY = ("a JAX debugging flag is on (debug_nans, debug_infs or disable_jit): "
                    "ops run eagerly")

_flow_ids = itertools.count(1)  # links a dispatched segment to the fetches it serves (timeline)


class KnownOperator(NamedTuple):
    """The op an operator applied: `StepRun._reapply_operator` applies it again."""

    statics: tuple   # (operand index, Python scalar) baked into the op
    prim: Any
    params: dict
    mapping: tuple   # operand index of each op input
    out: int         # which of the op's outputs the operator returned


# (operator name, operator_signature, dispatch_context) -> [KnownOperator, ...]
_known_operators: dict = {}
_KNOWN_OPERATORS = 4096
_KNOWN_PER_SIGNATURE = 8   # e.g. `x ** k` for a few exponents k


class TerraInternalError(RuntimeError):
    """A failure inside Terra itself (raised only in strict mode)."""


class TerraWarning(UserWarning):
    """Terra fell back to eager execution, or gave up on a step function."""


class Region:
    """A function being differentiated by `jax.grad` or `jax.vjp` with autodiff elision."""

    __slots__ = ("start", "end", "diff", "open", "captured", "values", "pending")

    def __init__(self, start: int, diff: tuple):
        self.start = start          # position of the region's first op
        self.end = start            # position after its last op, once closed
        self.diff = diff            # ValueKeys of the differentiated copies
        self.open = True
        self.captured: dict = {}    # external input -> value, seen by the region's ops
        self.values: dict = {}      # ValueKey -> value of a region op that ran
        self.pending: deque = deque()  # positions of deferred ops that did not run yet, in order

    def computed(self, x: Any) -> bool:
        """Whether placeholder `x` is a value of the region (what it can differentiate)."""
        key = (x._pos, x._out)
        return key in self.diff or self.start <= key[0] < self.end

    def spec(self, outs: tuple, seeded: bool, ops: list) -> GradSpec:
        return GradSpec(self.start, self.end, self.diff, outs, seeded,
                        tuple((p, ops[p]) for p in range(self.start, self.end)))


class StepRun:
    """Everything about one call of a step function."""

    def __init__(self, owner: "StepFunction", mode: str, program: Program | None,
                 arg_leaves: list):
        self.owner = owner
        self.graph = owner._graph
        self.stats = owner._stats
        self.mode = mode
        self.program = program
        self.active = True
        self.args = arg_leaves
        self.arg_ids: dict[int, int] = {}
        self.arg_avals: list = [None] * len(arg_leaves)
        self.arg_placements: list = [None] * len(arg_leaves)
        self.data_arg_ids: set = set()       # numpy arrays passed in: data, fed live
        for i, x in enumerate(arg_leaves):
            if isinstance(x, jax.Array) and id(x) not in self.arg_ids:
                self.arg_ids[id(x)] = i
                self.arg_avals[i] = aval_of(x)
                self.arg_placements[i] = placement_of(x)
            elif isinstance(x, np.ndarray):
                self.data_arg_ids.add(id(x))
        self.rec = Recording()
        self.nodes: list[GraphNode] = []     # COEXEC: the validated path
        self.node: GraphNode = self.graph.root
        self.env: dict = {}                  # ValueKey -> device value from a segment or host op
        self.cone: dict = {}                 # ValueKey -> value computed eagerly on demand
        self.futures: dict = {}              # id(Segment) -> Future of its dispatch
        self.region: Region | None = None    # open autodiff-elision region
        self.deferred: Region | None = None  # a region with deferred ops not run yet
        self.telemetry = events.recorder     # None while telemetry is off
        self.name = owner.telemetry_name
        self.step = owner._stats.steps
        self.flows: dict = {}                # id(Segment) -> flow id of its dispatch
        self.deleted_input = False           # a dispatch failed on a deleted or donated array

    # -- the trace calls this for every primitive ----------------------------
    def apply(self, trace: TerraTrace, prim, args, params):
        if self.mode == COEXEC:
            try:
                result = self._apply_coexec(trace, prim, args, params)
            except Exception as err:  # Terra's own failure: finish eagerly
                self.internal_failure(err, "validating an op")
                result = None
            if result is not None:
                return result
        if self.mode == PASSTHROUGH:
            return self._apply_passthrough(prim, args, params)
        return self._apply_eager(trace, prim, args, params)

    # -- COEXEC --------------------------------------------------------------
    def _apply_coexec(self, trace, prim, args, params):
        """Validate against the expected node; None means: run this op eagerly."""
        for child in self.node.children:
            op = child.op
            if op.prim is prim and self._inputs_match(op, args) and params_equal(op.params, params):
                break
        else:
            self._diverge(*self._mismatch(prim, args, params))
            return None
        if self.graph.loaded:
            self.graph.met_live_op(child, params)
        return self._enter_validated(trace, child, args)

    def _enter_validated(self, trace, child: GraphNode, args):
        """`child` is the op Python applied: check its feeds, then enter it (None: diverged)."""
        op, pos = child.op, child.pos
        if debugging_op_by_op():
            self._diverge(_CHECKED_EAGERLY, divergence.DEBUGGING, divergence.DEBUGGING)
            return None
        if child not in self.program.ready:
            self._diverge(f"{divergence.call_name(op.label)} follows a path the graph learned but "
                          "is still compiling: this step finishes eagerly",
                          divergence.UNCOVERED, op.label)
            return None
        if op.feed_slots:
            # The program was built with these values: check Python's match.
            predicted = self.program.predictions.get(child, ())
            for k, token in predicted:
                if not tokens_equal(token, feed_token(args[k])):
                    self.graph.mark_varying(child, k)
                    self._diverge(f"a Python value passed to {divergence.call_name(op.label)} "
                                  f"(argument {k + 1}) changed: it was the same in every step "
                                  "so far and is fed live from now on", divergence.FEED, op.label)
                    return None
            self.rec.feeds[pos] = tuple(frozen_copy(args[k]) for k in op.feed_slots)
            self.stats.feeds += len(op.feed_slots)
            # Predicted feeds are only checked (the step event counts them); live ones travel.
            if self.telemetry is not None and len(op.feed_slots) > len(predicted):
                self.telemetry.instant(events.FEED, self.name, self.step,
                                       {"op": op.label, "values": len(op.feed_slots) - len(predicted)})
        return self._enter_node(trace, child, args)

    # -- operators (intercept.OPERATORS) ------------------------------------------
    def replay_operator(self, name: str, values: tuple) -> Any:
        """Apply what this operator applied before, without running jnp's Python.

        COEXEC: enter the node it produced. TRACING/FALLBACK: apply the op it
        applied on operands of the same types and avals (`_reapply_operator`).
        None: run the operator the usual way.
        """
        if not self.active:
            return None
        if self.mode == COEXEC:
            return self._replay_from_graph(name, values)
        if self.mode in (TRACING, FALLBACK):
            return self._reapply_operator(name, values)
        return None

    def _replay_from_graph(self, name: str, values: tuple) -> Any:
        """COEXEC: enter the node this operator produced before.

        Only when the node was recorded from the same operator on operands of
        the same origins and avals, with equal baked-in values, in the same
        dispatch context: then jnp's operator would apply exactly this op.
        None: run the operator the usual way (it is validated as any op).
        """
        for child in self.node.children:
            via = child.op.via
            if via is not None and via[0] == name:
                break
        else:
            return None
        _, mapping, statics, context, out = via
        for i, value in statics:
            x = values[i]
            if type(x) is not type(value) or x != value:
                return None
        args = [operand_value(values[i]) for i in mapping]
        if any(x is None for x in args) or not self._inputs_match(child.op, args):
            return None
        if context != dispatch_context():
            return None
        try:
            outs = self._enter_validated(values[0]._trace, child, args)
        except Exception as err:  # Terra's own failure: the operator runs eagerly
            self.internal_failure(err, "replaying an operator")
            return None
        if outs is None:
            return None
        self.stats.operators_replayed += 1
        return outs[out] if child.op.multiple_results else outs

    def operator_mark(self) -> int:
        """Where the ops an operator is about to record will start (-1: not recording)."""
        return len(self.rec.ops) if self.active and self.mode in (TRACING, FALLBACK) else -1

    def note_operator(self, mark: int, name: str, values: tuple, result: Any) -> None:
        """An operator recorded ops from `mark` on: tag the op if it was exactly one
        and the operator returned one of its outputs."""
        if mark < 0 or not self.active or len(self.rec.ops) != mark + 1:
            return
        op = self.rec.ops[mark]
        if (op.host_effect or op.prim is GRAD or type(result) is not Placeholder
                or result._run is not self or result._pos != mark):
            return
        mapping: list[int] = []
        for kind, a, b in op.inputs:
            j = self._operand_of_input(kind, a, b, values, mapping)
            if j is None:
                return
            mapping.append(j)
        statics = []
        for j, x in enumerate(values):
            if j not in mapping:
                if type(x) not in (bool, int, float, complex):
                    return  # some other operand shaped the op: never replayed
                statics.append((j, x))
        context = dispatch_context()
        op.via = (name, tuple(mapping), tuple(statics), context, result._out)
        sig = operator_signature(values)
        if sig is not None:
            known = _known_operators.setdefault((name, sig, context), [])
            if len(known) < _KNOWN_PER_SIGNATURE:
                known.append(KnownOperator(tuple(statics), op.prim, op.params,
                                           tuple(mapping), result._out))
            if len(_known_operators) > _KNOWN_OPERATORS:
                _known_operators.pop(next(iter(_known_operators)))

    def _reapply_operator(self, name: str, values: tuple) -> Any:
        """TRACING/FALLBACK: apply the op this operator applied on operands of the
        same types and avals, with equal baked-in scalars, in the same dispatch
        context: jnp's operator is a function of exactly these, so it would
        apply the same op again. The op is applied and recorded as any other."""
        sig = operator_signature(values)
        if sig is None:
            return None
        context = dispatch_context()
        known = _known_operators.get((name, sig, context))
        if known is None:
            return None
        for entry in known:
            if all(values[i] == v for i, v in entry.statics):  # same types: in `sig`
                break
        else:
            return None
        args = [operand_value(values[i]) for i in entry.mapping]
        if any(x is None for x in args):
            return None  # the operator raises (an int out of range): its own path says how
        pos = len(self.rec.ops)
        outs = apply_op(values[0]._trace, entry.prim, args, entry.params)
        if len(self.rec.ops) == pos + 1:  # tagged as `note_operator` tags: co-execution replays it
            self.rec.ops[pos].via = (name, entry.mapping, entry.statics, context, entry.out)
        self.stats.operators_reapplied += 1
        return outs[entry.out] if entry.prim.multiple_results else outs

    def _operand_of_input(self, kind: int, a, b, values: tuple, taken: list) -> int | None:
        """Which operand an op input was (None: none of them, untaggable)."""
        for j, x in enumerate(values):
            if j in taken:
                continue
            own = self._owns(x)
            if kind == NODE:
                if own and x._pos == a and x._out == b:
                    return j
            elif kind == ARG:
                if x is self.args[a]:
                    return j
            elif kind == FEED and not own and id(x) not in self.arg_ids:
                v = operand_value(x)
                if v is not None and aval_of(v) == a:
                    return j
        return None

    def _enter_node(self, trace, child: GraphNode, args):
        """Python reached `child`: dispatch what became ready, return placeholders."""
        op, pos = child.op, child.pos
        ready = self.program.dispatch_at.get(child, ())
        for seg in ready:
            if not self._arguments_fit(seg):
                self._diverge("a step argument is not the array the graph was built for (the "
                              "arguments' structure, shapes or dtypes changed)",
                              divergence.SHAPE, "arguments")
                return None
        self.nodes.append(child)
        self.rec.ops.append(op)
        self.node = child
        if op.host_effect:
            outs = self._run_host_op(pos, op, args)
        else:
            outs = None
        for seg in ready:
            self._dispatch(seg)
        if self.deleted_input:  # the user's error, not Terra's: eager's op raises it
            self.deleted_input = False
            self._diverge("a step argument was deleted or donated", divergence.DELETED,
                          divergence.DELETED)
            if not op.host_effect:  # (a host op ran already, and read no deleted value)
                self._leave(child)
                return None
        region = self._differentiated_region(args)
        if outs is None:
            phs = [Placeholder(trace, aval, self, pos, o, None, region)
                   for o, aval in enumerate(op.out_avals)]
        else:
            phs = [Placeholder(trace, aval, self, pos, o, v, region)
                   for o, (aval, v) in enumerate(zip(op.out_avals, outs))]
        return phs if op.multiple_results else phs[0]

    def _arguments_fit(self, seg: Segment) -> bool:
        """Whether the step arguments `seg` reads have the avals it was compiled for.

        A segment can be dispatched before Python reaches the ops that read its
        arguments (their validation comes later), so its arguments are checked
        here: a call whose argument leaves moved (a list that grew) or changed
        shape would otherwise run the executable on the wrong values."""
        for (kind, a, _), aval in zip(seg.inputs, seg.in_avals):
            if kind == ARG_IN and (a >= len(self.args) or _arg_aval(self, a) != aval):
                return False
        return True

    def _leave(self, child: GraphNode) -> None:
        """Undo entering `child`: Python's op runs eagerly in its place."""
        self.nodes.pop()
        self.rec.ops.pop()
        self.rec.feeds.pop(child.pos, None)
        self.node = child.parent

    def _differentiated_region(self, args) -> Region | None:
        """The open region if any input is being differentiated (outputs are too)."""
        region = self.region
        if region is not None:
            for x in args:
                if type(x) is Placeholder and x._region is region:
                    return region
        return None

    def _inputs_match(self, op: Op, args) -> bool:
        if len(args) != len(op.inputs):
            return False
        placed = op.placements
        for k, ((kind, a, b), x) in enumerate(zip(op.inputs, args)):
            if kind == NODE:
                if type(x) is not Placeholder or x._run is not self or x._pos != a or x._out != b:
                    return False
            elif kind == ARG:
                if x is not self.args[a] or self.arg_avals[a] != b:
                    return False
                if self.arg_placements[a] != (placed[k] if placed else None):
                    return False
            else:
                if (type(x) is Placeholder and x._run is self) or id(x) in self.arg_ids:
                    return False
                if aval_of(x) != a or placement_of(x) != (placed[k] if placed else None):
                    return False
        return True

    def _mismatch(self, prim, args, params) -> divergence.Divergence:
        """What differs between the op Python applied and the ops the graph expected."""
        expected = [divergence.Expected(c.op.label, [self._recorded_aval(i) for i in c.op.inputs],
                                        c.op.params, c.op.where,
                                        [i[:2] if i[0] != FEED else (FEED,) for i in c.op.inputs])
                    for c in self.node.children]
        label = f"{prim.name}:{params['name']}" if isinstance(params.get("name"), str) else prim.name
        return divergence.op_mismatch(expected, label, [aval_of(x) for x in args], params,
                                      [self._origin(x) for x in args], params_equal)

    def _recorded_aval(self, inp: tuple) -> Any:
        kind, a, b = inp
        if kind == NODE:
            return self.nodes[a].op.out_avals[b] if a < len(self.nodes) else None
        return b if kind == ARG else a

    def _origin(self, x) -> tuple:
        if type(x) is Placeholder and x._run is self:
            return (NODE, x._pos)
        i = self.arg_ids.get(id(x))
        return (ARG, i) if i is not None and self.args[i] is x else (FEED,)

    def _run_host_op(self, pos: int, op: Op, args) -> list:
        """Ops with host effects (prints, callbacks) run now, in Python's order."""
        vals = [self._concrete(x) for x in args]
        out = eval_primitive(op.prim, vals, op.params)
        outs = list(out) if op.multiple_results else [out]
        for o, v in enumerate(outs):
            self.env[(pos, o)] = v
        return outs

    def _dispatch(self, seg: Segment) -> None:
        """Hand a segment to the executor; its inputs all exist now."""
        env, args, feeds = self.env, self.args, self.rec.feeds
        executable = seg.executable
        telemetry = self.telemetry
        if telemetry is not None:
            self.flows[id(seg)] = flow = next(_flow_ids)
            info = {"segment": seg.index, "ops": len(seg.nodes), "flow": flow}

        def job():
            start = time.perf_counter_ns()
            vals = []
            for i, (kind, a, b) in enumerate(seg.inputs):
                if kind == ENV:
                    vals.append(env[(a, b)])
                elif kind == ARG_IN:
                    vals.append(_device_value(args[a]))
                elif kind == LIVE:
                    vals.append(_device_value(feeds[a][_slot_index(self, a, b)]))
                else:
                    vals.append(seg.constants[i])
            with profiler.span("terra dispatch", segment=seg.index, step=self.step):
                try:
                    outs = executable(*vals)
                except Exception:
                    self.deleted_input = any(_deleted(v) for v in vals)
                    raise
            for key, v in zip(seg.outputs, outs):
                env[key] = v
            if telemetry is not None:
                telemetry.slice(events.DISPATCH, self.name, self.step, start, info)
                if not any(isinstance(v, RemoteValue) for v in outs):  # waiting would download
                    telemetry.watch_segment(self.name, self.step, info, time.perf_counter_ns(),
                                            lambda: jax.block_until_ready(outs))

        with eager():  # an executor may run the job right here: not under the step's trace
            self.futures[id(seg)] = self.owner._executor.dispatch(job)
        self.stats.segments_dispatched += 1

    def _diverge(self, reason: str, cause: str, key: str) -> None:
        where = user_location()
        self.stats.divergences += 1
        self.stats.fallbacks += 1
        self.stats.last_divergence = f"{where}: {reason}"
        self.mode = FALLBACK
        profiler.mark("terra divergence", where=where, cause=cause)
        if self.telemetry is not None:
            self.telemetry.instant(events.DIVERGENCE, self.name, self.step,
                                   {"reason": reason, "where": where, "cause": cause, "key": key})

    # -- TRACING / FALLBACK ----------------------------------------------------
    def _apply_eager(self, trace, prim, args, params):
        region = self.region
        pos = len(self.rec.ops)
        inputs, vals, feeds, slots, places, committed = self._inputs(args, region)
        if region is not None:
            self._capture(region, pos, inputs, vals)
            if not committed and not self._reads_committed(inputs) and deferrable(prim, params):
                avals = output_avals(prim, [_input_aval(inp, x) for inp, x in zip(inputs, vals)],
                                     params)
                if avals is not None:
                    return self._defer(trace, region, prim, params, pos, inputs, feeds, slots,
                                       avals, args)
            vals = [self._concrete(x) for x in vals]
        telemetry = self.telemetry
        start = 0 if telemetry is None else time.perf_counter_ns()
        out = eval_primitive(prim, vals, params)  # the user's errors surface here, as in eager
        outs = out if prim.multiple_results else (out,)
        avals = tuple([aval_of(o) for o in outs])
        if region is not None:  # what deferred ops of the region may read
            for o, v in enumerate(outs):
                region.values[(pos, o)] = v
        try:
            self._record(Op(prim, params, inputs, avals, prim.multiple_results,
                            self._where(), has_host_effect(prim, params), slots,
                            tuple(places) if committed else (), placements(outs)),
                         feeds, start)
        except Exception as err:
            self.internal_failure(err, "recording an op")
            return out
        differentiated = None if region is None else self._differentiated_region(args)
        phs = [Placeholder(trace, a, self, pos, o, v, differentiated)
               for o, (a, v) in enumerate(zip(avals, outs))]
        return phs if prim.multiple_results else phs[0]

    def _inputs(self, args, region: Region | None) -> tuple:
        """(inputs, values, feeds, feed slots, placements, whether one is committed).

        Inside a region a value of this step stays a placeholder: the op may be
        deferred (see `_defer`), and then needs no input value.
        """
        inputs, vals, feeds, slots = [], [], [], []
        # Placements of ARG and FEED inputs (a NODE's producer decides its own).
        places, committed = [], False
        for k, x in enumerate(args):
            if type(x) is Placeholder and x._run is self:
                inputs.append((NODE, x._pos, x._out))
                vals.append(x if region is not None else local_value(x.value()))
                places.append(None)
                continue
            i = self.arg_ids.get(id(x))
            if i is not None and self.args[i] is x:
                inputs.append((ARG, i, self.arg_avals[i]))
                vals.append(self._concrete(x))
                place = self.arg_placements[i]
            else:
                inputs.append((FEED, aval_of(x), DATA if self._is_data_arg(x) else None))
                x = frozen_copy(x)  # XLA may read a numpy buffer after Python mutates it
                feeds.append(x)
                slots.append(k)
                v = self._concrete(x)
                vals.append(v)
                place = placement_of(v)
            places.append(place)
            committed = committed or place is not None
        return tuple(inputs), vals, feeds, tuple(slots), places, committed

    def _reads_committed(self, inputs: tuple) -> bool:
        """Whether an input made by an op of this step is committed (as its op recorded)."""
        ops = self.rec.ops
        return any(kind == NODE and ops[a].out_placement(b) is not None for kind, a, b in inputs)

    def _capture(self, region: Region, pos: int, inputs: tuple, vals: list) -> None:
        """Keep what the gradient op will read from outside the region."""
        for k, (inp, v) in enumerate(zip(inputs, vals)):
            if inp[0] == FEED:
                region.captured[(FEED_REF, pos, k)] = v
            elif inp[0] == ARG:
                region.captured[inp] = v
            elif inp[1] < region.start:
                region.captured[inp] = self._concrete(v)

    def _defer(self, trace, region: Region, prim, params, pos: int, inputs: tuple, feeds: list,
               slots: tuple, avals: tuple, args) -> Any:
        """Record a region op without running it: the gradient op's replay computes
        its value (and Python asking for it earlier runs the deferred ops up to it)."""
        start = 0 if self.telemetry is None else time.perf_counter_ns()
        try:
            self._record(Op(prim, params, inputs, avals, prim.multiple_results, self._where(),
                            False, slots), feeds, start)
        except Exception as err:
            self.internal_failure(err, "recording an op")
            return self._apply_passthrough(prim, args, params)
        region.pending.append(pos)
        self.deferred = region
        differentiated = self._differentiated_region(args)
        phs = [Placeholder(trace, a, self, pos, o, None, differentiated)
               for o, a in enumerate(avals)]
        return phs if prim.multiple_results else phs[0]

    def _record(self, op: Op, feeds: list, start: int) -> None:
        pos = len(self.rec.ops)
        self.rec.ops.append(op)
        if feeds:
            self.rec.feeds[pos] = tuple(feeds)
        if self.telemetry is not None:
            self.telemetry.slice(events.RECORD, self.name, self.step, start,
                                 {"op": op.label, "where": op.where})

    def _where(self) -> str:
        # The source line is only for telemetry's record events: finding it
        # walks the stack, a cost every op would pay for nothing otherwise.
        return "" if self.telemetry is None else user_location()

    def _run_deferred(self, region: Region, upto: int) -> None:
        """Run the region's deferred ops up to position `upto`, in program order."""
        while region.pending and region.pending[0] <= upto:
            pos = region.pending.popleft()
            op = self.rec.ops[pos]
            vals = [local_value(self._deferred_input(region, pos, k, inp))
                    for k, inp in enumerate(op.inputs)]
            out = eval_primitive(op.prim, vals, op.params)
            self._fill(region, pos, out if op.multiple_results else (out,))
        if not region.pending and self.deferred is region:
            self.deferred = None

    def _deferred_input(self, region: Region, pos: int, k: int, inp: tuple) -> Any:
        kind, a, b = inp
        if kind == FEED:
            return region.captured[(FEED_REF, pos, k)]
        if kind == ARG or a < region.start:
            return region.captured[inp]
        v = region.values.get((a, b))
        return v if v is not None else self.resolve(a, b)

    def _fill(self, region: Region, pos: int, outs) -> None:
        """The values of deferred op `pos`; its recorded avals must be theirs."""
        op = self.rec.ops[pos]
        for o, v in enumerate(outs):
            region.values[(pos, o)] = self.cone[(pos, o)] = v
        if tuple(aval_of(v) for v in outs) != op.out_avals:
            self.internal_failure(AssertionError(
                f"{op.label}: deferred avals {op.out_avals} but ran to "
                f"{tuple(aval_of(v) for v in outs)}"), "recording a deferred op")

    # -- autodiff elision ------------------------------------------------------
    def in_region(self) -> bool:
        return self.region is not None and self.mode != PASSTHROUGH

    def differentiate(self, call: GradCall, args: tuple, kwargs: dict) -> Any:
        """`jax.grad(f)(*args)`: run f's primal ops, then one gradient op."""
        argnums = (call.argnums,) if isinstance(call.argnums, int) else tuple(call.argnums)
        if not self._can_elide() or not argnums or max(argnums) >= len(args):
            return call.original(*args, **kwargs)
        leaves, treedef = jax.tree.flatten([args[i] for i in argnums])
        copies = self._differentiable_copies(leaves)
        if copies is None:
            return call.original(*args, **kwargs)
        new_args = list(args)
        for i, tree in zip(argnums, jax.tree.unflatten(treedef, copies)):
            new_args[i] = tree
        region, out = self._run_region(copies, call.fun, new_args, kwargs)
        if call.has_aux:
            if not (isinstance(out, (tuple, list)) and len(out) == 2):
                raise TypeError("value_and_grad with has_aux=True requires the function to "
                                f"return a pair (output, aux); got {out!r}")
            value, aux = out
        else:
            value, aux = out, None
        check_gradient_output(value)
        if self._owns(value) and region.computed(value) and self.mode != PASSTHROUGH:
            grads = self._gradient_op(region, ((value._pos, value._out),), None, copies)
        else:  # the output does not depend on the differentiated values
            self._run_deferred(region, len(self.rec.ops))
            grads = [jax.numpy.zeros_like(c) for c in copies]
        region.values.clear()  # every value the region's ops read or made is settled now
        region.captured.clear()
        trees = jax.tree.unflatten(treedef, grads)
        g = trees[0] if isinstance(call.argnums, int) else tuple(trees)
        if call.with_value:
            return ((value, aux), g) if call.has_aux else (value, g)
        return (g, aux) if call.has_aux else g

    def vjp(self, call: VjpCall, primals: tuple) -> Any:
        """`jax.vjp(f, *primals)`: run f's primal ops; each pullback call is one gradient op."""
        leaves, treedef = jax.tree.flatten(primals)
        copies = self._differentiable_copies(leaves) if self._can_elide() else None
        if copies is None:
            return call.original(call.fun, *primals, has_aux=call.has_aux)
        region, out = self._run_region(copies, call.fun, jax.tree.unflatten(treedef, copies), {})
        aux = None
        if call.has_aux:
            if not (isinstance(out, (list, tuple)) and len(out) == 2):
                raise TypeError("expected function with aux output to return a two-element "
                                f"tuple, but got type {type(out)} with value {out!r}")
            out, aux = out
        pullback = Pullback(self, call, region, copies, treedef, out)
        return (out, pullback, aux) if call.has_aux else (out, pullback)

    def _can_elide(self) -> bool:
        return self.region is None and self.mode != PASSTHROUGH and self.active

    def _owns(self, x: Any) -> bool:
        return type(x) is Placeholder and x._run is self

    def _differentiable_copies(self, leaves: list) -> list | None:
        """Fresh placeholders of the leaves to differentiate; None if Terra cannot."""
        if not leaves or not all(_differentiable(x) for x in leaves):
            return None
        copies = [copy_value(x) for x in leaves]
        return copies if all(self._owns(c) for c in copies) else None

    def _run_region(self, copies: list, fun, args, kwargs: dict) -> tuple:
        """Run the differentiated function's Python on the copies: (Region, its output)."""
        if self.deferred is not None:  # left by a vjp, or a differentiated function that raised
            self._run_deferred(self.deferred, len(self.rec.ops))
        region = Region(len(self.rec.ops), tuple((c._pos, c._out) for c in copies))
        for c in copies:
            c._region = region
        self.region = region
        try:
            out = fun(*args, **kwargs)
        finally:
            region.open = False
            region.end = len(self.rec.ops)
            self.region = None
        return region, out

    def _gradient_op(self, region: Region, outs: tuple, cotangents: list | None,
                     copies: list) -> list:
        """One op: the gradient of the region's `outs`, seeded with `cotangents` (None: ones)."""
        pos = len(self.rec.ops)
        cts = cotangents or []
        spec = region.spec(outs, cotangents is not None, self.rec.ops)
        ct_inputs = tuple((NODE, c._pos, c._out) for c in cts)
        trace = copies[0]._trace
        if self.mode == COEXEC and debugging_op_by_op():
            self._diverge(_CHECKED_EAGERLY, divergence.DEBUGGING, divergence.DEBUGGING)
        if self.mode == COEXEC:
            for child in self.node.children:
                op = child.op
                if (op.prim is GRAD and op.params["spec"] == spec
                        and op.inputs[:len(cts)] == ct_inputs):
                    if child in self.program.ready:
                        outs = self._enter_node(trace, child, ())
                        if outs is not None:
                            return outs
                    break
            if self.mode == COEXEC:
                self._diverge("the function differentiated here took a path its recorded "
                              "gradient does not cover", divergence.GRADIENT, "gradient")
        inputs = [*ct_inputs, *((NODE, p, o) for p, o in region.diff), *external_inputs(spec)]
        vals = ([local_value(c.value()) for c in cts]
                + [local_value(self._region_input(region, inp)) for inp in inputs[len(cts):]])
        op = Op(GRAD, {"spec": spec}, tuple(inputs), (), True, self._where(), False, (),
                placements(None if i[0] == NODE else v for i, v in zip(inputs, vals)))
        start = 0 if self.telemetry is None else time.perf_counter_ns()
        # The replay computes the primal values of the deferred ops on its way.
        keep = [(p, o) for p in region.pending for o in range(len(self.rec.ops[p].out_avals))]
        grads, kept = run_gradient(op, vals, tuple(keep))  # runs below the step's trace
        values = dict(zip(keep, kept))
        while region.pending:
            p = region.pending.popleft()
            self._fill(region, p, [values[(p, o)] for o in range(len(self.rec.ops[p].out_avals))])
        if self.deferred is region:
            self.deferred = None
        op.out_avals = tuple(aval_of(g) for g in grads)
        op.out_placements = placements(grads)
        self._record(op, [], start)
        return [Placeholder(trace, a, self, pos, o, g)
                for o, (a, g) in enumerate(zip(op.out_avals, grads))]

    def _region_input(self, region: Region, inp: tuple) -> Any:
        v = region.captured.get(inp)
        if v is not None:
            return v
        kind, a, b = inp
        if kind == NODE:
            return self.resolve(a, b)
        if kind == ARG:
            return _device_value(self.args[a])
        return _device_value(self.rec.feeds[a][self.rec.ops[a].feed_slots.index(b)])

    def _is_data_arg(self, x: Any) -> bool:
        """A numpy argument (or jnp's view of one) is a data batch: never predicted."""
        if not self.data_arg_ids or not isinstance(x, np.ndarray):
            return False
        return id(x) in self.data_arg_ids or id(x.base) in self.data_arg_ids

    def _apply_passthrough(self, prim, args, params):
        return eval_primitive(prim, [self._concrete(x) for x in args], params)

    @staticmethod
    def _concrete(x: Any) -> Any:
        """What an eager op reads: the local value (a remote one is downloaded)."""
        return local_value(x.value() if type(x) is Placeholder else x)

    # -- values ----------------------------------------------------------------
    def resolve(self, pos: int, out: int) -> Any:
        """Value of op `pos` output `out`: from its segment, else by evaluating its cone."""
        key = (pos, out)
        v = self._available(key)
        if v is None:
            v = self._evaluate_cone(key)
        return v

    def _available(self, key) -> Any:
        # Past a divergence, positions name ops of the new path; the graph may
        # have run ahead on the old one, so its values only count for validated ops.
        if key[0] < len(self.nodes):
            v = self.env.get(key)
            if v is not None:
                return v
        v = self.cone.get(key)
        if v is not None:
            return v
        region = self.deferred
        if region is not None and region.pending and region.pending[0] <= key[0]:
            self._run_deferred(region, key[0])  # Python needs a deferred op's value now
            v = self.cone.get(key)
            if v is not None:
                return v
        pos = key[0]
        if self.program is None or pos >= len(self.nodes):
            return None
        seg = self.program.segment_of.get(self.nodes[pos])
        if seg is None or key not in seg.output_set:
            return None
        future = self.futures.get(id(seg))
        if future is None:
            return None
        start = None if future.done() else time.perf_counter()
        try:
            wait(future)
        except Exception as err:  # the segment failed to run: recompute eagerly
            self.internal_failure(err, "running a segment")
            self.futures.pop(id(seg), None)
            return None
        if start is not None:
            self.stats.fetch_waits += 1
            self.stats.wait_seconds += time.perf_counter() - start
        return self.env.get(key)

    def _evaluate_cone(self, key) -> Any:
        """Compute a value eagerly from the ops that produce it."""
        stack = [key]
        while stack:
            top = stack[-1]
            if self._available(top) is not None:
                stack.pop()
                continue
            pos = top[0]
            op = self.rec.ops[pos]
            missing = [(a, b) for kind, a, b in op.inputs
                       if kind == NODE and self._available((a, b)) is None]
            if missing:
                stack.extend(missing)
                continue
            vals = []
            for k, (kind, a, b) in enumerate(op.inputs):
                if kind == NODE:
                    vals.append(self._available((a, b)))
                elif kind == ARG:
                    vals.append(_device_value(self.args[a]))
                elif kind == FEED:
                    vals.append(_device_value(self.rec.feeds[pos][op.feed_slots.index(k)]))
                else:
                    vals.append(_device_value(
                        self.rec.feeds[a][self.rec.ops[a].feed_slots.index(b)]))
            vals = [local_value(v) for v in vals]
            if op.prim is GRAD:
                outs = run_gradient(op, vals)[0]
            else:
                out = eval_primitive(op.prim, vals, op.params)
                outs = out if op.multiple_results else (out,)
            for o, v in enumerate(outs):
                self.cone[(pos, o)] = v
            self.stats.cone_evaluations += 1
            stack.pop()
        return self.cone[key]

    def fetch(self, ph: Placeholder) -> Any:
        """Python needs the concrete value of `ph` (a sync point if not ready)."""
        self.stats.fetches += 1
        planned = True
        if self.active and ph._run is self:
            key = (ph._pos, ph._out)
            self.rec.fetches.append((len(self.rec.ops) - 1, key))
            if self.mode == COEXEC and not (self.node.fetch_after and key in self.node.needed):
                self.graph.note_fetch(self.node, key)  # unplanned: next graph cuts here
                planned = False
        if self.telemetry is None and not profiler.active():
            v = local_value(ph.value())
            _wait_ready(v, self.stats)
            return v
        start, waited = time.perf_counter_ns(), self.stats.wait_seconds
        with profiler.span("terra fetch", where=user_location()) if profiler.active() else profiler.OFF:
            v = local_value(ph.value())
            _wait_ready(v, self.stats)
        if self.telemetry is not None:
            self._fetch_event(ph, start, self.stats.wait_seconds - waited, planned)
        return v

    def _fetch_event(self, ph: Placeholder, start: int, wait_s: float, planned: bool) -> None:
        """Where the user fetched (file:line, variable name) and what it waited for."""
        frame = user_frame()
        data = {"wait_us": wait_s * 1e6, "planned": planned, "in_step": self.active,
                "where": "<unknown>" if frame is None else
                f"{frame.f_code.co_filename}:{frame.f_lineno}"}
        if frame is not None:
            data["name"] = next((k for k, v in frame.f_locals.items() if v is ph), None)
        run = ph._run
        if ph._pos < len(run.rec.ops):
            data["op"] = run.rec.ops[ph._pos].label
        if run.program is not None and ph._pos < len(run.nodes):
            seg = run.program.segment_of.get(run.nodes[ph._pos])
            if seg is not None and id(seg) in run.flows:
                data["flow"] = flow = run.flows[id(seg)]
                self.telemetry.note_ready(flow, time.perf_counter_ns())
        self.telemetry.slice(events.FETCH, self.name, self.owner._stats.steps, start, data)

    # -- step boundaries ---------------------------------------------------------
    def finish(self, out: Any) -> Any:
        """The step returned: unwrap returned placeholders, learn from the trace."""
        self.active = False
        leaves, treedef = jax.tree.flatten(out)
        returned = []
        for i, x in enumerate(leaves):
            if type(x) is Placeholder:
                if x._run is self:
                    returned.append((x._pos, x._out))
                leaves[i] = _returned_value(x)
        if self.mode == COEXEC:
            self.stats.coexecuted += 1
            node = self.node
            if not node.ends_here or any(k not in node.needed for k in returned):
                self.graph.note_end(node, returned)
        elif self.mode in (TRACING, FALLBACK):
            if self.mode == TRACING:
                self.stats.traced += 1
            self.rec.returned = returned
            self.graph.merge(self.rec)
        self._release()
        return jax.tree.unflatten(treedef, leaves)

    def abort(self) -> None:
        """The step raised: nothing is learned; held placeholders stay resolvable."""
        self.active = False
        if self.mode == COEXEC:
            self.stats.coexecuted += 1
        elif self.mode == TRACING:
            self.stats.traced += 1
        self._release()

    def _release(self) -> None:
        """Drop references to other steps' placeholders so memory stays bounded."""
        self.args = [_device_value(x) if type(x) is Placeholder else x for x in self.args]
        for pos, values in self.rec.feeds.items():
            if any(type(v) is Placeholder for v in values):
                self.rec.feeds[pos] = tuple(_device_value(v) if type(v) is Placeholder else v
                                            for v in values)

    def internal_failure(self, err: BaseException, doing: str) -> None:
        """Terra itself failed: raise in strict mode, else warn once and go eager."""
        if isinstance(err, TerraExecutorError):
            raise err  # not Terra's bug, and eager cannot recover what the executor held
        self.stats.internal_errors += 1
        if self.telemetry is not None:
            self.telemetry.instant(events.INTERNAL_ERROR, self.name, self.step,
                                   {"doing": doing, "error": repr(err)})
        if self.owner._strict:
            raise TerraInternalError(f"terra failed while {doing}: {err!r}") from err
        if self.stats.internal_errors == 1:
            warnings.warn(f"terra: internal error while {doing} in "
                          f"{self.owner.__name__!r} ({err!r}); finishing this step eagerly. "
                          "Set TERRA_STRICT=1 to raise instead.", TerraWarning, stacklevel=3)
        self.mode = PASSTHROUGH


class Pullback:
    """The pullback `jax.vjp` returns when Terra elided the differentiated region.

    Called in the step that made it, outside another differentiated region,
    with cotangents of exactly the outputs' types, it is one gradient op.
    Anywhere else (after the step, in a later step, with cotangents JAX would
    convert or reject) it runs JAX's own vjp of the region's recorded ops on
    their values: eager's results and eager's errors.
    """

    def __init__(self, run: StepRun, call: VjpCall, region: Region, copies: list,
                 primal_tree, out: Any):
        self._run, self._call, self._region, self._copies = run, call, region, copies
        self._primal_tree = primal_tree
        self._out_leaves, self._out_tree = jax.tree.flatten(out)
        self._outs = [(x._pos, x._out) if run._owns(x) and region.computed(x) else None
                      for x in self._out_leaves]

    def __call__(self, cotangent: Any) -> tuple:
        run = self._run
        cts = None
        if current_handler() is run and run._can_elide():
            cts = self._cotangent_placeholders(cotangent)
        if cts is None:
            return self._replayed(cotangent)
        grads = run._gradient_op(self._region, tuple(self._outs), cts, self._copies)
        return tuple(jax.tree.unflatten(self._primal_tree, grads))

    def _cotangent_placeholders(self, cotangent: Any) -> list | None:
        """The cotangent leaves as this step's placeholders; None where JAX must look at them."""
        if not all(key is not None and _inexact(x) for key, x in zip(self._outs, self._out_leaves)):
            return None
        try:
            leaves = self._out_tree.flatten_up_to(cotangent)
        except Exception:
            return None
        for ct, out in zip(leaves, self._out_leaves):
            if not (isinstance(ct, jax.Array) and ct.shape == out.shape and ct.dtype == out.dtype):
                return None
        run = self._run
        return [ct if run._owns(ct) else copy_value(ct) for ct in leaves]

    def _replayed(self, cotangent: Any) -> tuple:
        """JAX's vjp of the recorded region, on the values the step computed."""
        run, region, keys = self._run, self._region, self._outs
        spec = region.spec(tuple(k for k in keys if k is not None), True, run.rec.ops)
        primal = replay(spec, lambda inp: local_value(run._region_input(region, inp)))
        constants = [run._concrete(x) if run._owns(x) else x for x in self._out_leaves]

        @functools.wraps(self._call.fun)
        def region_function(*diff_vals):
            values = iter(primal(*diff_vals)[0])
            return jax.tree.unflatten(self._out_tree, [next(values) if k is not None else c
                                                       for k, c in zip(keys, constants)])

        diff_vals = [local_value(run._region_input(region, (NODE, *key))) for key in region.diff]
        _, pullback = self._call.original(region_function, *diff_vals)
        return tuple(jax.tree.unflatten(self._primal_tree, pullback(cotangent)))


def _deleted(x: Any) -> bool:
    """A deleted or donated array (a remote value is the executor's to check)."""
    return isinstance(x, jax.Array) and x.is_deleted()


def _arg_aval(run: StepRun, a: int) -> Any:
    aval = run.arg_avals[a]
    if aval is None:  # not a jax.Array: a numpy array or a Python value
        try:
            aval = aval_of(run.args[a])
        except TypeError:
            return None
    return aval


def _inexact(x: Any) -> bool:
    return jax.numpy.issubdtype(x.dtype, jax.numpy.inexact)


def _input_aval(inp: tuple, value: Any) -> Any:
    kind, a, b = inp
    if kind == NODE:
        return value.aval  # a placeholder
    return b if kind == ARG else a


def _differentiable(x: Any) -> bool:
    """Leaves Terra differentiates itself: float arrays (others go to JAX)."""
    return isinstance(x, jax.Array) and jax.numpy.issubdtype(x.dtype, jax.numpy.inexact)


class _RemoteResults:
    """Handler of returned placeholders whose values stay in a remote executor."""

    @staticmethod
    def fetch(ph: Placeholder) -> Any:
        return local_value(ph.value())


# Never installed as JAX's trace: its placeholders only ever fetch.
_REMOTE_RESULTS = TerraTrace(_RemoteResults())


def _returned_value(ph: Placeholder) -> Any:
    """What the step returns for `ph`: its array, or a placeholder of it if remote.

    A remote value stays in the executor (no per-step download of parameters);
    the placeholder behaves as a jax.Array outside the step (fetching on use)
    and, passed to the next step, is an argument naming the same handle.
    """
    v = ph.value()
    if isinstance(v, RemoteValue):
        return Placeholder(_REMOTE_RESULTS, ph.aval, _REMOTE_RESULTS.handler, ph._pos, ph._out, v)
    return v


def _slot_index(run: StepRun, pos: int, slot: int) -> int:
    return run.rec.ops[pos].feed_slots.index(slot)


def _device_value(x: Any) -> Any:
    return x.value() if type(x) is Placeholder else x


def _wait_ready(v: Any, stats) -> None:
    """Block until XLA has computed `v`, staying responsive to Ctrl-C."""
    is_ready = getattr(v, "is_ready", None)
    if is_ready is None:
        v.block_until_ready()
        return
    if is_ready():
        return
    stats.fetch_waits += 1
    start, delay = time.perf_counter(), 2e-5
    while not is_ready():
        time.sleep(delay)
        delay = min(delay * 2, 1e-3)
    stats.wait_seconds += time.perf_counter() - start
