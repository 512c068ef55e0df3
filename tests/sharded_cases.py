"""Sharded steps, eager vs Terra, on several CPU devices (run by test_sharding.py).

JAX fixes the number of host devices when it initializes, so these cases run in
their own process: `XLA_FLAGS=--xla_force_host_platform_device_count=8 python
tests/sharded_cases.py` prints one JSON object, {case: facts}, and the test
asserts on the facts. Each case runs a program eagerly and under Terra through
the differential harness (same printed output, same results, Terra really
co-executed) and reports, per returned array, eager's and Terra's sharding.
"""
import json
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

import harness  # noqa: E402

STEPS = 6
MESH = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))


def sharded(sharding, shape, seed):
    return jax.device_put(np.random.default_rng(seed).normal(size=shape).astype(np.float32),
                          sharding)


def mlp_program(param_specs, batch_spec=P("data"), constrain=False, batches=None):
    """An MLP trained with adam; params and batches placed with the given specs."""
    opt = optax.adam(1e-2)

    def loss_fn(params, x, y):
        h = jnp.tanh(x @ params["w1"] + params["b1"])
        if constrain:  # activations: batch over 'data', features over 'model'
            h = jax.lax.with_sharding_constraint(h, NamedSharding(MESH, P("data", "model")))
        return jnp.mean((h @ params["w2"] - y) ** 2)

    def program(wrap, steps):
        @wrap
        def train_step(params, opt_state, x, y):
            loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
            updates, opt_state = opt.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        shapes = {"w1": (16, 32), "b1": (32,), "w2": (32, 8)}
        params = {k: sharded(NamedSharding(MESH, param_specs[k]), shapes[k], i)
                  for i, k in enumerate(sorted(shapes))}
        opt_state = opt.init(params)
        for step in range(steps):
            spec = batch_spec if batches is None else batches(step)
            x = sharded(NamedSharding(MESH, spec), (32, 16), 100 + step)
            y = sharded(NamedSharding(MESH, spec), (32, 8), 200 + step)
            params, opt_state, loss = train_step(params, opt_state, x, y)
            print(f"step {step} loss {float(loss):.5f}")
        return (params, opt_state, loss), None

    return program


def device_put_program(wrap, steps):
    """numpy batches placed by `jax.device_put` inside the step (a primitive)."""
    batch = NamedSharding(MESH, P("data"))

    @wrap
    def train_step(w, x_np):
        x = jax.device_put(x_np, batch)
        g = jax.grad(lambda w: jnp.sum(jnp.sin(x @ w)))(w)
        return w - 0.1 * g, jnp.mean(x)

    w = sharded(NamedSharding(MESH, P(None, "model")), (16, 4), 0)
    out = None
    for step in range(steps):
        x_np = np.random.default_rng(step).normal(size=(32, 16)).astype(np.float32)
        w, out = train_step(w, x_np)
    return (w, out), None


REPLICATED = {"w1": P(), "b1": P(), "w2": P()}
MODEL = {"w1": P(None, "model"), "b1": P("model"), "w2": P("model", None)}
CASES = {
    "data_parallel": (mlp_program(REPLICATED), STEPS),
    "model_parallel": (mlp_program(MODEL), STEPS),
    "sharding_constraint": (mlp_program(MODEL, constrain=True), STEPS),
    "device_put_in_step": (device_put_program, STEPS),
    # The batch sharding changes at step 5: a new path for Terra, never an error.
    "sharding_changes": (mlp_program(REPLICATED, batches=lambda s: P("data") if s < 5 else P()),
                         9),
}


def host_transfers_case() -> dict:
    """Co-executed data-parallel steps under a guard that forbids host<->device transfers.

    The same loop runs eagerly too: eager moves Python scalars to the devices
    every step, which shows the guard is active.
    """
    opt = optax.adam(1e-2)

    def loss_fn(params, x, y):
        return jnp.mean((jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"] - y) ** 2)

    def train_step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    import terra
    replicated, batch = NamedSharding(MESH, P()), NamedSharding(MESH, P("data"))
    shapes = {"w1": (16, 32), "b1": (32,), "w2": (32, 8)}
    facts = {}
    for mode, step in (("eager", train_step), ("terra", terra.function(train_step))):
        params = {k: sharded(replicated, shapes[k], i) for i, k in enumerate(sorted(shapes))}
        opt_state = opt.init(params)
        facts[f"{mode}_guarded_steps"], facts[f"{mode}_error"] = 0, None
        for i in range(STEPS):
            x, y = sharded(batch, (32, 16), i), sharded(batch, (32, 8), 50 + i)
            guarded = i >= 3  # terra co-executes from step 3 on (synchronous compile)
            try:
                with _transfers_disallowed(guarded):
                    params, opt_state, loss = step(params, opt_state, x, y)
                    jax.block_until_ready(params)
            except Exception as err:
                facts[f"{mode}_error"] = str(err)[:500]
                break
            facts[f"{mode}_guarded_steps"] += guarded
        if mode == "terra":
            facts["stats"] = step.stats().as_dict()
    return facts


class _transfers_disallowed:
    """Forbid host<->device transfers process-wide (every thread included)."""

    NAMES = ("jax_transfer_guard_host_to_device", "jax_transfer_guard_device_to_host")

    def __init__(self, active: bool):
        self.active = active

    def __enter__(self):
        for name in self.NAMES if self.active else ():
            jax.config.update(name, "disallow")

    def __exit__(self, *exc):
        for name in self.NAMES if self.active else ():
            jax.config.update(name, "allow")


def sharding_facts(eager_results, terra_results) -> list:
    """Per returned array: eager's and Terra's sharding, their device counts."""
    facts = []
    for e, t in zip(jax.tree.leaves(eager_results), jax.tree.leaves(terra_results)):
        facts.append({"eager": str(e.sharding), "terra": str(t.sharding),
                      "equal": e.sharding == t.sharding and e.committed == t.committed,
                      "eager_devices": len(e.sharding.device_set),
                      "terra_devices": len(t.sharding.device_set),
                      "terra_sharded": not t.is_fully_replicated})
    return facts


def run_case(program, steps) -> dict:
    try:
        res = harness.differential(program, steps=steps, min_coexecuted=1)
    except BaseException as err:  # reported to the test, which fails with it
        return {"error": "".join(traceback.format_exception(err))[-3000:]}
    return {"error": None, "stats": res.stats.as_dict(),
            "shardings": sharding_facts(res.eager.results, res.terra.results),
            "stdout": res.terra.stdout}


def main() -> None:
    report = {"devices": jax.device_count()}
    for name, (program, steps) in CASES.items():
        report[name] = run_case(program, steps)
    report["host_transfers"] = host_transfers_case()
    print(json.dumps(report, default=str))


if __name__ == "__main__":
    main()
