"""Traces and the TraceGraph.

A *trace* is the ops of one step in program order. Each op input says where it
came from: an earlier op of the same step (`NODE pos out`), a step argument
(`ARG i`, a leaf of the flattened arguments), or a *feed* — any value Python
produced (a Python number, a numpy array, an array from outside the step).

The *TraceGraph* merges traces into a prefix tree: one `GraphNode` per op, with
a child per distinct next op. A path from the root is the op sequence of one
kind of step; where Python took a different branch, the tree branches. The tree
also remembers what Python did between ops (fetches, where steps ended) and
the feed values it saw, so generation knows where to cut segments and which
feeds are predictable.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from terra.intercept import Primitive, RecordedRule, is_jaxpr, jaxprs_equal, placement_of

# Input kinds: (NODE, pos, out) | (ARG, leaf_index, aval) | (FEED, aval, None or DATA)
#   | (FEED_REF, pos, slot): the value fed to op `pos` input `slot` (gradient ops
#     read the feeds of the region they differentiate)
NODE, ARG, FEED, FEED_REF = 0, 1, 2, 3
DATA = "data"  # third field of a FEED that comes from a numpy step argument
Input = tuple  # (kind, a, b)
ValueKey = tuple  # (pos, out): output `out` of op `pos` of the current step


@dataclass(eq=False, slots=True)
class Op:
    """One primitive application, as recorded (values are not kept here)."""

    prim: Primitive
    params: dict
    inputs: tuple            # tuple of Input
    out_avals: tuple         # one aval per output
    multiple_results: bool
    where: str               # user source location, for telemetry ("" while it is off)
    host_effect: bool        # must run in Python at its place (prints, callbacks)
    feed_slots: tuple = ()   # indices of inputs that are feeds
    # Shardings of committed arrays (see intercept.placement_of), one per input
    # (None for NODE inputs: their producer decides) and one per output; () when
    # all are None, as on a single device.
    placements: tuple = ()
    out_placements: tuple = ()
    # Set when one operator call (`x + y`) produced exactly this op and returned
    # one of its outputs: (operator name, operand index per input, (operand
    # index, value) of operands JAX baked into params, dispatch context, the
    # output returned). Not part of the op key.
    via: tuple | None = None

    @property
    def label(self) -> str:
        """The primitive's name; a nested jit adds its function's (`jit:greater`)."""
        name = self.params.get("name")
        return f"{self.prim.name}:{name}" if isinstance(name, str) else self.prim.name

    def same_as(self, other: "Op") -> bool:
        """Op-key equality: primitive, params, input origins, avals and placements."""
        return (self.prim is other.prim and self.inputs == other.inputs
                and self.placements == other.placements
                and params_equal(self.params, other.params))

    def placement(self, k: int) -> Any:
        """Placement of input `k` (None: uncommitted, or produced by another op)."""
        return self.placements[k] if self.placements else None

    def out_placement(self, o: int) -> Any:
        return self.out_placements[o] if self.out_placements else None


def placements(values) -> tuple:
    """Op.placements / out_placements of `values`: () unless some value is committed."""
    found = tuple([placement_of(v) for v in values])
    return found if found.count(None) != len(found) else ()


def params_equal(a: dict, b: dict) -> bool:
    if a is b:
        return True
    if a.keys() != b.keys():
        return False
    for k, x in a.items():
        y = b[k]
        if x is y:
            continue
        if not _value_equal(x, y):
            return False
    return True


def _value_equal(x: Any, y: Any) -> bool:
    if type(x) is not type(y):
        if type(x) is RecordedRule:  # a graph loaded from TERRA_CACHE_DIR meets the program
            return x.matches(y)
        return False
    if is_jaxpr(x):
        return jaxprs_equal(x, y)
    if isinstance(x, (tuple, list)):
        return len(x) == len(y) and all(a is b or _value_equal(a, b) for a, b in zip(x, y))
    if isinstance(x, np.ndarray):
        return x.shape == y.shape and x.dtype == y.dtype and bool(np.array_equal(x, y))
    try:
        return bool(x == y)
    except Exception:
        return False


# -- feed prediction ----------------------------------------------------------
# A feed whose value was the same in every recorded step is *predicted*: the
# graph is dispatched with the predicted value before Python reaches the op, and
# Python's actual value is checked when it gets there. A changing value (a
# learning-rate schedule, a data batch) is *live*: the segment waits for it.

_MAX_PREDICTED_SIZE = 64


def feed_token(value: Any) -> Any:
    """A comparable summary of a feed value, or None if it is not predictable."""
    if isinstance(value, (bool, int, float, complex)):
        return (type(value), getattr(value, "dtype", None), value)
    if isinstance(value, (np.ndarray, np.generic)):
        if value.size > _MAX_PREDICTED_SIZE:
            return None
        return (value.dtype, value.shape, value.tobytes())
    return None


def tokens_equal(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return False
    if isinstance(a[2], (float, complex)) and a[2] != a[2]:
        return False  # NaN != NaN: never predictable
    return a == b


@dataclass(slots=True)
class Recording:
    """The trace of one step as it is recorded, plus what Python did around it."""

    ops: list = field(default_factory=list)            # list[Op]
    feeds: dict = field(default_factory=dict)          # pos -> tuple of feed values
    fetches: list = field(default_factory=list)        # (after_pos, ValueKey)
    returned: list = field(default_factory=list)       # ValueKeys of returned values
    end_pos: int = -1                                   # pos of the last op


class GraphNode:
    """One op in the TraceGraph; `pos` is its index along its path."""

    __slots__ = ("op", "pos", "parent", "children", "fetch_after", "ends_here",
                 "needed", "feed_tokens", "feed_values", "id", "visits")

    def __init__(self, op: Op | None, pos: int, parent: "GraphNode | None", node_id: int):
        self.op = op
        self.pos = pos
        self.parent = parent
        self.children: list[GraphNode] = []
        self.fetch_after = False      # Python fetched a value right after this op
        self.ends_here = False        # some step ended right after this op
        self.needed: set = set()      # ValueKeys Python used after this op
        self.feed_tokens: dict = {}   # input index -> token (None once it varied)
        self.feed_values: dict = {}   # input index -> last value seen
        self.id = node_id
        self.visits = 0               # recorded steps that passed here

    def find_child(self, op: Op) -> "GraphNode | None":
        for child in self.children:
            if child.op.same_as(op):
                return child
        return None

    def predicted(self, k: int) -> bool:
        return self.feed_tokens.get(k) is not None


class TraceGraph:
    """The merge of all traces of one step function (a prefix tree of ops)."""

    def __init__(self) -> None:
        self.root = GraphNode(None, -1, None, 0)
        self.version = 0          # bumped whenever the graph changes shape
        self.endings = 0          # nodes where some step ended: the number of paths
        self.num_nodes = 0
        self.lock = threading.Lock()
        # Nodes loaded from TERRA_CACHE_DIR whose op no live op has matched yet:
        # their params are copies (compared structurally, slowly) until then.
        self.loaded: set = set()

    def merge(self, rec: Recording) -> bool:
        """Add a recorded trace; returns True if it added a new path."""
        with self.lock:
            node, grew = self.root, False
            fetches_by_pos: dict[int, list] = {}
            for after, key in rec.fetches:
                fetches_by_pos.setdefault(after, []).append(key)
            for pos, op in enumerate(rec.ops):
                child = node.find_child(op)
                if child is not None and self.loaded:
                    self.met_live_op(child, op.params)
                if child is None:
                    self.num_nodes += 1
                    child = GraphNode(op, pos, node, self.num_nodes)
                    node.children.append(child)
                    grew = True
                self._merge_feeds(child, rec.feeds.get(pos, ()), op)
                child.visits += 1
                node = child
                keys = fetches_by_pos.get(pos)
                if keys:
                    if not node.fetch_after:
                        node.fetch_after = True
                        grew = True
                    grew |= self._add_needed(node, keys)
            if node is not self.root:
                if not node.ends_here:
                    node.ends_here = True
                    self.endings += 1
                    grew = True
                grew |= self._add_needed(node, rec.returned)
            if grew:
                self.version += 1
            return grew

    def met_live_op(self, node: GraphNode, params: dict) -> None:
        """A live op matched a loaded node: keep the live params (identity compares fast)."""
        if node in self.loaded:
            node.op.params = params
            self.loaded.discard(node)

    def note_fetch(self, node: GraphNode, key: ValueKey) -> bool:
        """Co-execution saw a fetch the graph did not plan for; remember it."""
        with self.lock:
            grew = not node.fetch_after or key not in node.needed
            node.fetch_after = True
            node.needed.add(key)
            if grew:
                self.version += 1
            return grew

    def note_end(self, node: GraphNode, keys: list) -> bool:
        with self.lock:
            grew = not node.ends_here
            self.endings += grew
            node.ends_here = True
            grew |= self._add_needed(node, keys)
            if grew:
                self.version += 1
            return grew

    def mark_varying(self, node: GraphNode, k: int) -> None:
        """A predicted feed changed: from now on it is live."""
        with self.lock:
            node.feed_tokens[k] = None
            self.version += 1

    @staticmethod
    def _add_needed(node: GraphNode, keys) -> bool:
        new = [k for k in keys if k not in node.needed]
        node.needed.update(new)
        return bool(new)

    @staticmethod
    def _merge_feeds(node: GraphNode, values: tuple, op: Op) -> None:
        for k, value in zip(op.feed_slots, values):
            token = None if op.inputs[k][2] == DATA else feed_token(value)
            if k not in node.feed_tokens:
                node.feed_tokens[k] = token
            elif not tokens_equal(node.feed_tokens[k], token):
                node.feed_tokens[k] = None
            node.feed_values[k] = value

    def paths(self) -> int:
        """Number of distinct step endings (a measure of how many paths exist)."""
        return self.endings

    # Pickled as a flat list of nodes (parents before children): a path of
    # thousands of ops would otherwise nest as deep as it is long.
    def __getstate__(self) -> dict:
        with self.lock:
            nodes, order = [], {self.root: -1}
            stack = list(reversed(self.root.children))
            while stack:
                node = stack.pop()
                order[node] = len(nodes)
                nodes.append((order[node.parent], node.op, node.pos, node.id, node.fetch_after,
                              node.ends_here, node.needed, node.feed_tokens, node.feed_values,
                              node.visits))
                stack.extend(reversed(node.children))
            return {"nodes": nodes, "version": self.version, "endings": self.endings,
                    "num_nodes": self.num_nodes}

    def __setstate__(self, state: dict) -> None:
        self.__init__()
        built: list[GraphNode] = []
        for (parent, op, pos, node_id, fetch_after, ends_here, needed, tokens, values,
             visits) in state["nodes"]:
            parent_node = self.root if parent < 0 else built[parent]
            node = GraphNode(op, pos, parent_node, node_id)
            node.fetch_after, node.ends_here, node.needed = fetch_after, ends_here, needed
            node.feed_tokens, node.feed_values, node.visits = tokens, values, visits
            parent_node.children.append(node)
            built.append(node)
        self.version, self.endings = state["version"], state["endings"]
        self.num_nodes = state["num_nodes"]
        self.loaded = set(built)
