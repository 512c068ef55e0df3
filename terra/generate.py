"""Generation: TraceGraph -> segments -> compiled XLA executables.

The TraceGraph is cut into *blocks*: straight runs of ops with no branch (a
block ends where the graph branches or where a step ended). Inside a block,
ops are grouped into *segments* by the live feeds they depend on:

- level 0: ops that need only step arguments, predicted feeds and values of
  earlier blocks. Dispatched as soon as Python enters the block, so the graph
  runs ahead of Python.
- level g > 0: ops that (transitively) need the g-th group of live feeds, a
  value Python supplies mid-block. Dispatched when Python supplies the last
  feed of group g. A fetch closes a group, so a fetched value's segment is
  always dispatched before Python asks for it.

Each segment is one jitted function that replays its ops with `bind`; its
inputs are arguments, feeds and values of other segments, and its outputs are
the values anything outside the segment uses (another segment, a fetch, a
returned value). A `Program` is the set of segments of one TraceGraph version.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

from runtime.executor import Executor
from terra.autodiff import GRAD, apply_gradient_op
from terra.intercept import bind_op, uncommitted
from terra.trace import (ARG, FEED_REF, NODE, GraphNode, TraceGraph, ValueKey, feed_token,
                         tokens_equal)

# Segment input kinds.
ENV = 0      # (ENV, pos, out): a value computed by another segment or by Python
ARG_IN = 1   # (ARG_IN, leaf_index, None): a step argument
LIVE = 2     # (LIVE, pos, slot): a feed Python supplies when it applies op `pos`
CONST = 3    # (CONST, pos, slot): a predicted feed; the program holds its value

# Live feeds closer than this many ops share one group (one dispatch).
GROUP_SPAN = 32


@dataclass(eq=False)
class Segment:
    """A jitted piece of the skeleton graph."""

    nodes: list                                      # GraphNodes, in program order
    index: int = 0                                   # position in Program.segments (for telemetry)
    inputs: list = field(default_factory=list)       # [(kind, a, b)]
    in_avals: list = field(default_factory=list)
    in_placements: list = field(default_factory=list)   # sharding per input (None: movable)
    outputs: list = field(default_factory=list)      # [ValueKey]
    out_placements: list = field(default_factory=list)  # eager's sharding per output, or None
    constants: dict = field(default_factory=dict)    # input index -> predicted value
    executable: Any = None

    def finalize(self) -> None:
        self.output_set = frozenset(self.outputs)
        self._place_constants()

    def mesh_sharding(self) -> Any:
        """A sharding replicated over the devices the segment's committed values live on.

        None when no value is committed (the single-device case: compiled as
        eager places values, on the default device), or when the committed
        shardings are of a kind it cannot replicate over (then XLA picks the
        shardings of uncommitted outputs).
        """
        pinned = [p for p in (*self.in_placements, *self.out_placements) if p is not None]
        if not pinned:
            return None
        named = next((p for p in pinned if isinstance(p, NamedSharding)), None)
        if named is not None:
            return NamedSharding(named.mesh, PartitionSpec())
        return pinned[0] if isinstance(pinned[0], SingleDeviceSharding) else None

    def _place_constants(self) -> None:
        """Put predicted values where the graph reads them once, not on every dispatch."""
        replicated = self.mesh_sharding()
        if replicated is None:
            return
        for i, value in self.constants.items():
            if self.in_placements[i] is None:
                self.in_placements[i] = replicated
                self.constants[i] = jax.device_put(value, replicated)

    def set_constant(self, i: int, value: Any) -> None:
        """Predict `value` for constant input `i` from the next dispatch on."""
        value = device_constant(value, self.in_avals[i])
        placement = self.in_placements[i]
        self.constants[i] = value if placement is None else jax.device_put(value, placement)

    @property
    def signature(self) -> tuple:
        """Identifies the computation: same nodes, inputs and outputs."""
        return (tuple(n.id for n in self.nodes), tuple(self.inputs), tuple(self.outputs))


@dataclass(eq=False)
class Program:
    """All segments generated from one version of a TraceGraph."""

    version: int
    segment_of: dict            # GraphNode -> Segment (absent for host-effect ops)
    dispatch_at: dict           # GraphNode -> [Segment] to dispatch once Python validated it
    blocks: list                # (nodes, segments) of each block
    segments: list
    predictions: dict           # GraphNode -> ((slot, feed token), ...) baked into segments
    constant_inputs: dict       # (GraphNode, slot) -> [(Segment, input index)] holding its value
    # GraphNodes that can co-execute: those of blocks whose segments all have
    # executables (published by the compile thread once it compiled them).
    ready: frozenset = frozenset()

    def mark_ready(self) -> None:
        """Publish the blocks whose segments are all compiled by now."""
        ready = set(self.ready)
        for nodes, segments in self.blocks:
            if nodes[0] not in ready and all(s.executable is not None for s in segments):
                ready.update(nodes)
        self.ready = frozenset(ready)

    def compile_order(self) -> list:
        """Segments of the paths recorded steps took most often first, then in the order
        Python reaches them (parents before children)."""
        return sorted(self.segments, key=lambda seg: (-seg.nodes[0].visits, seg.nodes[0].pos))

    def repredict(self) -> int:
        """Predict the value Python fed last wherever it differs from the prediction.

        A Python number that changes now and then (a plateau schedule) then costs
        the one step that saw it change: the segments take the new value as an
        input, nothing is recompiled. Returns how many predictions changed.
        """
        changed = 0
        for node, predicted in self.predictions.items():
            fresh = []
            for k, token in predicted:
                value = node.feed_values.get(k)
                new = feed_token(value)
                # tokens_equal(new, new) is False for NaN and unpredictable values.
                if tokens_equal(new, new) and not tokens_equal(new, token):
                    for seg, i in self.constant_inputs.get((node, k), ()):
                        seg.set_constant(i, value)
                    token, changed = new, changed + 1
                fresh.append((k, token))
            self.predictions[node] = tuple(fresh)
        return changed


def runs_ahead_with(node: GraphNode, k: int) -> bool:
    """Whether the graph runs ahead with feed `k` of `node`'s last value.

    Seen once, only a scalar is (a Python number, a 0-d array): a numpy array
    is mostly host code's result on this step's values (different next step),
    a scalar mostly a constant (a scale, an epsilon, a mask's fill value).
    """
    if not node.predicted(k):
        return False
    return node.visits > 1 or np.ndim(node.feed_values.get(k)) == 0


def build_program(graph: TraceGraph) -> Program:
    """Cut the TraceGraph into blocks and segments (Python work, no compiling)."""
    with graph.lock:
        segment_of: dict[GraphNode, Segment] = {}
        dispatch_at: dict[GraphNode, list] = {}
        blocks: list[tuple] = []
        segments: list[Segment] = []
        level_of: dict[GraphNode, int] = {}
        predictions: dict[GraphNode, tuple] = {}
        constant_inputs: dict[tuple, list] = {}
        for block in _blocks(graph.root):
            for n in block:
                predicted = tuple((k, n.feed_tokens[k]) for k in n.op.feed_slots
                                  if runs_ahead_with(n, k))
                if predicted:
                    predictions[n] = predicted
            block_segments = []
            for level, (nodes, dispatch_node) in sorted(_assign_levels(block, level_of).items()):
                seg = Segment(nodes, index=len(segments))
                for n in nodes:
                    segment_of[n] = seg
                dispatch_at.setdefault(dispatch_node, []).append(seg)
                segments.append(seg)
                block_segments.append(seg)
            blocks.append((block, block_segments))
        _wire_inputs_and_outputs(graph.root, segment_of, constant_inputs)
        for seg in segments:
            seg.finalize()
        return Program(graph.version, segment_of, dispatch_at, blocks, segments, predictions,
                       constant_inputs)


def _blocks(root: GraphNode):
    """Maximal straight runs of nodes: a block ends at a branch or a step end."""
    starts = list(root.children)
    while starts:
        node = starts.pop()
        block = [node]
        while len(node.children) == 1 and not node.ends_here:
            node = node.children[0]
            block.append(node)
        starts.extend(node.children)
        yield block


def _assign_levels(block: list, level_of: dict) -> dict:
    """Group a block's ops by the live-feed group they depend on.

    Returns {level: (nodes, node after which the segment can be dispatched)}.
    """
    first_pos = block[0].pos
    group, group_start, closed = 0, 0, True
    last_live_of_group: dict[int, GraphNode] = {}
    levels: dict[int, list] = {}
    for i, node in enumerate(block):
        op = node.op
        live = op.host_effect or any(not runs_ahead_with(node, k) for k in op.feed_slots)
        level = 0
        if live:
            if closed or i - group_start >= GROUP_SPAN:
                group, group_start, closed = group + 1, i, False
            level = group
            last_live_of_group[group] = node
        for kind, p, _ in op.inputs:
            if (kind == NODE or kind == FEED_REF) and p >= first_pos:
                level = max(level, level_of[block[p - first_pos]])
        level_of[node] = level
        if not op.host_effect:
            levels.setdefault(level, []).append(node)
        if node.fetch_after or op.host_effect:
            closed = True
    return {lvl: (nodes, block[0] if lvl == 0 else last_live_of_group[lvl])
            for lvl, nodes in levels.items()}


def _wire_inputs_and_outputs(root: GraphNode, segment_of: dict, constant_inputs: dict) -> None:
    """Walk every path; give each segment its inputs and needed outputs.

    `constant_inputs` collects which segment inputs hold each predicted feed.
    """
    inputs_seen: dict[int, set] = {}
    outputs_seen: dict[int, set] = {}
    path: list[GraphNode] = []
    stack = [(child, 0) for child in reversed(root.children)]

    def need(producer: GraphNode, key: ValueKey, consumer: Segment | None) -> None:
        seg = segment_of.get(producer)
        if seg is None or seg is consumer:
            return
        seen = outputs_seen.setdefault(id(seg), set())
        if key not in seen:
            seen.add(key)
            seg.outputs.append(key)
            seg.out_placements.append(producer.op.out_placement(key[1]))

    def take(seg: Segment, inp: tuple, aval, placement, feed_of: GraphNode | None = None) -> None:
        seen = inputs_seen.setdefault(id(seg), set())
        if inp not in seen:
            seen.add(inp)
            if inp[0] == CONST:
                seg.constants[len(seg.inputs)] = device_constant(feed_of.feed_values[inp[2]], aval)
                constant_inputs.setdefault((feed_of, inp[2]), []).append((seg, len(seg.inputs)))
            seg.inputs.append(inp)
            seg.in_avals.append(aval)
            seg.in_placements.append(placement)

    def take_feed(seg: Segment, fed: GraphNode, k: int) -> None:
        aval, placement = fed.op.inputs[k][1], fed.op.placement(k)
        if runs_ahead_with(fed, k):
            take(seg, (CONST, fed.pos, k), aval, placement, fed)
        else:
            take(seg, (LIVE, fed.pos, k), aval, placement)

    while stack:
        node, depth = stack.pop()
        del path[depth:]
        path.append(node)
        seg = segment_of.get(node)
        for k, (kind, a, b) in enumerate(node.op.inputs):
            if kind == NODE:
                producer = path[a]
                need(producer, (a, b), seg)
                if seg is not None and segment_of.get(producer) is not seg:
                    take(seg, (ENV, a, b), producer.op.out_avals[b], producer.op.out_placement(b))
            elif seg is None:
                continue
            elif kind == ARG:
                take(seg, (ARG_IN, a, None), b, node.op.placement(k))
            elif kind == FEED_REF:
                take_feed(seg, path[a], b)
            else:
                take_feed(seg, node, k)
        for p, o in sorted(node.needed):  # sorted: the same graph lowers to the same text
            need(path[p], (p, o), None)
        for child in reversed(node.children):
            stack.append((child, depth + 1))


def segment_function(seg: Segment) -> Callable:
    """The function jit traces for a segment: replay its ops with `bind`."""
    index = {inp: i for i, inp in enumerate(seg.inputs)}

    def source(pos: int, k: int, inp: tuple) -> tuple:
        kind, a, b = inp
        if kind == NODE:
            i = index.get((ENV, a, b))
            return ("env", (a, b)) if i is None else ("in", i)
        if kind == ARG:
            return ("in", index[(ARG_IN, a, None)])
        if kind == FEED_REF:
            pos, k = a, b
        i = index.get((LIVE, pos, k))
        return ("in", index[(CONST, pos, k)] if i is None else i)

    steps = [(n.pos, n.op, [source(n.pos, k, inp) for k, inp in enumerate(n.op.inputs)])
             for n in seg.nodes]
    outputs = seg.outputs

    def run(*xs):
        env: dict = {}
        for pos, op, sources in steps:
            vals = [env[ref] if where == "env" else xs[ref] for where, ref in sources]
            out = apply_gradient_op(op, vals) if op.prim is GRAD else bind_op(op.prim, vals, op.params)
            if op.multiple_results:
                for o, v in enumerate(out):
                    env[(pos, o)] = v
            else:
                env[(pos, 0)] = out
        return [env[key] for key in outputs]

    return run


def compile_segment(seg: Segment, executor: Executor) -> Any:
    """Compile one segment for `executor` (runs in the compile thread).

    Committed inputs and outputs keep eager's shardings (so sharded values stay
    sharded across segments and steps, and results live where eager's do).
    Outputs eager left uncommitted are computed replicated and handed back, like
    eager's, as movable arrays on the default device.
    """
    specs = [jax.ShapeDtypeStruct(a.shape, a.dtype, weak_type=getattr(a, "weak_type", False),
                                  sharding=p)
             for a, p in zip(seg.in_avals, seg.in_placements)]
    replicated = seg.mesh_sharding()
    if replicated is None:  # as on one device: eager's uncommitted values, compiled as they are
        return executor.compile_function(segment_function(seg), specs)
    out_shardings = [replicated if p is None else p for p in seg.out_placements]
    compiled = executor.compile_function(segment_function(seg), specs, out_shardings)
    movable = [i for i, p in enumerate(seg.out_placements) if p is None]
    if not movable:
        return compiled

    def run(*xs):
        outs = compiled(*xs)
        for i in movable:
            outs[i] = uncommitted(outs[i])
        return outs

    return run


def device_constant(value: Any, aval) -> Any:
    """A predicted feed value as a device array of the traced dtype."""
    if isinstance(value, jax.Array):
        return value
    return jax.device_put(np.asarray(value, dtype=aval.dtype))
