"""Helpers shared by the examples: the standalone command line (`cli`), the
`--compare` mode, and the pieces of the expert versions (not needed to read them).

An example module provides `train_step` and `train(step_fn, steps, log, seed,
timings)`; `compare` runs the same training loop eagerly and under
`terra.function` in one process, from the same initial state and data, and
reports step times, whether the outputs agree, and Terra's statistics.

`EXPERT_STEPS` in an example maps each step function's name to the version an
expert JAX user would write by hand: the same Python, numpy and third-party
calls, with the pure parts (forward; loss + gradient + optimizer update) in
`jax.jit` (`jit_update`); `--mode expert` and `terra bench` run it.
"""

import re
import statistics

import jax
import numpy as np
import optax

# Terra's results equal eager results within what XLA fusion explains.
RTOL = 1e-4
ATOL = 1e-5
SKIP_STEPS = 5  # warm-up steps excluded from steady-state step times

_NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?|nan|inf")


def steady_ms(timings, skip=SKIP_STEPS):
    """(median, mean) step time in ms, excluding the first `skip` steps."""
    steady = timings[skip:] or timings
    return 1e3 * statistics.median(steady), 1e3 * statistics.fmean(steady)


def tree_allclose(a, b, rtol=RTOL, atol=ATOL):
    """(all close?, max abs difference) over two pytrees of arrays."""
    leaves_a, tree_a = jax.tree_util.tree_flatten(a)
    leaves_b, tree_b = jax.tree_util.tree_flatten(b)
    if tree_a != tree_b:
        return False, float("inf")
    ok, worst = True, 0.0
    for x, y in zip(leaves_a, leaves_b):
        x, y = np.asarray(x), np.asarray(y)
        if x.shape != y.shape:
            return False, float("inf")
        if x.size:
            worst = max(worst, float(np.max(np.abs(x.astype(np.float64) - y))))
        ok = ok and bool(np.allclose(x, y, rtol=rtol, atol=atol))
    return ok, worst


def split_numbers(text):
    """Split text into (non-numeric skeleton, [(number, unit in last printed place)])."""
    numbers = []
    for m in _NUMBER.findall(text):
        mantissa = m.lower().split("e")[0]
        decimals = len(mantissa.split(".")[1]) if "." in mantissa else 0
        exponent = int(m.lower().split("e")[1]) if "e" in m.lower() else 0
        # integers (step counts) must match exactly; rounded decimals get one unit
        ulp = 10.0 ** (exponent - decimals) if "." in mantissa else 0.0
        numbers.append((float(m), ulp))
    return _NUMBER.sub("#", text), numbers


def outputs_match(text_a, text_b, rtol=RTOL, atol=ATOL):
    """True if two printed outputs are equal up to float tolerance in numbers.

    Numbers are printed rounded, so two values within tolerance can print one
    unit apart in the last digit (0.32925 -> 0.3292 / 0.3293); that is allowed.
    """
    skel_a, nums_a = split_numbers(text_a)
    skel_b, nums_b = split_numbers(text_b)
    if skel_a != skel_b or len(nums_a) != len(nums_b):
        return False
    for (a, ulp_a), (b, ulp_b) in zip(nums_a, nums_b):
        if np.isnan(a) and np.isnan(b):
            continue
        if not abs(a - b) <= atol + rtol * abs(b) + max(ulp_a, ulp_b) * 1.0001:
            return False
    return True


def compare(module, name, steps):
    """Run `module.train` eagerly and under Terra; print a report; return exit code."""
    import terra

    print(f"== {name}: eager vs terra, {steps} steps, same data and init ==")
    eager_log, eager_times = [], []
    eager_params = module.train(module.train_step, steps, log=eager_log.append,
                                timings=eager_times)
    eager_params = jax.block_until_ready(eager_params)

    step = terra.function(module.train_step)
    coexecuted = []  # per call: did this step co-execute?

    def terra_step(*args):
        before = step.stats().coexecuted
        out = step(*args)
        coexecuted.append(step.stats().coexecuted > before)
        return out

    terra_log, terra_times = [], []
    terra_params = module.train(terra_step, steps, log=terra_log.append,
                                timings=terra_times)
    terra_params = jax.tree_util.tree_map(np.asarray, terra_params)
    stats = step.stats()

    width = max([len(line) for line in eager_log] + [5])
    print(f"  {'eager'.ljust(width)}   terra")
    for i in range(max(len(eager_log), len(terra_log))):
        a = eager_log[i] if i < len(eager_log) else "-"
        b = terra_log[i] if i < len(terra_log) else "-"
        print(f"  {a.ljust(width)}   {b}")

    e_med, e_mean = steady_ms(eager_times)
    t_med, t_mean = steady_ms(terra_times)
    skip = SKIP_STEPS if steps > SKIP_STEPS else 0
    # The loop fetches the loss only every 10th step, so per-step times are
    # bimodal once work runs asynchronously: the median shows the Python loop,
    # the mean (wall time / steps) the end-to-end throughput.
    print(f"steady-state step time, steps {skip + 1}..{steps}:")
    print(f"  median         eager {e_med:8.2f} ms   terra {t_med:8.2f} ms"
          f"   speedup {e_med / t_med:.2f}x")
    print(f"  mean (wall/n)  eager {e_mean:8.2f} ms   terra {t_mean:8.2f} ms"
          f"   speedup {e_mean / t_mean:.2f}x")
    co_times = [t for t, c in zip(terra_times, coexecuted) if c]
    if co_times:
        c_med, c_mean = steady_ms(co_times, skip=0)
        print(f"  terra, co-executed steps only ({len(co_times)}):"
              f" median {c_med:.2f} ms, mean {c_mean:.2f} ms"
              f"   speedup over eager mean {e_mean / c_mean:.2f}x")

    params_ok, worst = tree_allclose(eager_params, terra_params)
    logs_ok = outputs_match("\n".join(eager_log), "\n".join(terra_log))
    print(f"final params match: {'yes' if params_ok else 'NO'} "
          f"(max abs diff {worst:.2e}; rtol {RTOL:g}, atol {ATOL:g})")
    print(f"printed losses match: {'yes' if logs_ok else 'NO'}")
    print("terra stats: " + " ".join(f"{k}={v}" for k, v in stats.as_dict().items()))
    print(f"co-executed {stats.coexecuted} of {stats.steps} steps")
    return 0 if (params_ok and logs_ok) else 1


MODES = ("eager", "jit", "terra", "expert")


def jit_update(loss_fn, optimizer, has_aux=False, static_argnums=()):
    """The expert's jitted training update, `(params, opt_state, *args) ->
    (params, opt_state, loss_fn's value)`: `loss_fn(params, *args)`'s gradient
    applied by `optimizer`. `static_argnums` count from `params` (0) as in `loss_fn`.
    """
    def update(params, opt_state, *args):
        value, grads = jax.value_and_grad(loss_fn, has_aux=has_aux)(params, *args)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    # update's arguments are loss_fn's with opt_state inserted after params
    return jax.jit(update, static_argnums=tuple(i + 1 if i else i for i in static_argnums))


def mode_wrap(mode, experts=None):
    """`wrap(step_fn)` for a `--mode`: eager (as is), jit, terra, or the expert version."""
    if mode == "jit":
        return jax.jit
    if mode == "terra":
        import terra
        return terra.function
    if mode == "expert":
        return lambda fn: experts[fn.__name__]
    return lambda fn: fn


def cli(run, doc, argv=None, default_steps=20, experts=None):
    """The standalone command line of an example: `--steps N --mode eager|jit|terra|expert`.

    Runs `run(wrap, steps, timings=...)` and prints the median step time of the
    second half (after warm-up and, for terra, the background compile) to stderr.
    """
    import argparse
    import sys

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--steps", type=int, default=default_steps)
    parser.add_argument("--mode", choices=MODES, default="eager")
    args = parser.parse_args(argv)
    timings = []
    run(mode_wrap(args.mode, experts), args.steps, timings=timings)
    steady = sorted(timings[len(timings) // 2:])
    if steady:
        print(f"median step time (2nd half) {1e3 * steady[len(steady) // 2]:.1f} ms",
              file=sys.stderr)
    return 0
