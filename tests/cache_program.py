"""A training job run as a subprocess by tests/test_cache.py, once per "restart".

    python tests/cache_program.py MODE [--hidden N] [--custom-vjp]

MODE is eager or terra. Trains an MLP (relu, a custom_jvp, inside
value_and_grad; optax adam), prints the loss on a Python branch, and prints one
JSON line last: the losses, a digest of the final parameters, and Terra's
stats plus the executable store's counters.
"""
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

STEPS = 8


@jax.custom_vjp
def clip_gradient(x):
    return x


def _clip_fwd(x):
    return x, None


def _clip_bwd(_, g):  # the rule is a Python function: its op cannot be saved
    return (jnp.clip(g, -0.1, 0.1),)


clip_gradient.defvjp(_clip_fwd, _clip_bwd)


def main(argv):
    mode = argv[0]
    hidden = int(argv[argv.index("--hidden") + 1]) if "--hidden" in argv else 32
    custom_vjp = "--custom-vjp" in argv
    rng = np.random.default_rng(0)
    xs = rng.normal(size=(STEPS, 16, 8)).astype(np.float32)
    ys = rng.integers(0, 4, size=(STEPS, 16)).astype(np.int32)
    key1, key2 = jax.random.split(jax.random.PRNGKey(0))
    params = {"w1": jax.random.normal(key1, (8, hidden)) * 0.3, "b1": jnp.zeros(hidden),
              "w2": jax.random.normal(key2, (hidden, 4)) * 0.3}
    opt = optax.adam(1e-2)
    opt_state = opt.init(params)
    def loss_fn(p, x, y):
        h = jax.nn.relu(x @ p["w1"] + p["b1"])
        logits = h @ p["w2"]
        if custom_vjp:
            logits = clip_gradient(logits)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def train_step(p, s, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(p, x, y)
        updates, s = opt.update(grads, s, p)
        if loss > 1.0:
            print(f"high loss {float(loss):.5f}")
        return optax.apply_updates(p, updates), s, loss

    if mode == "terra":
        import terra
        step = terra.function(train_step)
    else:
        step = train_step
    losses = []
    for i in range(STEPS):
        params, opt_state, loss = step(params, opt_state, xs[i], ys[i])
        losses.append(float(loss))
    report = {"losses": losses,
              "params": [float(jnp.sum(v)) for v in jax.tree.leaves(params)]}
    if mode == "terra":
        from runtime.executable_cache import executable_store
        store = executable_store(terra.config.current().cache_dir)
        report["stats"] = step.stats().as_dict()
        report["store"] = None if store is None else {
            "loaded": store.loaded, "compiled": store.compiled}
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1:])
