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

import functools
import pickle
import sys
import threading
from typing import Any, Callable, Protocol

import jax
import jax.extend.core as jex_core
import numpy as np
from jax._src import (
    api_util, array, config, core, custom_derivatives, dtypes, literals, pjit, source_info_util,
    tree_util,
)
from jax._src import linear_util as lu
from jax._src.interpreters import pxla
from jax._src.lib import _jax
from jax._src.interpreters import partial_eval as pe
from jax._src.lax import lax as lax_internal
from jax._src.sharding_impls import UnspecifiedValue

from runtime import executor

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
    def in_region(self) -> bool: ...
    def differentiate(self, grad_call: "GradCall", args: tuple, kwargs: dict) -> Any: ...
    def vjp(self, vjp_call: "VjpCall", primals: tuple) -> Any: ...
    def replay_operator(self, name: str, values: tuple) -> Any: ...
    def operator_mark(self) -> int: ...
    def note_operator(self, mark: int, name: str, values: tuple, result: Any) -> None: ...
    def internal_failure(self, err: BaseException, doing: str) -> None: ...


class TerraTrace(core.Trace):
    """One interpretation: forward every primitive to the step's handler."""

    __slots__ = ("handler", "parent")

    def __init__(self, handler: Handler | None):
        super().__init__()
        self.handler = handler  # the running step's; swapped for each step
        self.parent = core.eval_trace  # the trace eager would run the step under

    def process_primitive(self, prim, tracers, params, /):
        return self.handler.apply(self, prim, tracers, params)

    # `jnp.asarray(host_array)` lands here. Eager execution makes it a device
    # array; so must we: handed back as numpy, the user's next ops would run in
    # NumPy (not eager's semantics, no `.at`) and a data batch derived from it
    # would reach the graph looking like a constant Python value.
    def stage_value(self, val):
        if isinstance(val, (core.Tracer, jax.Array)):
            return val
        return self.process_primitive(core.stage_p, (val,), {})

    # Call-like and custom-derivative primitives are inlined: their bodies bind
    # ordinary primitives, which come back here one by one. `bind` has already
    # taken our trace off the stack, so put it back for the body.
    def process_call(self, call_primitive, f, tracers, params, /):
        with core.set_current_trace(self):
            return f.call_wrapped(*tracers)

    # Inside a region whose gradient Terra computes (autodiff elision), a custom
    # derivative must survive into the replay: record it as one staged op.
    def process_custom_jvp_call(self, primitive, fun, jvp, tracers, /, *, symbolic_zeros):
        if self.handler.in_region():
            staged = _stage_custom_call(primitive, (fun, jvp), tracers,
                                        dict(symbolic_zeros=symbolic_zeros))
            if staged is not None:
                return self._apply_staged(primitive, tracers, staged)
        with core.set_current_trace(self):
            return fun.call_wrapped(*tracers)

    def process_custom_vjp_call(self, primitive, fun, fwd, bwd, tracers, /, *,
                                out_trees, symbolic_zeros):
        if self.handler.in_region():
            staged = _stage_custom_call(primitive, (fun, fwd, bwd), tracers,
                                        dict(out_trees=out_trees, symbolic_zeros=symbolic_zeros))
            if staged is not None:
                return self._apply_staged(primitive, tracers, staged)
        with core.set_current_trace(self):
            return fun.call_wrapped(*tracers)

    # Mutable hijax values (e.g. flax Variables made with `hijax=True`) keep
    # per-trace state that Terra cannot stage: the step finishes eagerly.
    def cur_qdd(self, x):
        self.handler.internal_failure(
            NotImplementedError("jax.experimental.cur_qdd: a mutable hijax value (flax "
                                "Variable with hijax=True) is not supported"),
            "reading a hijax value's state")
        return x.cur_qdd()

    def _apply_staged(self, primitive, tracers, staged):
        params, consts, n_outs = staged
        outs = self.handler.apply(self, primitive, (*consts, *tracers), params)
        return outs if n_outs is None else list(outs)


def _fetched(method: str) -> Callable:
    """A method that fetches the value and applies `method` to the jax.Array."""
    def forward(self, *args, **kwargs):
        if self._differentiated() and hasattr(core.Tracer, method):
            return getattr(core.Tracer, method)(self, *args, **kwargs)
        return getattr(self.fetch(), method)(*args, **kwargs)
    forward.__name__ = method
    return forward


class Placeholder(core.Tracer):
    """An array whose value is produced by op `pos` (output `out`) of a step.

    Invariant: `_value` is None until resolved; once set it is a jax.Array
    (possibly still being computed by XLA) and never changes.
    """

    __slots__ = ("_run", "_pos", "_out", "_value", "_region")

    def __init__(self, trace: TerraTrace, aval: AbstractValue, run: Handler,
                 pos: int, out: int, value: Any = None, region: Any = None):
        self._trace = trace
        self.aval = aval
        self._run = run
        self._pos = pos
        self._out = out
        self._value = value
        self._region = region   # set while the value is being differentiated

    def _differentiated(self) -> bool:
        """Inside `jax.grad(f)` this value is a JAX GradTracer in eager mode."""
        region = self._region
        return region is not None and region.open

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
        return local_value(self.value())

    # -- conversions Python uses on a value (each one is a fetch) ------------
    # A value being differentiated behaves as eager's GradTracer does: bool,
    # int and index see its primal value; float, numpy and friends raise.
    # NumPy's protocol is the array's own: `np.array` copies (writable), `np.asarray` views.
    def __array__(self, dtype=None, context=None, copy=None):
        if self._differentiated():
            return core.Tracer.__array__(self)
        return self.fetch().__array__(dtype=dtype, copy=copy)

    # A jax.Array's (a Tracer's is 1000): NumPy's binary operators defer to it as to eager's.
    __array_priority__ = array.ArrayImpl.__array_priority__

    def __bool__(self):
        return bool(self.fetch())

    def __int__(self):
        return int(self.fetch())

    def __float__(self):
        if self._differentiated():
            return core.Tracer.__float__(self)
        return float(self.fetch())

    def __complex__(self):
        if self._differentiated():
            return core.Tracer.__complex__(self)
        return complex(self.fetch())

    def __index__(self):
        return self.fetch().__index__()

    def __hex__(self):
        return hex(self.fetch())

    def __oct__(self):
        return oct(self.fetch())

    def __repr__(self):
        if self._differentiated():
            return (f"GradTracer(primal={self.fetch()!s}, "
                    f"typeof(tangent)={self.aval.str_short(True)})")
        return repr(self.fetch())

    def __str__(self):
        if self._differentiated():
            return repr(self)
        return str(self.fetch())

    def __format__(self, spec):
        if self._differentiated():
            if spec:
                raise TypeError("unsupported format string passed to LinearizeTracer.__format__")
            return repr(self)
        return format(self.fetch(), spec)

    def __reduce__(self):  # pickles by value, as a jax.Array
        if self._differentiated():
            return core.Tracer.__reduce__(self)
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


# -- operators: replayed from the graph while co-executing -------------------
# `x + y` on placeholders runs jnp's operator Python, a nested jit's Python
# path and validation: ~40 us. When the TraceGraph recorded that this operator,
# on operands of these origins and avals, produced exactly the expected op, the
# co-executing step enters that node directly (see coexec.StepRun.replay_operator).
OPERATORS = ("__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__",
             "__truediv__", "__rtruediv__", "__floordiv__", "__mod__", "__matmul__",
             "__rmatmul__", "__pow__", "__rpow__", "__neg__", "__abs__",
             "__lt__", "__le__", "__gt__", "__ge__")


def _operator(name: str) -> Callable:
    jax_operator = getattr(core.Tracer, name)

    def operator(self, *operands):
        # After its step, on another thread, or debugging op by op (jnp's path checks each op).
        if core.trace_ctx.trace is not self._trace or debugging_op_by_op():
            return jax_operator(self, *operands)
        run, values = self._run, (self, *operands)
        out = run.replay_operator(name, values)
        if out is not None:
            return out
        mark = run.operator_mark()
        result = jax_operator(self, *operands)
        run.note_operator(mark, name, values, result)
        return result
    operator.__name__ = name
    return operator


for _name in OPERATORS:
    setattr(Placeholder, _name, _operator(_name))

_SCALARS = (bool, int, float, complex)
_SCALAR_TYPES = frozenset(_SCALARS)


def operand_value(x: Any) -> Any:
    """An operator's operand as JAX's jit receives it; None if the replay cannot tell."""
    if type(x) is Placeholder:
        return x
    if isinstance(x, _SCALARS) or (isinstance(x, (np.ndarray, np.generic))
                                   and not isinstance(x, core.Tracer)):
        try:
            return dtypes.canonicalize_value(x)
        except Exception:
            return None  # the operator raises: eager's path says how
    if isinstance(x, jax.Array) and not isinstance(x, core.Tracer):
        return x
    return None


def dispatch_context() -> tuple:
    """What jnp's operators depend on besides their operands: the config (the
    abstract mesh is part of it) and the concrete mesh, the two that decide
    `pjit.get_ctx_mesh(False)`, read without computing it."""
    return config.trace_context(), config.device_context.value


def operator_signature(values: tuple) -> tuple | None:
    """What jnp's operator decides its op by: each operand's type and aval (a Python
    scalar's value decides it only where the op bakes it in, checked apart).
    None: an operand of another kind, which only the operator's own path handles."""
    sig = []
    for x in values:
        t = type(x)
        if t is Placeholder:
            sig.append((t, x.aval))
        elif t in _SCALAR_TYPES:
            sig.append(t)
        elif t is array.ArrayImpl:
            sig.append((t, aval_of(x)))
        elif t is np.ndarray or isinstance(x, np.generic):
            sig.append((t, x.shape, x.dtype))
        else:
            return None
    return tuple(sig)


def apply_op(trace: TerraTrace, prim: Primitive, args: list, params: dict) -> Any:
    """Apply an op to operator operands (`operand_value`s) as `bind` would, with
    `trace` current: the trace sees it as if jnp's operator had bound it."""
    prev = core.trace_ctx.trace
    core.trace_ctx.set_trace(core.eval_trace)
    try:
        return trace.process_primitive(prim, args, params)
    finally:
        core.trace_ctx.set_trace(prev)


# `core.concrete_or_error` is how jnp asks for a value it must have (item(),
# jnp.arange(n), shapes from values, ...): a placeholder answers with a fetch.
_original_concrete_or_error = core.concrete_or_error


def _concrete_or_error(force: Any, val: Any, context: str = ""):
    if type(val) is Placeholder:
        val = val.fetch()
    return _original_concrete_or_error(force, val, context)


core.concrete_or_error = _concrete_or_error


# A placeholder's aval is asked for on every op (by bind, jit, validation):
# give its type JAX's fast lookup instead of a walk along its MRO.
core.pytype_aval_mappings[Placeholder] = lambda x: x.aval


# -- nested jits under a Terra trace -------------------------------------------
# A jnp ufunc is a small `jax.jit`. Called on a placeholder it misses jit's C++
# fast path and takes pjit's Python path: argument parsing, abstractification,
# a cache lookup, argument checks. Under a TerraTrace the common call (leaf
# positional arguments, none static) needs only the function, the avals, the
# mesh and the config to find the jaxpr it traced before.
_JIT_CACHE_SIZE = 4096
_jit_params: dict = {}   # (fun, jit info, avals, mesh, config) -> PjitParams
_slow_infer_params = pjit._infer_params
_slow_run_python_pjit = pjit._run_python_pjit


def _infer_params_fast(fun, ji, args, kwargs):
    if type(core.trace_ctx.trace) is not TerraTrace or kwargs or _static_given(ji, args):
        return _slow_infer_params(fun, ji, args, kwargs)
    avals = _leaf_avals(args)
    if avals is None:
        return _slow_infer_params(fun, ji, args, kwargs)
    mesh = pjit.get_ctx_mesh(True) if ji.use_resource_env else config.device_context.value
    key = (fun, ji, avals, mesh, config.trace_context())
    p = _jit_params.get(key)
    if p is None:
        p, args_flat = _slow_infer_params(fun, ji, args, kwargs)
        if not p.params["jaxpr"].jaxpr.is_high:
            if len(_jit_params) >= _JIT_CACHE_SIZE:
                _jit_params.pop(next(iter(_jit_params)))
            _jit_params[key] = p
        return p, args_flat
    return p, [*p.consts, *args]


def _leaf_avals(args) -> tuple | None:
    """The avals of array-like arguments; None if one is a pytree, a ref or unknown."""
    avals = []
    for x in args:
        if type(x) is array.ArrayImpl:
            aval = aval_of(x)
        else:
            to_aval = core.pytype_aval_mappings.get(type(x))  # never formats x (a fetch)
            if to_aval is None:
                return None
            aval = to_aval(x)
        if type(aval) is not core.ShapedArray:  # refs, tokens: JAX checks them
            return None
        avals.append(aval)
    return tuple(avals)


def _static_given(ji, args) -> bool:
    """Whether a static argument is among the positional ones (it is keyed by value)."""
    if not ji.static_argnums:
        return False
    n = len(args)
    return any(-n <= i < n for i in ji.static_argnums)


def _run_python_pjit_fast(p, args_flat, fun, args, kwargs):
    # The arguments were abstractified already; no compiled executable comes back.
    trace = core.trace_ctx.trace
    if type(trace) is not TerraTrace or p.params["jaxpr"].jaxpr.is_high:
        return _slow_run_python_pjit(p, args_flat, fun, args, kwargs)
    try:
        out_flat = _bind_jit(trace, args_flat, p.params)
    except api_util.InternalFloatingPointError as e:  # debug_nans/infs: what eager's jit raises
        if getattr(fun, "_apply_primitive", False):
            raise FloatingPointError(f"invalid value ({e.ty}) encountered in {fun.__qualname__}") \
                from None
        api_util.maybe_recursive_nan_check(e, fun, args, kwargs)  # reruns `fun` op by op: raises
    return (pjit.tree_unflatten(p.out_tree, out_flat), out_flat, p.out_tree, args_flat,
            p.params["jaxpr"], None, None, [])


def _bind_jit(trace: TerraTrace, args: list, params: dict) -> Any:
    """`jit_p.bind(*args)` with `trace` current, as `Primitive.bind` does it.

    Skips what cannot apply with a TerraTrace on top: mesh casts (only inside
    shard_map) and the lowering of high-level types (never cached above).
    """
    canonical = []
    for x in args:
        if type(x) is not Placeholder:
            x = dtypes.canonicalize_value(x)
            if isinstance(x, core.Tracer) and not x._trace.is_valid():
                raise core.escaped_tracer_error(x)
        canonical.append(x)
    return apply_op(trace, pjit.jit_p, canonical, params)


pjit._infer_params = _infer_params_fast
pjit._run_python_pjit = _run_python_pjit_fast


# -- helpers the rest of Terra uses instead of touching jax._src -------------

def install(trace: TerraTrace):
    """Context manager making `trace` JAX's current trace (this thread only)."""
    current = core.trace_ctx.trace
    if current is not trace:
        trace.parent = current
    return core.set_current_trace(trace)


# Libraries compare the opaque trace state a value was created under with the
# current one (flax's Variables and graph nodes, haiku's frames) to reject
# values from another trace level. Eager runs the step under the trace the
# step was called from, so inside a step that is the state they must see.
def _opaque_trace_state(convention=None):
    trace = core.trace_ctx.trace
    if type(trace) is TerraTrace:
        trace = trace.parent
    return core.OpaqueTraceState(trace._weakref)


def install_trace_state_hook() -> None:
    """Make Terra's trace invisible to `get_opaque_trace_state` callers."""
    jex_core.get_opaque_trace_state = _opaque_trace_state
    core.get_opaque_trace_state = _opaque_trace_state


def bind_op(prim: Primitive, args: Any, params: dict) -> Any:
    """Apply a recorded op to `args` under whatever trace is current."""
    return prim.bind(*args, **prim.get_bind_params(params))


def eval_primitive(prim: Primitive, args: Any, params: dict) -> Any:
    """Run one primitive eagerly, below any Terra trace."""
    if prim is pjit.jit_p:
        run = _jit_callable(params)
        if run is not None and _concrete_args(args):
            if core.trace_ctx.trace is core.eval_trace:  # as `bind` leaves it for the recorder
                return run(*args)
            with core.take_current_trace():
                return run(*args)
    with core.take_current_trace():
        return bind_op(prim, args, params)


# -- nested jits run eagerly -----------------------------------------------------
# Eager JAX calls a jnp ufunc through jit's C++ object, which finds the compiled
# executable by the arguments' signature. `jit_p`'s impl, which the recorder
# reaches instead, builds a new C++ object on every call (pjit._pjit_call_impl)
# and pays that lookup's slow half each time. The same op params (the same dict:
# `_infer_params_fast` caches them) get one C++ object here, built as the impl
# builds it, so a recorded jit op runs as eager's ufunc call does.
_jit_callables: dict = {}  # id(params) -> (params, C++ jit callable or None); params kept alive


def _concrete_args(args) -> bool:
    """Whether `bind` would pass the arguments to the impl as they are."""
    for x in args:
        if isinstance(x, core.Tracer):
            return False
    return not (config.debug_key_reuse.value or debugging_op_by_op())


def _jit_callable(params: dict) -> Callable | None:
    """The C++ jit callable of a jit op's params; None where `bind` must run."""
    entry = _jit_callables.get(id(params))
    if entry is not None and entry[0] is params:
        return entry[1]
    callable_ = None if params["jaxpr"].jaxpr.is_high else _new_jit_callable(params)
    if len(_jit_callables) >= _JIT_CACHE_SIZE:
        _jit_callables.pop(next(iter(_jit_callables)))
    _jit_callables[id(params)] = (params, callable_)
    return callable_


def _new_jit_callable(params: dict) -> Callable:
    """What pjit._pjit_call_impl builds and calls, kept."""
    jaxpr = params["jaxpr"]

    def cache_miss(*args):  # the impl's, for the arguments of this call
        with core.take_current_trace():
            out_flat, compiled, pgle_profiler, const_args = pjit._pjit_call_impl_python(
                *args, **params)
        fastpath = pjit._get_fastpath_data(
            compiled, pjit.tree_structure(out_flat), args, out_flat, jaxpr.effects,
            jaxpr.consts, pgle_profiler, const_args)
        return out_flat, fastpath, pjit._need_to_rebuild_with_fdo(pgle_profiler)

    p = params
    fun = pjit._get_jaxpr_as_fun(
        jaxpr, p["in_shardings"], p["out_shardings"], p["in_layouts"], p["out_layouts"],
        p["donated_invars"], p["ctx_mesh"], p["name"], p["keep_unused"], p["inline"],
        p["compiler_options_kvs"])
    cache_key = pxla.JitGlobalCppCacheKeys(
        donate_argnums=tuple(i for i, d in enumerate(p["donated_invars"]) if d),
        donate_argnames=None, device=None, backend=None,
        in_shardings_treedef=None, in_shardings_leaves=p["in_shardings"],
        out_shardings_treedef=None, out_shardings_leaves=p["out_shardings"],
        in_layouts_treedef=None, in_layouts_leaves=p["in_layouts"],
        out_layouts_treedef=None, out_layouts_leaves=p["out_layouts"])
    return _jax.pjit(
        p["name"], fun, cache_miss, [], [], cache_key, tree_util.dispatch_registry,
        pxla.cc_shard_arg, pjit._get_cpp_global_cache(cache_key.contains_explicit_attributes))


# In the jaxpr `trace_function` makes, a nested jit applied to primal values
# stays one equation, as eager runs it (jnp's jits ask to be inlined into the
# jaxpr of whatever traces them): its primitives, run one at a time, would each
# be a computation eager never compiled. The linear part autodiff stages on its
# own trace is inlined, as in eager.
_tracing_for_eager = threading.local()   # .trace: the trace of `trace_function`'s jaxpr
_pjit_staging_rule = pe.custom_staging_rules[pjit.jit_p]


def _staging_rule(trace, source_info, *args, **params):
    jaxpr = params["jaxpr"]
    if (trace is getattr(_tracing_for_eager, "trace", None) and not params["compiler_options_kvs"]
            and not any(isinstance(c, core.Ref) for c in jaxpr.consts)
            and not any(v.initial_qdd for v in (*jaxpr.jaxpr.constvars, *jaxpr.jaxpr.invars))):
        return trace.default_process_primitive(pjit.jit_p, args, params, source_info=source_info)
    return _pjit_staging_rule(trace, source_info, *args, **params)


pe.custom_staging_rules[pjit.jit_p] = _staging_rule


def trace_function(fn: Callable, args: list) -> Any:
    """`fn`'s jaxpr at `args`' avals, to run one equation at a time (`run_jaxpr`),
    without the equations none of its outputs need.

    Its equations are those eager JAX would run: nested jits are not inlined,
    and an equation is kept or dropped whole (pruning a nested jit's unused
    outputs, as `pe.dce_jaxpr` does, would make it a new computation for XLA to
    compile, where eager ran and compiled the unpruned one).
    """
    def traced(*args):
        _tracing_for_eager.trace = core.trace_ctx.trace  # make_jaxpr's
        return fn(*args)

    try:
        with core.take_current_trace():
            closed = jax.make_jaxpr(traced)(*args)
    finally:
        _tracing_for_eager.trace = None
    jaxpr = closed.jaxpr
    used = {v for v in jaxpr.outvars if type(v) is not core.Literal}
    kept = []
    for eqn in reversed(jaxpr.eqns):
        if eqn.effects or any(v in used for v in eqn.outvars):
            kept.append(eqn)
            used.update(v for v in eqn.invars if type(v) is not core.Literal)
    return core.ClosedJaxpr(jaxpr.replace(eqns=kept[::-1]), closed.consts)


def run_jaxpr(closed: Any, args: list) -> list:
    """Run a jaxpr's equations one at a time, as eager JAX runs ops."""
    jaxpr = closed.jaxpr
    env = dict(zip(jaxpr.constvars, closed.consts))
    env.update(zip(jaxpr.invars, args))
    with core.take_current_trace():
        for eqn in jaxpr.eqns:
            vals = [x.val if type(x) is core.Literal else env[x] for x in eqn.invars]
            if eqn.primitive is pjit.jit_p:  # a primal nested jit: eager calls it as is
                out = eval_primitive(eqn.primitive, vals, eqn.params)
            else:  # autodiff's rules bind these under the equation's context, as here
                with eqn.ctx.manager:
                    out = eval_primitive(eqn.primitive, vals, eqn.params)
            outs = out if eqn.primitive.multiple_results else (out,)
            for v, o in zip(eqn.outvars, outs):
                env[v] = o
    return [x.val if type(x) is core.Literal else env[x] for x in jaxpr.outvars]


def eager():
    """Context manager: JAX ops inside run eagerly, below any Terra trace."""
    return core.take_current_trace()


def local_value(value: Any) -> Any:
    """`value` as a local array: one held by a remote executor is downloaded.

    The download builds a jax.Array, which must not be intercepted by the
    step's trace: it runs eagerly, as the executor's own threads would.
    """
    if type(value) is array.ArrayImpl:  # the common case, before an ABC's isinstance
        return value
    if isinstance(value, executor.RemoteValue):
        with core.take_current_trace():
            return value.local()
    return value


def frozen_copy(value: Any) -> Any:
    """A fed numpy array is read later (at dispatch): copy it if Python could mutate it."""
    if isinstance(value, np.ndarray) and value.flags.writeable:
        if type(value) is literals.TypedNdArray:
            return literals.TypedNdArray(np.array(value), value.aval)
        return np.array(value)
    return value


def copy_value(x: Any) -> Any:
    """A fresh value equal to `x`: one `copy` op under the current trace."""
    return lax_internal.copy_p.bind(x)


# -- custom derivatives inside an elided region ------------------------------
# A custom_jvp/custom_vjp call is staged the way `jax.jit` stages it: one op
# whose params hold the primal jaxpr and the rule. Staging traces the user's
# function once; later calls with the same function, rule and avals reuse it.
_staged_cache: dict = {}


def _stage_custom_call(prim, subfuns: tuple, tracers, params: dict):
    """(params, consts, n_outs) of the staged op, or None to inline instead."""
    in_avals = tuple(core.typeof(t) for t in tracers)
    try:
        key = (prim, tuple((f.f, f.transforms) for f in subfuns[:1]),
               tuple(f.f for f in subfuns[1:]), in_avals, params.get("symbolic_zeros"))
        hash(key)
    except Exception:
        key = None
    if key is not None and key in _staged_cache:
        staged, stored = _staged_cache[key]
        if _refill_stores(subfuns, stored):
            return staged

    def call(*xs):
        return prim.bind(*xs, subfuns=subfuns, **params)

    try:
        debug = api_util.debug_info("terra custom call", call, tuple(tracers), {})
        jaxpr, _, consts = pe.trace_to_jaxpr_dynamic(lu.wrap_init(call, debug_info=debug), in_avals)
    except Exception:
        return None
    if len(jaxpr.eqns) != 1 or jaxpr.eqns[0].primitive is not prim:
        return None
    eqn = jaxpr.eqns[0]
    sources = {v: ("const", i) for i, v in enumerate(jaxpr.constvars)}
    sources.update({v: ("arg", i) for i, v in enumerate(jaxpr.invars)})
    order = [sources.get(v) for v in eqn.invars]
    # The staged op must read its consts first, then exactly the call's arguments.
    expected = [("const", i) for i in range(len(consts))] + [("arg", i) for i in range(len(tracers))]
    if order != expected or list(jaxpr.outvars) != list(eqn.outvars):
        return None
    staged = (eqn.params, tuple(consts), len(eqn.outvars) if prim.multiple_results else None)
    if key is not None:
        _staged_cache[key] = (staged, _stored_values(subfuns))
    return staged


def _stored_values(subfuns: tuple) -> list:
    """What calling the functions left in their output stores (tree structures)."""
    def value(store):
        try:
            return None if store is None else store.val
        except lu.StoreException:
            return None
    return [[value(store) for store in f.stores] for f in subfuns]


def _refill_stores(subfuns: tuple, stored: list) -> bool:
    """Fill a new call's stores as running the functions would have; False if impossible."""
    try:
        for f, values in zip(subfuns, stored):
            for store, val in zip(f.stores, values):
                if store is not None and val is not None:
                    store.store(val)
        return True
    except Exception:
        return False


# -- jax.grad / jax.value_and_grad: hand the call to the step's handler --------

class GradCall:
    """One `jax.grad`/`value_and_grad` application, as the handler sees it."""

    __slots__ = ("fun", "argnums", "has_aux", "with_value", "original")

    def __init__(self, fun, argnums, has_aux, with_value, original):
        self.fun, self.argnums, self.has_aux = fun, argnums, has_aux
        self.with_value, self.original = with_value, original


class VjpCall:
    """One `jax.vjp` application, as the handler sees it."""

    __slots__ = ("fun", "has_aux", "original")

    def __init__(self, fun, has_aux, original):
        self.fun, self.has_aux, self.original = fun, has_aux, original


def check_gradient_output(value: Any) -> None:
    """Raise what `jax.value_and_grad` raises for a non-scalar or non-float output."""
    from jax._src import api
    api._check_scalar(value)
    api._check_output_dtype_revderiv("grad", False, value)


def current_handler() -> Handler | None:
    trace = core.trace_ctx.trace
    return trace.handler if type(trace) is TerraTrace else None


def _elidable(original: Callable, with_value: bool) -> Callable:
    @functools.wraps(original)
    def transform(fun, argnums=0, has_aux=False, holomorphic=False, allow_int=False,
                  reduce_axes=()):
        jax_version = original(fun, argnums=argnums, has_aux=has_aux, holomorphic=holomorphic,
                               allow_int=allow_int, reduce_axes=reduce_axes)
        if holomorphic or allow_int or reduce_axes:
            return jax_version
        call = GradCall(fun, argnums, has_aux, with_value, jax_version)

        @functools.wraps(fun)
        def differentiated(*args, **kwargs):
            handler = current_handler()
            if handler is None:
                return jax_version(*args, **kwargs)
            return handler.differentiate(call, args, kwargs)
        return differentiated
    transform.__terra_original__ = original
    return transform


def _elidable_vjp(original: Callable) -> Callable:
    @functools.wraps(original)
    def vjp(fun, *primals, has_aux=False, reduce_axes=()):
        handler = current_handler()
        if handler is None or reduce_axes:
            return original(fun, *primals, has_aux=has_aux, reduce_axes=reduce_axes)
        return handler.vjp(VjpCall(fun, has_aux, original), primals)
    vjp.__terra_original__ = original
    return vjp


def install_autodiff_hooks() -> None:
    """Route jax.grad/value_and_grad/vjp calls made inside a step to Terra."""
    if getattr(jax.grad, "__terra_original__", None) is None:
        jax.grad = _elidable(jax.grad, with_value=False)
        jax.value_and_grad = _elidable(jax.value_and_grad, with_value=True)
    if getattr(jax.vjp, "__terra_original__", None) is None:
        jax.vjp = _elidable_vjp(jax.vjp)


_SingleDeviceSharding = jax.sharding.SingleDeviceSharding


def aval_of(x: Any) -> AbstractValue:
    """`core.typeof(x)`. A single-device array's is its `aval` (typeof would
    rebuild it from the sharding, which only a NamedSharding changes)."""
    if type(x) is array.ArrayImpl and type(x._sharding) is _SingleDeviceSharding:
        return x.aval
    return core.typeof(x)


# -- placements: where eager JAX keeps a value ---------------------------------
# Eager JAX moves an *uncommitted* array (made without naming a device), a
# numpy array or a Python number to wherever an op needs it; a *committed*
# array (device_put to a device or sharding, or computed from one) stays where
# it is, and so do the results of ops on it. So a committed array's sharding is
# part of an op key, and an uncommitted value's place is not.

def placement_of(x: Any) -> Any:
    """The sharding of a committed array; None for values eager JAX may move."""
    if type(x) is Placeholder:
        x = x.value()
    if type(x) is array.ArrayImpl:  # the common case, before an ABC's isinstance
        return x.sharding if x._committed else None
    if isinstance(x, core.Tracer) or not isinstance(x, jax.Array) or not x.committed:
        return None
    return x.sharding


def uncommitted(x: Any) -> Any:
    """A replicated array as eager keeps an uncommitted result: on the default device.

    Reuses the replica already on that device (no copy, never waits for XLA).
    """
    device = pxla.get_default_device()
    local = None
    if x.is_fully_replicated:
        local = next((a for a in x._arrays if device in a.devices()), None)
    if local is None:
        local = jax.device_put(x, device)
    aval = core.ShapedArray(x.shape, x.dtype, weak_type=x.aval.weak_type)  # no mesh in it
    return array.ArrayImpl(aval, jax.sharding.SingleDeviceSharding(device), [local],
                           committed=False)


# -- ops recorded without running them -------------------------------------------
# Inside an elided region, the gradient op's replay under jax.vjp computes every
# primal value of the region again (JAX's linearize runs the primal ops); so a
# tracing step may record a region op without running it, and take its value
# from the replay, as long as its outputs' avals and placements are known
# without running it, and running it later changes nothing Python sees.
_CUSTOM_CALLS = (custom_derivatives.custom_jvp_call_p, custom_derivatives.custom_vjp_call_p)
_PLACEMENT_PRIMITIVES = frozenset({"device_put", "sharding_constraint", "mesh_cast",
                                   "reshard", "shard_map"})


def debugging_op_by_op() -> bool:
    """Whether a JAX debugging flag makes eager run op by op: `debug_nans`/`debug_infs`
    check each op's output as it runs, `disable_jit` runs jitted functions' Python."""
    return config.debug_nans.value or config.debug_infs.value or config.disable_jit.value


def deferrable(prim: Primitive, params: dict) -> bool:
    """Whether the op may run later: no host effect, outputs placed like eager's
    (uncommitted, given uncommitted inputs), no NaN/Inf check that raises at the op."""
    if debugging_op_by_op():
        return False
    if prim is pjit.jit_p:
        jaxpr = params["jaxpr"]
        return (not jaxpr.effects and not jaxpr.jaxpr.is_high
                and all(type(s) is UnspecifiedValue for s in params["in_shardings"])
                and all(type(s) is UnspecifiedValue for s in params["out_shardings"]))
    return prim.name not in _PLACEMENT_PRIMITIVES and not has_host_effect(prim, params)


def output_avals(prim: Primitive, avals: list, params: dict) -> tuple | None:
    """The avals of the op's outputs, by abstract evaluation as jit does it;
    None where that is not possible or could differ from running the op."""
    if prim is pjit.jit_p:
        return tuple(params["jaxpr"].out_avals)
    if prim in _CUSTOM_CALLS:  # staged in a region (see _stage_custom_call): no abstract eval
        return tuple(params["call_jaxpr"].out_avals)
    if prim.ref_allocating or any(type(a) is not core.ShapedArray for a in avals):
        return None
    try:
        out, effects = pe._cached_abstract_eval(prim, *avals, **params)
    except Exception:  # unhashable params, or the user's error: running the op tells
        return None
    if effects or isinstance(out, (tuple, list)) != prim.multiple_results:
        return None
    return tuple(out) if prim.multiple_results else (out,)


def has_host_effect(prim: Primitive, params: dict) -> bool:
    """Whether the op must run at its place in Python's order (prints, callbacks)."""
    if prim is pjit.jit_p:  # of its params, only the jaxpr has effects
        return bool(params["jaxpr"].effects)
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


# Telemetry's record events, divergences and fetches walk the stack from JAX's
# internals up to the user's line: whether a frame is a library's is decided once
# per code object (keyed by id: a code object hashes its contents; the entry
# keeps it alive, so ids stay unique).
_library_code: dict = {}  # id(code) -> (code, whether its file is JAX's, Terra's or a library's)
_LIBRARY_CODE_MAX = 100_000  # bounds the memory of programs that generate code


def _is_library(code) -> bool:
    entry = _library_code.get(id(code))
    if entry is not None:
        return entry[1]
    name = code.co_filename
    library = name.startswith(_SKIP_PREFIXES) or "site-packages" in name
    if len(_library_code) >= _LIBRARY_CODE_MAX:
        _library_code.clear()
    _library_code[id(code)] = (code, library)
    return library


def user_frame() -> Any:
    """The innermost frame outside JAX, Terra and libraries (None if there is none)."""
    f = sys._getframe(1)
    while f is not None and _is_library(f.f_code):
        f = f.f_back
    return f


def user_location() -> str:
    """`file:line` of the innermost frame outside JAX, Terra and libraries."""
    f = user_frame()
    return "<unknown>" if f is None else f"{f.f_code.co_filename}:{f.f_lineno}"


# -- persistence: recorded ops in a file (terra/cache.py) ---------------------
# Recorded ops pickle by value, except for these JAX objects:
# - module-level objects (primitives, markers such as UNSPECIFIED) are
#   compared by identity, so they are saved by name and come back as the same
#   object;
# - source locations hold native tracebacks: dropped (they only feed errors);
# - TypedNdArray literals: JAX 0.10.2's own `__reduce__` restores them broken;
# - a staged custom_jvp call's rule is a Python closure: saved as the jvp
#   jaxprs it produced (`RecordedRule`), checked against the live rule the
#   first time a loaded op meets the program's op.

class RecordedRule:
    """A custom_jvp rule loaded from a file: the jvp jaxprs it produced, by zeros pattern."""

    __slots__ = ("results", "debug_info")

    def __init__(self, results: dict, debug_info: Any):
        self.results = results
        self.debug_info = debug_info

    def call_wrapped(self, *in_zeros):
        try:
            return self.results[in_zeros]
        except KeyError:
            raise LookupError("a custom_jvp rule loaded from TERRA_CACHE_DIR was never called "
                              f"with zeros {in_zeros}; the graph must be recorded again") from None

    __call__ = call_wrapped

    def matches(self, live: Any) -> bool:
        """Whether the live rule gives the same jvp jaxprs for every recorded pattern."""
        if not isinstance(live, lu.WrappedFun):
            return False
        try:
            for in_zeros, (jaxpr, consts, out_zeros) in self.results.items():
                live_jaxpr, live_consts, live_out_zeros = _call_rule_aside(live, in_zeros)
                if (list(out_zeros) != list(live_out_zeros) or str(jaxpr) != str(live_jaxpr)
                        or len(consts) != len(live_consts)
                        or not all(np.array_equal(np.asarray(a), np.asarray(b))
                                   for a, b in zip(consts, live_consts))):
                    return False
        except Exception:
            return False
        return True


def _call_rule_aside(rule: Any, in_zeros: tuple) -> tuple:
    """Call a live custom_jvp rule while its custom_jvp call is still in progress.

    Running the rule fills its jvp function's output stores, which the call in
    progress requires empty (JAX runs either the function or its jvp, never
    both): put them back as they were.
    """
    stores = [getattr(store, "_store", store)  # an EqualStore wraps a Store
              for fun in _closure_wrapped_funs(rule.f) for store in fun.stores
              if store is not None]
    before = [store._val for store in stores]
    try:
        return rule.call_wrapped(*in_zeros)
    finally:
        for store, val in zip(stores, before):
            store._val = val


def _closure_wrapped_funs(f: Any, depth: int = 3) -> list:
    """The lu.WrappedFuns a function's closure reaches (the memoized thunk holds the jvp)."""
    found = []
    for cell in getattr(f, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:
            continue
        if isinstance(value, lu.WrappedFun):
            found.append(value)
        elif depth > 1 and callable(value):
            found.extend(_closure_wrapped_funs(value, depth - 1))
    return found


def _memoized_results(fun: Any) -> dict | None:
    """The results cache of a `pe._memoize`d function (None for any other function)."""
    f = getattr(fun, "f", None)
    if getattr(f, "__qualname__", "") != "_memoize.<locals>.memoized" or fun.transforms:
        return None
    for cell in f.__closure__ or ():
        if type(cell.cell_contents) is dict:
            return dict(cell.cell_contents)
    return None


def _module_objects() -> dict:
    """id -> (module, attribute) of the JAX objects JAX's modules keep at top level."""
    found: dict = {}
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith(("jax", "optax", "flax")):
            continue
        for attr, value in list(vars(module).items()):
            if isinstance(value, (core.Primitive, core.Effect)) or (
                    type(value).__module__.startswith("jax._src")
                    and not isinstance(value, type) and not callable(value)):
                found.setdefault(id(value), (name, attr))
    return found


def _module_object(module: str, attr: str) -> Any:
    return getattr(sys.modules.get(module) or __import__(module, fromlist=["_"]), attr)


class _OpPickler(pickle.Pickler):
    def __init__(self, file):
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self._by_reference = _module_objects()

    def reducer_override(self, obj):
        where = self._by_reference.get(id(obj))
        if where is not None:
            return _module_object, where
        if isinstance(obj, core.Primitive):
            raise pickle.PicklingError(f"primitive {obj.name} is not a module attribute")
        if isinstance(obj, source_info_util.SourceInfo):
            return source_info_util.new_source_info, ()
        if type(obj) is literals.TypedNdArray:  # JAX's own __reduce__ passes weak_type as aval
            return literals.TypedNdArray, (np.asarray(obj), obj.aval)
        if isinstance(obj, lu.WrappedFun):
            results = _memoized_results(obj)
            if results is None:
                raise pickle.PicklingError(
                    f"an op holds a Python function ({getattr(obj.f, '__qualname__', obj.f)})")
            return RecordedRule, (results, obj.debug_info)
        return NotImplemented


def dump_ops(obj: Any, file) -> None:
    """Pickle recorded ops (and what holds them) so `load_ops` restores equal ops."""
    _OpPickler(file).dump(obj)


def load_ops(file) -> Any:
    """The inverse of `dump_ops`. Only for files this user wrote (pickle runs code)."""
    return pickle.load(file)
