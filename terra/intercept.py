"""Interception: the only module that touches `jax._src`.

A `TerraTrace` is installed as JAX's current trace for the duration of a step.
Every `Primitive.bind` the step makes — jnp, lax, optax, flax, nested `jit`,
scan/cond/while, and whatever `jax.grad`'s JVP/linearize traces send down —
arrives in `process_primitive`, which hands it to the step's handler (the
recorder or the co-executor, see `coexec.py`). Values the handler returns are
`Placeholder`s: JAX tracers that know which op of which step produced them and
fetch their concrete value only when Python asks for it.
"""
from __future__ import annotations

import sys
from typing import Any, Callable, Protocol

import numpy as np
from jax._src import core

Primitive = core.Primitive
AbstractValue = core.AbstractValue
Tracer = core.Tracer

# Primitives whose effect is visible to Python (printing, host callbacks): they
# must run at their place in program order, never inside a graph.
_HOST_EFFECT_PRIMITIVES = frozenset({"debug_callback", "io_callback", "debug_print"})


class Handler(Protocol):
    """What a step run provides to the trace (see coexec.StepRun)."""

    def apply(self, trace: "TerraTrace", prim: Primitive, args: tuple, params: dict) -> Any: ...
    def resolve(self, pos: int, out: int) -> Any: ...
    def fetch(self, placeholder: "Placeholder") -> Any: ...


class TerraTrace(core.Trace):
    """One interpretation: forward every primitive to the step's handler."""

    __slots__ = ("handler",)

    def __init__(self, handler: Handler):
        super().__init__()
        self.handler = handler

    def process_primitive(self, prim, tracers, params, /):
        return self.handler.apply(self, prim, tracers, params)

    def stage_value(self, val):
        return val

    # Call-like and custom-derivative primitives are inlined: their bodies bind
    # ordinary primitives, which come back here one by one. `bind` has already
    # taken our trace off the stack, so put it back for the body.
    def process_call(self, call_primitive, f, tracers, params, /):
        with core.set_current_trace(self):
            return f.call_wrapped(*tracers)

    def process_custom_jvp_call(self, primitive, fun, jvp, tracers, /, *, symbolic_zeros):
        with core.set_current_trace(self):
            return fun.call_wrapped(*tracers)

    def process_custom_vjp_call(self, primitive, fun, fwd, bwd, tracers, /, *,
                                out_trees, symbolic_zeros):
        with core.set_current_trace(self):
            return fun.call_wrapped(*tracers)


def _fetched(method: str) -> Callable:
    """A method that fetches the value and applies `method` to the jax.Array."""
    def forward(self, *args, **kwargs):
        return getattr(self.fetch(), method)(*args, **kwargs)
    forward.__name__ = method
    return forward


class Placeholder(core.Tracer):
    """An array whose value is produced by op `pos` (output `out`) of a step.

    Invariant: `_value` is None until resolved; once set it is a jax.Array
    (possibly still being computed by XLA) and never changes.
    """

    __slots__ = ("_run", "_pos", "_out", "_value")

    def __init__(self, trace: TerraTrace, aval: AbstractValue, run: Handler,
                 pos: int, out: int, value: Any = None):
        self._trace = trace
        self.aval = aval
        self._run = run
        self._pos = pos
        self._out = out
        self._value = value

    # -- value access -------------------------------------------------------
    def value(self) -> Any:
        """The device array (maybe not computed yet); never blocks on XLA."""
        v = self._value
        if v is None:
            v = self._value = self._run.resolve(self._pos, self._out)
        return v

    def fetch(self) -> Any:
        """The device array once computed: Python needs the concrete value."""
        return self._run.fetch(self)

    # jnp probes this opportunistically; answering would change the op sequence.
    def to_concrete_value(self):
        return None

    # Escaped placeholders used by eager JAX outside the step: EvalTrace and
    # jit call this before their escaped-tracer check.
    def full_lower(self):
        return self.value()

    # -- conversions Python uses on a value (each one is a fetch) ------------
    def __array__(self, dtype=None, copy=None):
        return np.asarray(self.fetch(), dtype=dtype)

    def __bool__(self):
        return bool(self.fetch())

    def __int__(self):
        return int(self.fetch())

    def __float__(self):
        return float(self.fetch())

    def __complex__(self):
        return complex(self.fetch())

    def __index__(self):
        return self.fetch().__index__()

    def __hex__(self):
        return hex(self.fetch())

    def __oct__(self):
        return oct(self.fetch())

    def __repr__(self):
        return repr(self.fetch())

    def __str__(self):
        return str(self.fetch())

    def __format__(self, spec):
        return format(self.fetch(), spec)

    def __reduce__(self):  # pickles by value, as a jax.Array
        return self.fetch().__reduce__()

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self

    tolist = _fetched("tolist")
    item = _fetched("item")
    tobytes = _fetched("tobytes")
    __dlpack__ = _fetched("__dlpack__")
    __dlpack_device__ = _fetched("__dlpack_device__")
    addressable_data = _fetched("addressable_data")
    devices = _fetched("devices")
    is_deleted = _fetched("is_deleted")
    delete = _fetched("delete")
    copy_to_host_async = _fetched("copy_to_host_async")
    on_device_size_in_bytes = _fetched("on_device_size_in_bytes")
    unsafe_buffer_pointer = _fetched("unsafe_buffer_pointer")

    def block_until_ready(self):
        self.fetch().block_until_ready()
        return self

    sharding = property(lambda self: self.fetch().sharding)
    device = property(lambda self: self.fetch().device)
    committed = property(lambda self: self.fetch().committed)
    addressable_shards = property(lambda self: self.fetch().addressable_shards)
    global_shards = property(lambda self: self.fetch().global_shards)
    is_fully_addressable = property(lambda self: self.fetch().is_fully_addressable)
    is_fully_replicated = property(lambda self: self.fetch().is_fully_replicated)


# `core.concrete_or_error` is how jnp asks for a value it must have (item(),
# jnp.arange(n), shapes from values, ...): a placeholder answers with a fetch.
_original_concrete_or_error = core.concrete_or_error


def _concrete_or_error(force: Any, val: Any, context: str = ""):
    if type(val) is Placeholder:
        val = val.fetch()
    return _original_concrete_or_error(force, val, context)


core.concrete_or_error = _concrete_or_error


# -- helpers the rest of Terra uses instead of touching jax._src -------------

def install(trace: TerraTrace):
    """Context manager making `trace` JAX's current trace (this thread only)."""
    return core.set_current_trace(trace)


def eval_primitive(prim: Primitive, args: Any, params: dict) -> Any:
    """Run one primitive eagerly, below any Terra trace."""
    with core.take_current_trace():
        return prim.bind(*args, **params)


aval_of: Callable[[Any], AbstractValue] = core.typeof


def has_host_effect(prim: Primitive, params: dict) -> bool:
    """Whether the op must run at its place in Python's order (prints, callbacks)."""
    if prim.name in _HOST_EFFECT_PRIMITIVES:
        return True
    for v in params.values():
        effects = getattr(v, "effects", None)
        if effects:
            return True
    return False


def jaxprs_equal(a: Any, b: Any) -> bool:
    """Structural equality of two (closed) jaxprs: same text, same constants."""
    if a is b:
        return True
    if type(a) is not type(b):
        return False
    if str(a) != str(b):
        return False
    consts_a = getattr(a, "consts", ())
    consts_b = getattr(b, "consts", ())
    if len(consts_a) != len(consts_b):
        return False
    return all(c is d or np.array_equal(np.asarray(c), np.asarray(d))
               for c, d in zip(consts_a, consts_b))


def is_jaxpr(x: Any) -> bool:
    return isinstance(x, (core.Jaxpr, core.ClosedJaxpr))


_TERRA_DIR = __file__.rsplit("/", 1)[0]
_SKIP_PREFIXES = (_TERRA_DIR, "<frozen", sys.prefix + "/lib")  # sys.prefix: our venv's site-packages


def user_location(skip: tuple[str, ...] = ()) -> str:
    """`file:line` of the innermost frame outside JAX, Terra and libraries."""
    f = sys._getframe(1)
    prefixes = _SKIP_PREFIXES + skip
    while f is not None:
        name = f.f_code.co_filename
        if not name.startswith(prefixes) and "site-packages" not in name:
            return f"{name}:{f.f_lineno}"
        f = f.f_back
    return "<unknown>"
