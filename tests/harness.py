"""Differential testing: run a program eagerly and under Terra, demand the same.

A *program* is a function ``program(wrap)`` (or ``program(wrap, steps)``) that

* builds FRESH state every time it is called (parameters, lists, objects, data),
* wraps its step function with ``wrap`` -- ``step = wrap(fn)`` or ``@wrap`` --
  which is the identity for the eager run and ``terra.function`` for the Terra run,
* runs its training loop, and
* returns ``(results, side_effects)``: two arbitrary pytrees.

:func:`differential` runs the program twice, eagerly first and then under Terra,
capturing ``sys.stdout`` of each run with :func:`contextlib.redirect_stdout`, and
asserts that the two runs are indistinguishable:

* **printed output** is equal line by line. Inside each line the text between
  numbers must be identical (whitespace runs are ignored, so numpy's column
  padding may differ) and every number is compared with the float tolerance below;
* **results** and **side effects** are equal: same pytree structure; array leaves
  have the same shape and dtype and equal values within the tolerance
  (``np.testing.assert_allclose``); Python floats are compared with the same
  tolerance; strings are compared like printed text; every other leaf (ints,
  bools, None, arbitrary objects) must be exactly equal;
* **exceptions** escaping the program are equal: same type, same message (message
  compared like printed text).

Then it checks that Terra really co-executed: the ``coexecuted`` counts of all the
step functions the program wrapped must add up to at least ``min_coexecuted``
(default ``steps // 2``), so a test fails if Terra silently ran everything eagerly.
It also checks that Terra saw exactly as many step calls as the eager run made.

Float tolerance (the numerics contract, docs/numerics.md)
---------------------------------------------------------
Co-execution runs the step's ops as compiled XLA segments instead of op by op;
XLA fusion reorders float32 ops (reassociated sums, fused multiply-adds), as
``jax.jit`` does, so float results may differ from eager in the last bits. A
float array leaf matches when either

1. it is within the per-dtype bound: ``|terra - eager| <= atol_d + rtol_d * |eager|``
   with ``(rtol_d, atol_d) = tolerance(dtype)``: ``RTOL = 1e-4, ATOL = 1e-5`` for
   float32 and float64, widened to ``ULPS`` units of the dtype's precision for
   float16/bfloat16 (eager and Terra round every op's output alike, see
   runtime/executor.EAGER_ROUNDING; a float32 difference upstream flips a rounding);
2. or Terra is no further from eager than ``jax.jit`` is: the program also runs
   with ``wrap = jax.jit`` (only when 1 fails, and only if the program runs under
   jit) and ``max |terra - eager| <= JIT_FACTOR * max |jit - eager|`` for that leaf
   (a printed number likewise, against the jit run's number).

A number inside printed text is additionally allowed to differ by one unit in
its last printed digit (``f"{loss:.4f}"`` of two values within tolerance can
round to neighbouring last digits). Integers and every non-float value must
match exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import io
import math
import os
import re
import time
import warnings
from typing import Any, Callable

import jax
import numpy as np

RTOL = 1e-4
ATOL = 1e-5
ULPS = 4          # float16/bfloat16: the bound in units of the dtype's precision (eps)
JIT_FACTOR = 2.0  # Terra's fusion is not jit's: its drift may be that far from jit's

__all__ = [
    "load_program",
    "RTOL",
    "ATOL",
    "tolerance",
    "Wrap",
    "Outcome",
    "Differential",
    "run_program",
    "differential",
    "assert_same_text",
    "assert_same_tree",
    "stats_dict",
]


# --------------------------------------------------------------------------- wrap


class Wrap:
    """The ``wrap`` a program receives.

    ``wrap(fn)`` / ``@wrap`` / ``wrap(fn, **options)`` / ``@wrap(**options)``.
    Eager mode returns ``fn`` itself (only counting calls); Terra mode returns
    ``terra.function(fn, **options)``. Every wrapped function is recorded in
    :attr:`functions` so the harness can read the Terra stats afterwards.

    ``wrap.terra`` tells the program which run it is in (a program must not
    behave differently because of it, except for :meth:`note`).
    ``wrap.stats()`` is the summed stats dict of all wrapped functions so far
    (``None`` in eager mode). ``wrap.note(key, value)`` stores diagnostic values
    that are NOT compared between the runs (e.g. per-step stats snapshots).
    """

    def __init__(self, mode: str, wrapper: Callable | None = None, pace: float = 0.0):
        assert mode in ("eager", "terra", "jit")
        self.mode = mode
        self._wrapper = wrapper
        self._pace = pace
        self.functions: list[Any] = []
        self.calls = 0
        self.notes: dict[str, list] = {}

    @property
    def terra(self) -> bool:
        return self.mode == "terra"

    def __call__(self, fn=None, /, **options):
        if fn is None:
            return lambda f: self(f, **options)
        if self.mode == "eager":
            wrapped = self._count(fn)
        elif self.mode == "jit":  # the reference run: Terra's options do not apply
            wrapped = self._wrapper(fn)
        else:
            wrapped = self._wrapper(fn, **options) if options else self._wrapper(fn)
        self.functions.append(wrapped)
        if self.mode == "terra" and self._pace > 0:
            return self._paced(wrapped)
        return wrapped

    def _paced(self, step_fn):
        # Sleep after every Terra step (outside the step): gives background
        # compilation wall time without changing anything the program computes.
        @functools.wraps(step_fn)
        def paced(*args, **kwargs):
            try:
                return step_fn(*args, **kwargs)
            finally:
                time.sleep(self._pace)

        return paced

    def _count(self, fn):
        # A plain function, so it still binds as a method when used as a decorator
        # inside a class body.
        @functools.wraps(fn)
        def counted(*args, **kwargs):
            self.calls += 1
            return fn(*args, **kwargs)

        return counted

    def stats(self) -> dict | None:
        if self.mode != "terra":
            return None
        return sum_stats(self.functions)

    def note(self, key: str, value: Any) -> None:
        self.notes.setdefault(key, []).append(value)


def stats_dict(fn) -> dict:
    """``fn.stats()`` as a plain dict of ints."""
    s = fn.stats()
    if hasattr(s, "as_dict"):
        d = dict(s.as_dict())
    else:
        d = {k: v for k, v in vars(s).items() if not k.startswith("_")}
    return d


def sum_stats(functions) -> dict:
    total: dict = {}
    for f in functions:
        for k, v in stats_dict(f).items():
            if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
                total[k] = total.get(k, 0) + int(v)
    return total


class _Stats:
    """Attribute access over a stats dict (``res.stats.coexecuted``)."""

    def __init__(self, d: dict):
        self._d = dict(d)

    def __getattr__(self, name):
        try:
            return self._d[name]
        except KeyError:
            raise AttributeError(f"stats has no field {name!r}; has {sorted(self._d)}")

    def as_dict(self) -> dict:
        return dict(self._d)

    def __repr__(self):
        return f"Stats({self._d})"


# ------------------------------------------------------------------------ running


@dataclasses.dataclass
class Outcome:
    mode: str
    stdout: str
    results: Any = None
    side_effects: Any = None
    exception: BaseException | None = None
    wrap: Wrap | None = None
    warnings: list = dataclasses.field(default_factory=list)

    @property
    def notes(self) -> dict:
        return self.wrap.notes if self.wrap is not None else {}

    @property
    def lines(self) -> list[str]:
        return self.stdout.splitlines()


def _call_program(program, wrap, steps):
    try:
        params = inspect.signature(program).parameters
    except (TypeError, ValueError):
        params = {}
    if steps is not None and "steps" in params:
        return program(wrap, steps=steps)
    return program(wrap)


def run_program(program, mode: str = "eager", steps: int | None = None,
                pace: float = 0.0) -> Outcome:
    """Run ``program`` once in ``mode`` ('eager', 'terra' or 'jit') and capture everything."""
    wrapper = None
    if mode == "terra":
        import terra  # imported lazily so eager-only checks work without it

        wrapper = terra.function
    elif mode == "jit":
        wrapper = jax.jit
    wrap = Wrap(mode, wrapper, pace)
    buf = io.StringIO()
    out = Outcome(mode=mode, stdout="", wrap=wrap)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with contextlib.redirect_stdout(buf):
            try:
                ret = _call_program(program, wrap, steps)
            except Exception as e:  # the program's own exception is a result too
                out.exception = e
            else:
                if not (isinstance(ret, tuple) and len(ret) == 2):
                    raise TypeError(
                        "a differential program must return (results, side_effects), "
                        f"got {type(ret).__name__}"
                    )
                out.results, out.side_effects = ret
    out.stdout = buf.getvalue()
    out.warnings = [f"{w.category.__name__}: {w.message}" for w in caught]
    return out


# --------------------------------------------------------------------- comparing

_NUM = re.compile(
    r"(?<![\w.])[-+]?(?:(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?|nan|inf)(?![\w])"
)


def _last_digit_unit(tok: str) -> float:
    """One unit in the last printed digit of a float token (0 for integers)."""
    t = tok.lstrip("+-").lower()
    if t in ("nan", "inf"):
        return 0.0
    mant, _, exp = t.partition("e")
    if "." not in mant and not exp:
        return 0.0  # an integer: exact
    decimals = len(mant.split(".", 1)[1]) if "." in mant else 0
    return 10.0 ** (int(exp or 0) - decimals)


def _numbers_close(a: str, b: str, rtol: float, atol: float, ref: str | None = None) -> bool:
    fa, fb = float(a), float(b)
    if math.isnan(fa) or math.isnan(fb):
        return math.isnan(fa) and math.isnan(fb)
    if math.isinf(fa) or math.isinf(fb):
        return fa == fb
    unit = max(_last_digit_unit(a), _last_digit_unit(b))
    if abs(fa - fb) <= atol + rtol * abs(fb) + unit * 1.0000001:
        return True
    return ref is not None and abs(fa - fb) <= JIT_FACTOR * abs(float(ref) - fa) + unit * 1.0000001


def _text_close(a: str, b: str, rtol: float, atol: float, ref: str | None = None) -> str | None:
    """None when equal-within-tolerance, else a short reason. `ref`: the jit run's text."""
    ta, tb = _NUM.split(a), _NUM.split(b)
    na, nb = _NUM.findall(a), _NUM.findall(b)
    if len(na) != len(nb):
        return f"different number of numbers ({len(na)} vs {len(nb)})"
    for sa, sb in zip(ta, tb):
        if "".join(sa.split()) != "".join(sb.split()):
            return f"text differs: {sa!r} vs {sb!r}"
    nr = _NUM.findall(ref) if ref is not None else []
    refs = nr if len(nr) == len(na) else [None] * len(na)
    for xa, xb, xr in zip(na, nb, refs):
        if not _numbers_close(xa, xb, rtol, atol, xr):
            return f"number differs: {xa} vs {xb}" + ("" if xr is None else f" (jit: {xr})")
    return None


def assert_same_text(eager: str, terra: str, what: str = "stdout",
                     rtol: float = RTOL, atol: float = ATOL, reference: str | None = None) -> None:
    le, lt = eager.splitlines(), terra.splitlines()
    lr = reference.splitlines() if reference is not None else []
    for i, (a, b) in enumerate(zip(le, lt)):
        why = _text_close(a, b, rtol, atol, lr[i] if i < len(lr) else None)
        if why is not None:
            raise AssertionError(
                f"{what} line {i + 1} differs ({why}):\n  eager: {a!r}\n  terra: {b!r}"
            )
    if len(le) != len(lt):
        extra = le[len(lt):] if len(le) > len(lt) else lt[len(le):]
        raise AssertionError(
            f"{what}: eager printed {len(le)} lines, terra {len(lt)}; "
            f"first extra lines: {extra[:5]!r}"
        )


def _is_array(x) -> bool:
    return isinstance(x, (np.ndarray, np.generic, jax.Array)) or (
        hasattr(x, "shape") and hasattr(x, "dtype") and hasattr(x, "__array__")
    )


def _as_numpy(x) -> np.ndarray:
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    return np.asarray(x)


def tolerance(dtype, rtol: float = RTOL, atol: float = ATOL) -> tuple[float, float]:
    """(rtol, atol) of the per-dtype bound for float arrays of `dtype` (docs/numerics.md)."""
    if rtol == 0:
        return 0.0, atol
    widen = max(1.0, ULPS * float(jax.numpy.finfo(dtype).eps) / rtol)
    return rtol * widen, atol * widen


def assert_close_to_eager(terra, eager, path: str, rtol: float = RTOL, atol: float = ATOL,
                          reference=None) -> None:
    """The numerics contract for one float array: the per-dtype bound, or no further
    from eager than the jit run (`reference`) is."""
    r, a = tolerance(eager.dtype, rtol, atol)
    try:
        np.testing.assert_allclose(terra, eager, rtol=r, atol=a,
                                   err_msg=f"{path} (actual=terra, desired=eager)")
        return
    except AssertionError as err:
        if reference is None or np.shape(reference) != np.shape(eager):
            raise
        e, t, j = (np.asarray(v, np.float64) for v in (eager, terra, reference))
        drift, jit_drift = np.nanmax(np.abs(t - e)), np.nanmax(np.abs(j - e))
        same_nans = np.array_equal(np.isnan(t), np.isnan(e))
        if same_nans and drift <= JIT_FACTOR * jit_drift:
            return
        raise AssertionError(f"{err}\n  max |terra - eager| = {drift:.3g}, "
                             f"max |jit - eager| = {jit_drift:.3g}") from None


def _leaf_equal(a, b, path: str, rtol: float, atol: float, ref=None) -> None:
    if _is_array(a) or _is_array(b):
        if not (_is_array(a) and _is_array(b)):
            raise AssertionError(
                f"{path}: eager leaf is {type(a).__name__}, terra leaf is {type(b).__name__}"
            )
        da, db = getattr(a, "dtype", None), getattr(b, "dtype", None)
        if str(da) != str(db):
            raise AssertionError(f"{path}: dtype {da} (eager) vs {db} (terra)")
        xa, xb = _as_numpy(a), _as_numpy(b)
        if xa.shape != xb.shape:
            raise AssertionError(f"{path}: shape {xa.shape} (eager) vs {xb.shape} (terra)")
        if np.issubdtype(xa.dtype, np.inexact):
            xr = _as_numpy(ref) if _is_array(ref) else None
            assert_close_to_eager(xb, xa, path, rtol, atol, xr)
        else:
            np.testing.assert_array_equal(xb, xa, err_msg=f"{path} (actual=terra, desired=eager)")
        return
    if isinstance(a, float) and isinstance(b, float) and type(a) is type(b):
        if math.isnan(a) and math.isnan(b):
            return
        within_jit = isinstance(ref, float) and abs(a - b) <= JIT_FACTOR * abs(ref - a)
        if not (abs(a - b) <= atol + rtol * abs(a) or within_jit):
            raise AssertionError(f"{path}: {a!r} (eager) vs {b!r} (terra)")
        return
    if isinstance(a, str) and isinstance(b, str):
        why = _text_close(a, b, rtol, atol, ref if isinstance(ref, str) else None)
        if why is not None:
            raise AssertionError(f"{path}: {why}:\n  eager: {a!r}\n  terra: {b!r}")
        return
    if type(a) is not type(b):
        raise AssertionError(
            f"{path}: type {type(a).__name__} (eager) vs {type(b).__name__} (terra): {a!r} vs {b!r}"
        )
    if isinstance(a, bytes):
        if a != b:
            raise AssertionError(f"{path}: bytes differ ({len(a)} vs {len(b)} bytes)")
        return
    if not (a == b):
        raise AssertionError(f"{path}: {a!r} (eager) vs {b!r} (terra)")


def assert_same_tree(eager, terra, what: str = "results",
                     rtol: float = RTOL, atol: float = ATOL, reference=None) -> None:
    pe, te = jax.tree_util.tree_flatten_with_path(eager)
    pt, tt = jax.tree_util.tree_flatten_with_path(terra)
    if te != tt:
        raise AssertionError(f"{what}: pytree structure differs:\n  eager: {te}\n  terra: {tt}")
    refs = [None] * len(pe)
    if reference is not None:
        pr, tr = jax.tree_util.tree_flatten_with_path(reference)
        if tr == te:
            refs = [leaf for _, leaf in pr]
    for (path, a), (_, b), r in zip(pe, pt, refs):
        _leaf_equal(a, b, what + jax.tree_util.keystr(path), rtol, atol, r)


def _exception_text(e: BaseException | None) -> str:
    if e is None:
        return "no exception"
    return f"{type(e).__module__}.{type(e).__qualname__}: {e}"


# -------------------------------------------------------------------- differential


@dataclasses.dataclass
class Differential:
    eager: Outcome
    terra: Outcome

    @property
    def functions(self) -> list:
        """The Terra step functions the program wrapped (in wrap order)."""
        return self.terra.wrap.functions

    @property
    def stats(self) -> _Stats:
        """Summed stats of all wrapped Terra step functions."""
        return _Stats(sum_stats(self.functions))

    @property
    def history(self) -> list:
        """Per-step stats snapshots the program noted with ``wrap.note('stats', wrap.stats())``."""
        return self.terra.notes.get("stats", [])

    def describe(self) -> str:
        # Terra's own warnings first, each distinct message once
        ws = list(dict.fromkeys(self.terra.warnings))
        ws.sort(key=lambda w: not w.startswith("TerraWarning"))
        warn = "\n    ".join(ws[:10]) or "(none)"
        return f"terra stats: {self.stats.as_dict()}\n  terra warnings:\n    {warn}"


def differential(program, steps: int | None = 10, min_coexecuted: int | None = None,
                 rtol: float = RTOL, atol: float = ATOL, *,
                 sync_compile: bool | None = None, pace: float = 0.0,
                 jit_reference: bool = True) -> Differential:
    """Run ``program`` eagerly and under Terra; assert both runs are identical.

    ``steps`` is passed to programs that take a ``steps`` parameter; it also sets the
    default ``min_coexecuted = steps // 2``. Returns the :class:`Differential`, whose
    ``stats`` / ``functions`` let the test make further assertions.

    ``sync_compile`` overrides ``TERRA_SYNC_COMPILE`` for the Terra run (conftest
    sets it to 1 so short loops co-execute deterministically; ``False`` exercises the
    production path where graphs compile in the background). ``pace`` sleeps that
    many seconds after each Terra step, outside the step, to give a background
    compile wall time. ``jit_reference=False`` holds floats to the per-dtype bound
    alone (never to the jit run's drift).
    """
    eager = run_program(program, "eager", steps)
    if eager.wrap.functions == []:
        raise AssertionError("the program never called wrap(): nothing would be tested")
    saved = os.environ.get("TERRA_SYNC_COMPILE")
    if sync_compile is not None:
        os.environ["TERRA_SYNC_COMPILE"] = "1" if sync_compile else "0"
    try:
        terra_out = run_program(program, "terra", steps, pace)
    finally:
        if sync_compile is not None:
            if saved is None:
                os.environ.pop("TERRA_SYNC_COMPILE", None)
            else:
                os.environ["TERRA_SYNC_COMPILE"] = saved
    res = Differential(eager, terra_out)

    # Exceptions first: a Terra-internal failure (TERRA_STRICT=1) surfaces here.
    if _exception_text(eager.exception) != _exception_text(terra_out.exception):
        ea, ta = eager.exception, terra_out.exception
        same_type = ea is not None and ta is not None and type(ea) is type(ta)
        if not (same_type and _text_close(str(ea), str(ta), rtol, atol) is None):
            msg = (f"exceptions differ:\n  eager: {_exception_text(ea)}\n"
                   f"  terra: {_exception_text(ta)}")
            if ta is not None:
                raise AssertionError(msg) from ta
            raise AssertionError(msg)

    try:
        _assert_same_outcome(eager, terra_out, rtol, atol)
    except AssertionError:
        reference = _jit_reference(program, steps, eager) if jit_reference else None
        if reference is None:
            raise
        _assert_same_outcome(eager, terra_out, rtol, atol, reference)

    st = res.stats
    if st.as_dict().get("steps", eager.wrap.calls) != eager.wrap.calls:
        raise AssertionError(
            f"eager made {eager.wrap.calls} step calls but terra counted "
            f"{st.steps}\n  {res.describe()}"
        )
    if min_coexecuted is None:
        min_coexecuted = (steps or 0) // 2
    if st.coexecuted < min_coexecuted:
        raise AssertionError(
            f"terra co-executed only {st.coexecuted} steps, expected >= {min_coexecuted} "
            f"(did it silently run eagerly?)\n  {res.describe()}"
        )
    # shown by `pytest -rP`: what Terra did for this program
    print(f"terra stats: {st.as_dict()}")
    return res


def _assert_same_outcome(eager: Outcome, terra: Outcome, rtol: float, atol: float,
                         reference: Outcome | None = None) -> None:
    """Same prints, results and side effects (float numbers: the numerics contract)."""
    ref = reference if reference is not None else Outcome("jit", "")
    assert_same_text(eager.stdout, terra.stdout, "stdout", rtol, atol,
                     reference.stdout if reference is not None else None)
    assert_same_tree(eager.results, terra.results, "results", rtol, atol, ref.results)
    assert_same_tree(eager.side_effects, terra.side_effects, "side_effects", rtol, atol,
                     ref.side_effects)


def _jit_reference(program, steps, eager: Outcome) -> Outcome | None:
    """The program with `wrap = jax.jit`: how far jit is from eager. None if it cannot
    run under jit (Python control flow on values, host callbacks...)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            jitted = run_program(program, "jit", steps)
    except Exception:
        return None
    if _exception_text(jitted.exception) != _exception_text(eager.exception):
        return None
    if len(jitted.lines) != len(eager.lines):
        return None
    return jitted


def stepwise(step_fn: Callable, state: tuple, batches: list, steps: int) -> Callable:
    """A program whose every step starts from eager's state (the numerics contract is per
    step): its results are each step's outputs, and both runs follow eager's trajectory.

    Over a training trajectory a last-bit difference can flip a discontinuity (a relu
    at 0, an argmax tie) and grow far beyond the per-step drift, for jax.jit as for Terra
    (docs/numerics.md); comparing steps from the same inputs is deterministic.
    `step_fn(*state, *batch)` returns `(*new_state, *metrics)`.
    """
    def program(wrap):
        step = wrap(step_fn)
        current, outs = state, []
        for i in range(steps):
            batch = batches[i % len(batches)]
            out = step(*current, *batch)
            outs.append(out)
            print(f"step {i} " + " ".join(f"{float(m):.4f}" for m in out[len(state):]))
            current = tuple(step_fn(*current, *batch)[:len(state)])   # eager's next state
        return outs, None
    return program


def load_program(name: str):
    """Import examples/<name>.py afresh (examples/ is not a package)."""
    from terra import bench
    return bench.load(name, bench.EXAMPLES / f"{name}.py")


def assert_expert_matches_eager(module, eager_text: str, eager_params, run, steps: int) -> None:
    """The example's expert version (its `EXPERT_STEPS`, what `terra bench` times Terra
    against) prints eager's lines and ends with eager's parameters.

    `run(wrap, steps, log)` is the test's way of running the example's loop.
    """
    assert set(module.EXPERT_STEPS) == set(module.STEP_FUNCTIONS)
    lines: list = []
    params = run(lambda fn: module.EXPERT_STEPS[fn.__name__], steps, lines.append)
    assert_same_text(eager_text, "\n".join(lines), "the expert version's log")
    assert_same_tree(eager_params, params, "the expert version's final parameters")


def source_line(path: str, text: str) -> str:
    """`path:N` of the first line of `path` holding `text` (not this lookup's own call)."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if text in line and "_line_of" not in line and "source_line" not in line:
                return f"{path}:{n}"
    raise AssertionError(f"{text!r} is not in {path}")
