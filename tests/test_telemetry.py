"""Latency tracing: events, the Chrome trace timeline, explain, the live stream, watch.

The program under test is a real (small) training loop: an MLP regressor with
optax adam, a Python branch on the loss (a sync point every step) that flips
once the loss falls under a threshold (a divergence), and a print every 5th step.
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import terra
from terra import telemetry
from terra.telemetry import events, profiler, stream, watch
from terra.telemetry.explain import ExplainSink

import harness

HERE = os.path.abspath(__file__)
ROOT = os.path.dirname(os.path.dirname(HERE))
STEPS = 24


def _line_of(text: str) -> str:
    return harness.source_line(HERE, text)


BRANCH = _line_of("if loss > threshold:")
IF_BRANCH = _line_of("updates, opt_state = opt.update(grads, opt_state, params)")
ELSE_BRANCH = _line_of("grads = jax.tree.map(lambda g: 0.1 * g, grads)")  # new path: divergence


def make_program():
    """Fresh params, optimizer state, data and the step (unwrapped)."""
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    params = {"w1": jax.random.normal(k1, (8, 32)) * 0.3, "b1": jnp.zeros(32),
              "w2": jax.random.normal(k2, (32, 1)) * 0.3, "b2": jnp.zeros(1)}
    # A batch big enough that the graph still computes when Python reaches the branch.
    x = jax.random.normal(k3, (65536, 8))
    y = jnp.sum(x[:, :3], axis=1, keepdims=True)
    opt = optax.adam(1e-2)

    def loss_fn(p, x, y):
        h = jnp.tanh(x @ p["w1"] + p["b1"])
        return jnp.mean((h @ p["w2"] + p["b2"] - y) ** 2)

    def train_step(params, opt_state, threshold):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        if loss > threshold:
            updates, opt_state = opt.update(grads, opt_state, params)
        else:  # close to the target: smaller steps
            grads = jax.tree.map(lambda g: 0.1 * g, grads)
            updates, opt_state = opt.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, loss

    return params, opt.init(params), train_step


def run_loop(step, params, opt_state, steps=STEPS, log=None):
    losses = []
    for i in range(steps):
        params, opt_state, loss = step(params, opt_state, 0.5)
        losses.append(loss)
        if log is not None and i % 5 == 0:
            print(f"step {i} loss {float(loss):.4f}", file=log)
    return params, losses


@pytest.fixture(autouse=True)
def telemetry_off():
    """Every test starts and ends with telemetry off."""
    telemetry.disable()
    yield
    telemetry.disable()
    assert events.recorder is None


def test_timeline_json_of_a_real_program(tmp_path):
    path = str(tmp_path / "trace.json")
    params0, opt_state0, fn = make_program()
    eager_params, eager_losses = run_loop(fn, params0, opt_state0)
    params0, opt_state0, fn = make_program()
    step = terra.function(fn)
    with terra.timeline(path):
        params, losses = run_loop(step, params0, opt_state0)
    assert events.recorder is None  # the context switched collection off again
    np.testing.assert_allclose(np.asarray(losses), np.asarray(eager_losses), rtol=1e-4, atol=1e-5)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(eager_params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    s = step.stats()
    assert s.coexecuted >= STEPS // 2 and s.segments_dispatched > 0
    assert s.divergences >= 1  # the branch flipped once the loss fell under the threshold

    trace = json.load(open(path))
    assert isinstance(trace, list)
    lanes = {e["args"]["name"]: e["tid"] for e in trace
             if e["ph"] == "M" and e["name"] == "thread_name"}
    assert {"python (step runner)", "executor (segment dispatch)",
            "device (segments computing)", "compiler"} <= set(lanes)
    for e in trace:
        if e["ph"] == "X":
            assert isinstance(e["ts"], (int, float)) and e["dur"] >= 0 and "pid" in e and "tid" in e
    by_cat: dict = {}
    for e in trace:
        by_cat.setdefault((e["ph"], e.get("cat")), []).append(e)
    steps = by_cat[("X", "step")]
    assert len(steps) == STEPS
    phases = {e["args"]["phase"] for e in steps}
    assert {"tracing", "coexec", "fallback"} <= phases
    assert all(e["tid"] == lanes["python (step runner)"] for e in steps)
    assert {e["tid"] for e in by_cat[("X", "dispatch")]} == {lanes["executor (segment dispatch)"]}
    assert {e["tid"] for e in by_cat[("X", "segment")]} == {lanes["device (segments computing)"]}
    compiles = by_cat[("X", "compile")]
    assert compiles and compiles[0]["tid"] == lanes["compiler"] and compiles[0]["args"]["ops"] > 0
    assert by_cat[("X", "record")]  # ops recorded while tracing

    # The branch's fetch is a sync point at the user's line, in every step.
    fetches = [e for e in by_cat[("X", "fetch")] if e["args"]["where"] == BRANCH]
    assert len(fetches) == STEPS
    assert any(e["args"]["wait_us"] > 0 for e in fetches)
    diverged = by_cat[("i", "divergence")]
    assert diverged and diverged[0]["args"]["where"] == ELSE_BRANCH
    assert diverged[0]["args"]["cause"] == "branch"
    assert "the step took a path not seen before" in diverged[0]["args"]["reason"]

    # Flows link fetches to the segment that computed the value.
    starts = {e["id"]: e for e in trace if e["ph"] == "s"}
    ends = {e["id"]: e for e in trace if e["ph"] == "f"}
    assert starts and starts.keys() == ends.keys()
    for i, s_ev in starts.items():
        assert s_ev["tid"] == lanes["device (segments computing)"]
        assert ends[i]["tid"] == lanes["python (step runner)"] and ends[i]["bp"] == "e"
        assert s_ev["ts"] <= ends[i]["ts"]
    counters = {e["name"] for e in trace if e["ph"] == "C"}
    assert {"segments in flight", "placeholders (last step)"} <= counters


def test_explain_names_sync_points_and_divergences():
    params0, opt_state0, fn = make_program()
    step = terra.function(fn)
    telemetry.enable()
    run_loop(step, params0, opt_state0)
    text = terra.explain(step)
    assert text.startswith(f"terra explain: {step.telemetry_name}")
    assert step.telemetry_name.startswith("train_step")
    s = step.stats()
    assert f"steps: {STEPS} (tracing {s.traced}, co-executed" in text
    assert BRANCH in text and "`if loss > threshold:`" in text
    assert f"{STEPS} fetches in {STEPS} steps" in text
    assert "divergences" in text
    lines = text.splitlines()
    at = next(i for i, line in enumerate(lines) if ELSE_BRANCH in line)
    assert "`grads = jax.tree.map(lambda g: 0.1 * g, grads)`" in lines[at]
    # The user's call, and what the graph expected there, at the line that recorded it.
    assert "Python called `multiply` (jit) where the graph expected" in lines[at + 1]
    assert f"(recorded at {IF_BRANCH})" in lines[at + 1], lines[at + 1]
    assert "advice:" in text and "jnp.where" in text
    assert "compiles:" in text and "graph:" in text


def test_explain_without_events_says_how_to_enable():
    params0, opt_state0, fn = make_program()
    step = terra.function(fn)
    run_loop(step, params0, opt_state0, steps=3)
    text = terra.explain(step)
    assert "steps: 3" in text and "TERRA_EXPLAIN=1" in text


def test_cli_trace_and_explain_at_exit(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(
        "import jax, jax.numpy as jnp\n"
        "def step(w, x):\n"
        "    loss = jnp.mean((x @ w) ** 2)\n"
        "    g = jax.grad(lambda w: jnp.mean((x @ w) ** 2))(w)\n"
        "    if loss > 0.5:\n"
        "        w = w - 0.05 * g\n"
        "    return w, loss\n"
        "w, x = jnp.ones((8, 4)), jnp.ones((16, 8)) * 0.3\n"
        "for i in range(12):\n"
        "    w, loss = step(w, x)\n"
        "print('final', float(loss))\n")
    trace = tmp_path / "t.json"
    env = {**os.environ, "PYTHONPATH": ROOT}
    out = subprocess.run([sys.executable, "-m", "terra", "run", "--step", "step", "--explain",
                          "--trace", str(trace), str(script)],
                         capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("final")
    assert "terra explain: step" in out.stderr
    assert f"{script}:5  `if loss > 0.5:`" in out.stderr
    events_ = json.load(open(trace))
    assert any(e.get("cat") == "fetch" and e["args"]["where"] == f"{script}:5" for e in events_)
    assert any(e.get("cat") == "step" and e["args"]["phase"] == "coexec" for e in events_)


def _run_in_background(step, params, opt_state, stop: threading.Event) -> threading.Thread:
    def loop():
        p, o = params, opt_state
        while not stop.is_set():
            p, o, _ = step(p, o, 0.0)
    t = threading.Thread(target=loop)
    t.start()
    return t


def test_live_stream_delivers_events_to_a_subscriber():
    telemetry.enable(stream="127.0.0.1:0")
    address = telemetry.stream_address()
    params0, opt_state0, fn = make_program()
    step = terra.function(fn)
    received = []
    sub = stream.Subscription(address, function=step.telemetry_name)

    def read():
        for ev in sub:
            received.append(ev)
            if sum(e.kind == "step" for e in received) >= 6:
                return

    reader = threading.Thread(target=read)
    reader.start()
    time.sleep(0.2)  # subscribed before the program starts
    stop = threading.Event()
    runner = _run_in_background(step, params0, opt_state0, stop)
    reader.join(timeout=60)
    stop.set()
    runner.join(timeout=60)
    sub.close()
    assert not reader.is_alive()
    kinds = {e.kind for e in received}
    assert {"step", "fetch"} <= kinds
    step_events = [e for e in received if e.kind == "step"]
    assert all(e.function == step.telemetry_name and e.duration_us > 0 for e in step_events)
    assert [e.step for e in step_events] == sorted(e.step for e in step_events)
    fetch = next(e for e in received if e.kind == "fetch")
    assert fetch.labels["where"] == BRANCH and fetch.lane == "python"
    assert step.stats().coexecuted > 0


def test_watch_renders_a_running_program(capsys):
    telemetry.enable(stream="127.0.0.1:0")
    address = telemetry.stream_address()
    params0, opt_state0, fn = make_program()
    fn(params0, opt_state0, 0.0)  # JAX compiles its eager ops before the 2.5 s window
    step = terra.function(fn)
    stop = threading.Event()
    runner = _run_in_background(step, params0, opt_state0, stop)
    try:
        code = watch.main([address, "--duration", "2.5", "--interval", "0.5"])
    finally:
        stop.set()
        runner.join(timeout=60)
    out = capsys.readouterr().out
    assert code == 0
    frames = [f for f in out.split("terra watch ") if f.strip()]
    assert len(frames) >= 3  # refreshed while the program ran
    last = frames[-1]
    header = next(line for line in last.splitlines() if line.startswith("function"))
    for col in ("p50 ms", "p90 ms", "p99 ms", "python ms", "graph ms", "wait ms", "syncs/step",
                "diverge", "compiles"):
        assert col in header
    row = next(line for line in last.splitlines() if line.startswith(step.telemetry_name + " "))
    fields = row.split()
    assert int(fields[1]) > 0                      # steps seen
    assert float(fields[3]) > 0                    # p50 latency
    assert float(fields[9]) >= 0.9                 # the branch syncs once per step


def test_watch_unreachable_address_fails_fast(capsys):
    start = time.monotonic()
    code = watch.main(["127.0.0.1:1", "--duration", "1"])
    assert code == 2 and time.monotonic() - start < 10
    assert "no telemetry stream at 127.0.0.1:1" in capsys.readouterr().err


def test_dashboard_percentiles_and_split():
    from runtime._proto import telemetry_pb2

    board = watch.Dashboard("test")
    for i in range(1, 101):
        board.add(telemetry_pb2.Event(kind="step", function="f", step=i, duration_us=1000.0 * i,
                                      labels={"phase": "coexec"},
                                      values={"wait_us": 250.0 * i, "syncs": 2}))
        board.add(telemetry_pb2.Event(kind="segment", function="f", step=i, duration_us=100.0))
    board.add(telemetry_pb2.Event(kind="compile", function="f", duration_us=2e6))
    row = next(line for line in board.render().splitlines() if line.startswith("f "))
    f = row.split()
    assert f[1] == "100" and f[2] == "0/100/0"
    near = functools.partial(pytest.approx, abs=0.006)  # the table shows 2 decimals
    assert float(f[3]) == near(50.5) and float(f[4]) == near(90.1) and float(f[5]) == near(99.01)
    assert float(f[6]) == near(0.75 * 50.5)   # python = step - wait
    assert float(f[7]) == near(0.1)           # graph: the step's segments
    assert float(f[8]) == near(0.25 * 50.5)   # wait
    assert float(f[9]) == 2.0 and row.endswith("1 (2.0 s)")


def test_ring_buffer_bounds_memory_and_counts_drops():
    rec = events.Recorder(capacity=100, interval_s=60)  # the drain thread never runs in time
    sink = ExplainSink()
    rec.add_sink(sink)
    for i in range(1000):
        rec.instant(events.DIVERGENCE, "f", i, {"where": "x.py:1", "reason": "r"})
    assert len(rec._buffer) == 100 and rec.dropped == 900
    rec.close()
    assert sum(site.count for site in sink.aggregate("f").divergences.values()) == 100


def test_off_collects_nothing():
    params0, opt_state0, fn = make_program()
    step = terra.function(fn)
    run_loop(step, params0, opt_state0, steps=4)
    assert events.recorder is None and telemetry.report(step.telemetry_name) == ""


_WATCHED = '''
import os, sys, time
import jax.numpy as jnp
import terra

@terra.function
def train_step(w, x):
    return w - 0.1 * jnp.mean(w * x)

w, x = jnp.ones(3), jnp.arange(3.0)
deadline = time.monotonic() + 60
while not os.path.exists(sys.argv[1]) and time.monotonic() < deadline:  # until watched
    w = train_step(w, x)
    time.sleep(0.01)
print("program done", flush=True)
'''


def _lines(pipe, into: list, seen: threading.Event, marker: str) -> threading.Thread:
    def read():
        for line in pipe:
            into.append(line)
            if marker in line:
                seen.set()
    t = threading.Thread(target=read, daemon=True)
    t.start()
    return t


def test_watch_and_program_both_end_when_the_program_ends(tmp_path):
    script, sentinel = tmp_path / "watched.py", tmp_path / "watched-now"
    script.write_text(_WATCHED)
    env = {**os.environ, "PYTHONPATH": ROOT, "TERRA_TELEMETRY": "127.0.0.1:0"}
    program = subprocess.Popen([sys.executable, str(script), str(sentinel)], env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    watcher = None
    try:
        err_lines, serving = [], threading.Event()
        _lines(program.stderr, err_lines, serving, "telemetry stream on")
        assert serving.wait(60), "".join(err_lines)
        address = next(l for l in err_lines if "telemetry stream on" in l).split()[4]
        watcher = subprocess.Popen([sys.executable, "-m", "terra", "watch", address,
                                    "--interval", "0.2"], env=env, text=True, cwd=ROOT,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        out_lines, shows_steps = [], threading.Event()
        reader = _lines(watcher.stdout, out_lines, shows_steps, "train_step ")
        assert shows_steps.wait(60), "".join(out_lines)
        sentinel.touch()                                  # the program finishes now
        out, _ = program.communicate(timeout=30)          # ... and is not kept alive
        assert program.returncode == 0 and out.strip().endswith("program done")
        assert watcher.wait(timeout=30) == 0              # the watch ends with it
        reader.join(timeout=5)
        assert "(the program's stream ended)" in "".join(out_lines)
    finally:
        for proc in (program, watcher):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()


TABLE = jnp.ones((50, 8))


def embed_step(w, ids):
    emb = jnp.take(TABLE, ids, axis=0)  # the lookup whose shape changes
    return w - 0.01 * jnp.mean(emb @ w)


LOOKUP = _line_of("emb = jnp.take(TABLE, ids, axis=0)")


def _run_lengths(step, lengths):
    w = jnp.ones((8, 8))
    for n in lengths:
        w = step(w, jnp.arange(n) % 50)
    return w


def test_divergence_names_the_call_and_the_shape_that_changed(monkeypatch):
    monkeypatch.setenv("TERRA_SYNC_COMPILE", "1")
    telemetry.enable()
    lengths = [8] * 6 + [(8, 16, 24, 32)[i % 4] for i in range(24)]   # bucketed to 4 lengths
    step = terra.function(embed_step)
    w = _run_lengths(step, lengths)
    np.testing.assert_allclose(w, _run_lengths(embed_step, lengths), rtol=1e-5)
    s = step.stats()
    assert s.steps == s.traced + s.coexecuted + s.fallbacks + s.eager, s
    assert s.fallbacks == s.divergences == 3 and s.coexecuted >= 20, s
    assert "`_take` (jit) was called with a new shape (argument 2: int32[8] -> int32[16])" \
        in s.last_divergence.replace("int32[24]", "int32[16]").replace("int32[32]", "int32[16]")
    text = terra.explain(step)
    assert f"{LOOKUP}  `emb = jnp.take(TABLE, ids, axis=0)  #" in text and "`  x3" in text, text
    # Four buckets are learned once each: nothing to act on, so no advice to pad.
    assert "3 variants so far, each learned once" in text and "pad them" not in text, text


def test_advice_to_pad_only_when_shapes_keep_changing(monkeypatch):
    monkeypatch.setenv("TERRA_SYNC_COMPILE", "1")
    telemetry.enable()
    lengths = [5] * 6 + list(range(6, 20))                          # a new length every step
    step = terra.function(embed_step, max_graphs=100)
    w = _run_lengths(step, lengths)
    np.testing.assert_allclose(w, _run_lengths(embed_step, lengths), rtol=1e-5)
    text = terra.explain(step)
    advice = text.split("advice:")[1]
    assert f"at {LOOKUP} the step keeps meeting new variants" in advice, text
    assert "pad them to a few fixed sizes" in advice


def _scrape(address: str) -> dict:
    """{(metric sample name, labels...): value} from the endpoint, parsed by prometheus_client."""
    import urllib.request
    from prometheus_client.parser import text_string_to_metric_families
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {(s.name, *sorted(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_prometheus_endpoint_counts_what_stats_count():
    telemetry.enable(prometheus="127.0.0.1:0")
    address = telemetry.prometheus_address()
    params0, opt_state0, fn = make_program()
    step = terra.function(fn)
    run_loop(step, params0, opt_state0)
    step.wait_for_graph(60)
    events.recorder.flush()
    m, s, name = _scrape(address), step.stats(), step.telemetry_name
    fn_label = ("function", name)

    def steps(phase):
        return m.get(("terra_steps_total", fn_label, ("phase", phase)), 0)

    assert (steps("tracing"), steps("coexec"), steps("fallback")) == \
        (s.traced, s.coexecuted, s.fallbacks), (m, s)
    assert s.coexecuted > 0 and s.fallbacks >= 1
    assert m[("terra_step_seconds_count", fn_label, ("phase", "coexec"))] == s.coexecuted
    assert m[("terra_fetches_total", fn_label)] == s.fetches
    assert m[("terra_sync_points_total", fn_label)] == s.fetch_waits > 0
    assert m[("terra_fetch_wait_seconds_count", fn_label)] == s.fetch_waits
    causes = {k[1][1]: v for k, v in m.items() if k[0] == "terra_divergences_total"}
    assert sum(causes.values()) == s.divergences and causes["branch"] >= 1, causes
    assert m[("terra_fallbacks_total", fn_label)] == s.fallbacks
    assert m[("terra_compiles_total", fn_label)] == s.compiles >= 1
    telemetry.disable()
    with pytest.raises(OSError):  # closed with telemetry: nothing left listening
        _scrape(address)


def test_profiler_trace_shows_terra_next_to_xla(tmp_path, monkeypatch):
    import glob
    import gzip
    monkeypatch.setenv("TERRA_SYNC_COMPILE", "1")
    params, opt_state, fn = make_program()
    step = terra.function(fn)
    params, _ = run_loop(step, params, opt_state, steps=6)
    assert step.wait_for_graph(60)
    before = step.stats().steps
    with jax.profiler.trace(str(tmp_path)):
        params, opt_state, loss = step(params, opt_state, 0.5)
        params, opt_state, loss = step(params, opt_state, 0.5)
        jax.block_until_ready(loss)
    files = glob.glob(str(tmp_path / "plugins/profile/*/*.trace.json.gz"))
    assert files and glob.glob(str(tmp_path / "plugins/profile/*/*.xplane.pb"))
    trace = json.load(gzip.open(files[0]))["traceEvents"]
    name = profiler.annotation_name(step.telemetry_name)
    steps = [e for e in trace if e.get("name") == name and "step_num" in e.get("args", {})]
    assert sorted(int(e["args"]["step_num"]) for e in steps) == [before + 1, before + 2]
    assert {e["args"]["phase"] for e in steps} == {"coexec"}
    names = {e.get("name", "") for e in trace}
    fetches = [e for e in trace if e.get("name") == "terra fetch"]
    assert any(e["args"]["where"] == BRANCH for e in fetches)        # the sync point's line
    assert "terra dispatch" in names                                 # the executor lane
    assert any(n.startswith(("dot", "fusion", "wrapped_")) or "_fusion" in n for n in names)  # XLA's ops
