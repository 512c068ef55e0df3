"""Train an MLP data- or model-parallel on JAX's own sharding, eagerly and under Terra.

An ordinary sharded JAX program: a `Mesh` of devices, parameters and batches
placed with `NamedSharding`, a plain eager training step (value_and_grad and
adam). Terra co-executes it with the shardings kept through the generated
graph; nothing in the step knows about Terra.

    python examples/sharded_mlp.py                       # 8 CPU devices: eager vs terra
    python examples/sharded_mlp.py --parallel model      # weights also sharded over 'model'
    python examples/sharded_mlp.py --processes 2         # 2 processes joined by jax.distributed
    python examples/sharded_mlp.py --steps 50 --mode terra   # one mode only

`--devices N` is the number of host CPU devices per process (set through
XLA_FLAGS before JAX starts: the script re-executes itself with it); with
`--processes P` each process has one device by default (P global devices).
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH = 64                  # global batch, split over the 'data' axis
LAYERS = (128, 256, 256, 10)
LEARNING_RATE = 1e-3
RTOL, ATOL = 1e-4, 1e-5     # equal to eager within what XLA fusion explains
DEVICES_FLAG = "--xla_force_host_platform_device_count"
RESULT = "TERRA_SHARDED_RESULT "  # prefix of the line a process reports its result on

optimizer = optax.adam(LEARNING_RATE)


# -- the program: mesh, placement, model, step ------------------------------------

def make_mesh(parallel):
    """All devices (of all processes) on a 'data' axis; with `model`, pairs on 'model'."""
    devices = np.array(jax.devices())
    if parallel == "model" and devices.size % 2 == 0:
        return Mesh(devices.reshape(-1, 2), ("data", "model"))
    return Mesh(devices.reshape(-1, 1), ("data", "model"))


def param_specs(parallel):
    """Per layer (w, b). Model parallel: the hidden layer's units are split over 'model'."""
    if parallel == "model":
        return [(P(None, "model"), P("model")), (P("model", None), P()), (P(), P())]
    return [(P(), P())] * (len(LAYERS) - 1)


def place(mesh, spec, value):
    """A global array from the same numpy value on every process (each keeps its shards)."""
    sharding = NamedSharding(mesh, spec)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def init_params(mesh, parallel, seed=0):
    rng = np.random.default_rng(seed)
    params = []
    for (n_in, n_out), (w_spec, b_spec) in zip(zip(LAYERS[:-1], LAYERS[1:]), param_specs(parallel)):
        w = (rng.normal(size=(n_in, n_out)) * np.sqrt(2.0 / n_in)).astype(np.float32)
        params.append({"w": place(mesh, w_spec, w),
                       "b": place(mesh, b_spec, np.zeros(n_out, np.float32))})
    return params


def make_dataset(mesh, seed=0, n_batches=8):
    """Synthetic classification batches, sharded over 'data' (the same on every process)."""
    rng = np.random.default_rng(seed + 1)
    prototypes = rng.normal(size=(LAYERS[-1], LAYERS[0])).astype(np.float32)
    batches = []
    for _ in range(n_batches):
        y = rng.integers(0, LAYERS[-1], size=BATCH).astype(np.int32)
        x = (prototypes[y] + rng.normal(0, 4.0, size=(BATCH, LAYERS[0]))).astype(np.float32)
        batches.append((place(mesh, P("data"), x), place(mesh, P("data"), y)))
    return batches


def predict(params, x):
    h = x
    for layer in params[:-1]:
        h = jax.nn.relu(h @ layer["w"] + layer["b"])
    return h @ params[-1]["w"] + params[-1]["b"]


def loss_fn(params, x, y):
    logits = predict(params, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def train_step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, loss


STEP_FUNCTIONS = ("train_step",)  # for `python -m terra bench` (any number of devices)


def run(wrap, steps, log=print, seed=0, timings=None, parallel="data"):
    """The training loop with `wrap(train_step)`; returns the final parameters."""
    mesh = make_mesh(parallel)
    step_fn = wrap(train_step)
    data = make_dataset(mesh, seed)
    params = init_params(mesh, parallel, seed)
    opt_state = optimizer.init(params)
    for step in range(1, steps + 1):
        start = time.perf_counter()
        x, y = data[(step - 1) % len(data)]
        params, opt_state, loss = step_fn(params, opt_state, x, y)
        if step % 10 == 0:
            log(f"step {step} loss {float(loss):.4f}")
        if timings is not None:
            timings.append(time.perf_counter() - start)
    return params


# -- eager vs terra, in this process ------------------------------------------------

def local_allclose(a, b):
    """Trees equal within tolerance, compared on this process's shards (max abs diff too)."""
    ok, worst = True, 0.0
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        for sx, sy in zip(x.addressable_shards, y.addressable_shards):
            u, v = np.asarray(sx.data), np.asarray(sy.data)
            worst = max(worst, float(np.max(np.abs(u.astype(np.float64) - v))) if u.size else 0.0)
            ok = ok and bool(np.allclose(u, v, rtol=RTOL, atol=ATOL))
    return ok, worst


def logs_close(a, b):
    """Printed lines equal, their losses within tolerance (printed to 4 decimals)."""
    def split(line):
        head, value = line.rsplit(" ", 1)
        return head, float(value)
    return len(a) == len(b) and all(
        split(x)[0] == split(y)[0] and abs(split(x)[1] - split(y)[1]) <= 1.0001e-4 + RTOL * abs(split(y)[1])
        for x, y in zip(a, b))


def compare(steps, parallel):
    """Run the loop eagerly, then under terra; print both; return the result as a dict."""
    import terra

    logs, times, params = {}, {}, {}
    for mode in ("eager", "terra"):
        holder = {}

        def wrap(fn, mode=mode):
            holder["step"] = terra.function(fn) if mode == "terra" else fn
            return holder["step"]

        logs[mode], times[mode] = [], []
        params[mode] = jax.block_until_ready(
            run(wrap, steps, log=logs[mode].append, timings=times[mode], parallel=parallel))
    stats = holder["step"].stats()
    mesh = make_mesh(parallel)
    params_ok, worst = local_allclose(params["eager"], params["terra"])
    leaves = list(zip(jax.tree.leaves(params["eager"]), jax.tree.leaves(params["terra"])))
    shardings_ok = all(e.sharding == t.sharding for e, t in leaves)
    logs_ok = logs_close(logs["eager"], logs["terra"])

    print(f"== sharded_mlp, {parallel} parallel: mesh {dict(mesh.shape)} over {jax.device_count()} "
          f"devices, {jax.process_count()} process(es); eager vs terra, {steps} steps ==")
    print(f"  {'eager':24} terra")
    for a, b in zip(logs["eager"], logs["terra"]):
        print(f"  {a:24} {b}")
    print("final parameters (sharding, devices):")
    names = [f"layer{i}.{k}" for i, layer in enumerate(params["eager"]) for k in sorted(layer)]
    for name, (e, t) in zip(names, leaves):
        same = "same as eager" if e.sharding == t.sharding else f"EAGER: {e.sharding.spec}"
        print(f"  {name:9} {str(t.sharding.spec):22} {len(t.sharding.device_set)} devices  {same}")
    skip = min(5, steps - 1)
    eager_ms = 1e3 * statistics.median(times["eager"][skip:])
    terra_ms = 1e3 * statistics.median(times["terra"][skip:])
    print(f"printed losses match: {'yes' if logs_ok else 'NO'}; final params match: "
          f"{'yes' if params_ok else 'NO'} (max abs diff {worst:.1e}); shardings match: "
          f"{'yes' if shardings_ok else 'NO'}")
    print(f"terra co-executed {stats.coexecuted} of {stats.steps} steps "
          f"({stats.fallbacks} fallbacks, {stats.segments_dispatched} segments dispatched)")
    print(f"median step time, steps {skip + 1}..{steps}: eager {eager_ms:.2f} ms, "
          f"terra {terra_ms:.2f} ms ({eager_ms / terra_ms:.2f}x; `benchmarks/sharded.py` "
          "measures properly)")
    return {"process": jax.process_index(), "process_count": jax.process_count(),
            "global_devices": jax.device_count(), "losses_match": logs_ok,
            "params_match": params_ok, "shardings_match": shardings_ok,
            "eager_log": logs["eager"], "terra_log": logs["terra"],
            "terra_stats": stats.as_dict()}


# -- command line: devices, processes -----------------------------------------------

def ensure_devices(n):
    """Re-execute this script with `n` host CPU devices unless JAX already has them."""
    flags = os.environ.get("XLA_FLAGS", "")
    if f"{DEVICES_FLAG}={n}" in flags.split():
        return
    env = dict(os.environ, XLA_FLAGS=f"{flags} {DEVICES_FLAG}={n}".strip())
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_processes(args, argv):
    """Start `args.processes` copies of this script joined by jax.distributed; wait (bounded)."""
    coordinator = f"127.0.0.1:{free_port()}"
    procs = [subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), *argv, "--process-id", str(i),
         "--coordinator", coordinator],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(args.processes)]
    deadline = time.monotonic() + args.timeout
    outputs = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            outputs.append(out)
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        for i, proc in enumerate(procs):
            print(f"-- process {i}, killed --\n{proc.communicate()[0]}", file=sys.stderr)
        print(f"timed out after {args.timeout} s; processes killed", file=sys.stderr)
        return 1
    results = []
    for i, (proc, out) in enumerate(zip(procs, outputs)):
        lines = out.splitlines()
        results += [json.loads(line[len(RESULT):]) for line in lines if line.startswith(RESULT)]
        shown = [line for line in lines if not line.startswith(RESULT) and "peer ranks" not in line]
        if i == 0 or proc.returncode != 0:
            print(f"-- process {i} (exit {proc.returncode}) --")
            print("\n".join(shown))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    failed = any(p.returncode != 0 for p in procs) or len(results) != args.processes
    return 1 if failed else 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--mode", choices=["compare", "eager", "jit", "terra"], default="compare")
    parser.add_argument("--parallel", choices=["data", "model"], default="data")
    parser.add_argument("--devices", type=int, default=None,
                        help="host CPU devices per process (default 8, or 1 with --processes)")
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--json", help="write the comparison result(s) to this file")
    parser.add_argument("--timeout", type=float, default=300.0, help="multi-process run limit (s)")
    parser.add_argument("--process-id", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--coordinator", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    # One device per process with several: XLA's CPU collectives intermittently hang with
    # more (eager JAX alone, on a 2-core machine; see docs/sharding.md).
    ensure_devices(args.devices or (1 if args.processes > 1 else 8))

    if args.processes > 1 and args.process_id is None:
        return launch_processes(args, argv)
    if args.process_id is not None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives across processes
        jax.distributed.initialize(args.coordinator, num_processes=args.processes,
                                   process_id=args.process_id, initialization_timeout=60)
    try:
        if args.mode == "compare":
            result = compare(args.steps, args.parallel)
            if args.process_id is not None:
                print(RESULT + json.dumps(result, default=str), flush=True)
            elif args.json:
                with open(args.json, "w") as f:
                    json.dump([result], f, indent=1)
            ok = result["losses_match"] and result["params_match"] and result["shardings_match"]
            return 0 if ok else 1
        if args.mode == "jit":
            wrap = jax.jit
        elif args.mode == "terra":
            import terra
            wrap = terra.function
        else:
            def wrap(fn):
                return fn
        run(wrap, args.steps, parallel=args.parallel)
        return 0
    finally:
        if args.process_id is not None:
            jax.distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
