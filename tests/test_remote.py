"""The graph executor in another process: `python -m terra serve` over gRPC.

Every test talks to a real server subprocess on a free loopback port (killed
at teardown). Co-execution tests compare with eager and check, with the
server's own counters, that the graph really ran there.
"""

import gc
import hashlib
import os
import queue
import pickle
import signal
import socket
import subprocess
import sys
import time

import grpc
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import harness
import terra
import test_features
from runtime._proto import executor_pb2 as pb
from runtime._proto import executor_pb2_grpc as pb_grpc
from runtime.server import MAX_SESSIONS, ServerProcess
from runtime.tensors import to_tensor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MLP = harness.load_program("mlp")
MAX_MESSAGE_MB = 2   # small, so the oversized-message test stays cheap


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    # Every session here comes from one host: let it fill the server (the total limit).
    with ServerProcess("--max-message-mb", str(MAX_MESSAGE_MB), "--max-sessions-per-peer",
                       str(MAX_SESSIONS), log_path=str(log)) as s:
        s.log = log
        yield s


@pytest.fixture(scope="module")
def token_server(tmp_path_factory):
    d = tmp_path_factory.mktemp("token")
    (d / "token").write_text("s3cret-token\n")
    with ServerProcess("--token-file", str(d / "token"), log_path=str(d / "server.log")) as s:
        s.token_file, s.log = d / "token", d / "server.log"
        yield s


@pytest.fixture
def own_server(tmp_path):
    """A server this test may kill."""
    with ServerProcess(log_path=str(tmp_path / "server.log")) as s:
        yield s


def status(server, token=None) -> pb.ServerStatus:
    with grpc.insecure_channel(server.address.split("://")[1]) as channel:
        metadata = (("authorization", f"Bearer {token}"),) if token else ()
        return pb_grpc.ExecutorStub(channel).Status(pb.StatusRequest(), timeout=10,
                                                    metadata=metadata)


def mlp_loop(step, steps, losses):
    """examples/mlp.py's loop, keeping every loss Python fetched."""
    data = MLP.make_dataset(0)
    params = MLP.init_params(0)
    opt_state = MLP.optimizer.init(params)
    for i in range(steps):
        x, y = data[i % len(data)]
        params, opt_state, loss = step(params, opt_state, x, y)
        losses.append(float(loss))
    return params, opt_state


# -- results equal eager's, and the graph ran in the server -------------------------


def test_mlp_training_equals_eager_and_state_stays_in_the_server(server):
    eager_losses, losses = [], []
    eager_params, _ = mlp_loop(MLP.train_step, 10, eager_losses)

    step = terra.function(MLP.train_step, executor=server.address)
    data = MLP.make_dataset(0)
    params = MLP.init_params(0)
    opt_state = MLP.optimizer.init(params)
    for i in range(10):
        if i == 4:  # co-executing by now: measure the steady state from here
            gc.collect()
            before, dispatched = status(server), step.stats().segments_dispatched
        x, y = data[i]
        params, opt_state, loss = step(params, opt_state, x, y)
        losses.append(float(loss))
    after = status(server)

    np.testing.assert_allclose(losses, eager_losses, rtol=harness.RTOL, atol=harness.ATOL)
    harness.assert_same_tree(eager_params, params)
    stats = step.stats()
    assert stats.coexecuted >= 7 and stats.fallbacks == 0, stats
    # Every dispatched segment ran in the server ...
    assert after.executes - before.executes == stats.segments_dispatched - dispatched > 0
    # ... fetches were exactly the 6 losses Python asked for, parameters and
    # optimizer state were never uploaded again (batches travel inline) ...
    assert after.fetches - before.fetches == 6
    assert after.puts == before.puts
    # ... and the server holds no more arrays than it did 6 steps earlier.
    assert after.handles <= before.handles


def test_returned_values_behave_like_arrays_outside_the_step(server, monkeypatch):
    def program(wrap, steps):
        step = wrap(MLP.train_step)
        data = MLP.make_dataset(1)
        params = MLP.init_params(1)
        opt_state = MLP.optimizer.init(params)
        for i in range(steps):
            x, y = data[i]
            params, opt_state, loss = step(params, opt_state, x, y)
        # Outside the step, the returned values are used as any jax.Array is.
        b = params[-1]["b"]
        print("b", b, "loss", loss.item())
        print("sum", jnp.sum(b) + 1.0, np.asarray(b).mean())
        print("jit", jax.jit(lambda v: (v * 2).max())(b), jax.jit(lambda: b.min())())
        used = {
            "grad": jax.grad(MLP.loss_fn)(params, *MLP.make_dataset(1)[0]),
            "vmap": jax.vmap(jnp.sum)(params[0]["w"]),
            "tree_map": jax.tree.map(lambda v: v * 2, params),
            "at_set": b.at[0].set(1.0),
            "device_get": jax.device_get(params),
            "pickled": pickle.loads(pickle.dumps(params)),
        }
        return (params, used, loss), (isinstance(b, jax.Array), b.shape, str(b.dtype))

    before = status(server)
    monkeypatch.setenv("TERRA_EXECUTOR", server.address)
    res = harness.differential(program, steps=8, min_coexecuted=5)
    after = status(server)
    assert "b [" in res.terra.stdout
    assert after.executes - before.executes == res.stats.segments_dispatched > 0


@pytest.mark.parametrize("case", [
    "test_placeholders_escape_the_step",
    "test_if_on_tensor_value[flip_once]",
    "test_prints",
    "test_exceptions_raised_and_caught_inside_step",
    "test_value_conversions[np_asarray]",
    "test_pickle_returned_and_escaped_values",
])
def test_feature_programs_through_the_server(case, server, monkeypatch):
    """Differential tests of test_features.py, with the graph in the server."""
    name, _, param = case.partition("[")
    test = getattr(test_features, name)
    monkeypatch.setenv("TERRA_EXECUTOR", server.address)
    before = status(server)
    test(param[:-1]) if param else test()
    assert status(server).executes > before.executes


def test_typed_prng_keys_travel_and_stay_in_the_server(server, monkeypatch):
    def program(wrap, steps):
        @wrap
        def step(key, w):
            key, sub = jax.random.split(key)
            return key, w + 0.1 * jax.random.normal(sub, w.shape)

        key, w, seen = jax.random.key(3), jnp.zeros(4), []
        for _ in range(steps):
            key, w = step(key, w)
            seen.append(float(w.sum()))
        return (jax.random.key_data(key), w), (seen, str(key.dtype))

    before = status(server)
    monkeypatch.setenv("TERRA_EXECUTOR", server.address)
    res = harness.differential(program, steps=8, min_coexecuted=5)
    assert status(server).executes - before.executes == res.stats.segments_dispatched > 0


def test_cli_script_selects_the_server_with_the_environment(server):
    """`TERRA_EXECUTOR=grpc://...`: an unmodified script, nothing else changes."""
    expected = []
    MLP.train(MLP.train_step, 20, log=expected.append)
    before = status(server)
    env = {**os.environ, "TERRA_EXECUTOR": server.address, "PYTHONPATH": ROOT}
    out = subprocess.run([sys.executable, "examples/mlp.py", "--mode", "terra", "--steps", "20"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    harness.assert_same_text("\n".join(expected), out.stdout.strip())
    assert status(server).executes - before.executes >= 10


# -- sessions ------------------------------------------------------------------------


def raw_session(server, requests, token=None, timeout=10):
    """Send `requests` on one Session stream; returns (replies, RpcError or None)."""
    replies = []
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    with grpc.insecure_channel(server.address.split("://")[1],
                               options=[("grpc.max_send_message_length", -1)]) as channel:
        call = pb_grpc.ExecutorStub(channel).Session(iter(requests), timeout=timeout,
                                                     metadata=metadata)
        try:
            replies.extend(call)
        except grpc.RpcError as err:
            return replies, err
    return replies, None


def put(handle, array):
    return pb.Request(put=pb.Put(handle=handle, tensor=to_tensor(np.asarray(array))))


def fetch(handle, request_id=1):
    return pb.Request(id=request_id, fetch=pb.Fetch(handle=handle))


def test_sessions_cannot_read_or_release_each_others_handles(server):
    channel = grpc.insecure_channel(server.address.split("://")[1])
    q = queue.SimpleQueue()
    a = pb_grpc.ExecutorStub(channel).Session(iter(q.get, None), timeout=20)  # session A
    q.put(put(1, np.arange(4, dtype=np.float32)))
    q.put(fetch(1, request_id=7))
    reply = next(a)
    assert reply.id == 7 and np.frombuffer(reply.tensor.data, np.float32).tolist() == [0, 1, 2, 3]

    _, err = raw_session(server, [fetch(1)])                      # B reads A's handle 1
    assert err.code() == grpc.StatusCode.NOT_FOUND and "unknown handle 1" in err.details()
    _, err = raw_session(server, [pb.Request(put=pb.Put(handle=2, tensor=to_tensor(
        np.ones(1, np.float32))), release=[1])])                 # B releases A's handle 1
    assert err.code() == grpc.StatusCode.NOT_FOUND

    q.put(fetch(1, request_id=8))                                 # A still has it
    assert next(a).id == 8
    q.put(None)
    assert list(a) == []
    channel.close()


def test_a_client_that_disconnects_has_its_buffers_freed(server):
    base = status(server).handles
    channel = grpc.insecure_channel(server.address.split("://")[1])
    q = queue.SimpleQueue()
    call = pb_grpc.ExecutorStub(channel).Session(iter(q.get, None))
    for h in range(1, 6):
        q.put(put(h, np.full((100,), h, np.float32)))
    q.put(fetch(5))
    next(call)
    assert status(server).handles == base + 5
    channel.close()                                   # gone without closing the stream
    deadline = time.monotonic() + 10
    while status(server).handles != base and time.monotonic() < deadline:
        time.sleep(0.05)
    assert status(server).handles == base


def test_session_limit_keeps_health_checks_answering(server):
    channel = grpc.insecure_channel(server.address.split("://")[1])
    stub, queues, calls = pb_grpc.ExecutorStub(channel), [], []
    try:
        for i in range(MAX_SESSIONS - status(server).sessions):
            q = queue.SimpleQueue()
            call = stub.Session(iter(q.get, None), timeout=30)
            q.put(put(1, np.ones(1, np.float32)))
            q.put(fetch(1))
            next(call)                               # the session is open
            queues.append(q)
            calls.append(call)
        _, err = raw_session(server, [fetch(1)])
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"at most {MAX_SESSIONS} sessions" in err.details()
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                          timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        for q, call in zip(queues, calls):
            q.put(None)
            list(call)
        channel.close()
    _, err = raw_session(server, [put(1, np.ones(1, np.float32)), fetch(1)])  # room again
    assert err is None


# -- faults and bad input ------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_executor_fails_fast_naming_the_address():
    address = f"grpc://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(terra.TerraExecutorError, match=address.replace(".", r"\.")) as info:
        terra.function(MLP.train_step, executor=address)
    assert time.monotonic() - start < 6
    assert "terra serve" in str(info.value)


def test_executor_killed_mid_step_raises_naming_the_address(own_server):
    step_calls, logged = [], []

    def train_step(params, opt_state, x, y, kill):
        step_calls.append(len(step_calls))
        params, opt_state, loss = MLP.train_step(params, opt_state, x, y)
        if kill:
            own_server.stop()             # the executor dies while this step runs
        if loss > 1e9:                    # a fetch: needs the executor
            print("diverged")
        return params, opt_state, loss

    step = terra.function(train_step, executor=own_server.address)
    data = MLP.make_dataset(0)
    params = MLP.init_params(0)
    opt_state = MLP.optimizer.init(params)
    for i in range(5):
        params, opt_state, loss = step(params, opt_state, *data[i], False)
        logged.append(float(loss))
    assert step.stats().coexecuted >= 2
    kept = params
    start = time.monotonic()
    with pytest.raises(terra.TerraExecutorError, match=own_server.address.replace(".", r"\.")):
        params, opt_state, loss = step(params, opt_state, *data[5], True)
    assert time.monotonic() - start < 10
    # The program's own state is intact: nothing was reassigned or lost.
    assert params is kept and len(logged) == 5 and step_calls == list(range(6))
    # Later steps raise too, at once, instead of hanging.
    start = time.monotonic()
    with pytest.raises(terra.TerraExecutorError):
        step(params, opt_state, *data[6], False)
    assert time.monotonic() - start < 5


def test_a_hung_executor_is_detected_by_keepalive(own_server, monkeypatch):
    monkeypatch.setenv("TERRA_EXECUTOR_KEEPALIVE_MS", "1000")
    step = terra.function(MLP.train_step, executor=own_server.address)
    data = MLP.make_dataset(0)
    params = MLP.init_params(0)
    opt_state = MLP.optimizer.init(params)
    for i in range(4):
        params, opt_state, loss = step(params, opt_state, *data[i])
        float(loss)
    assert step.stats().coexecuted >= 1
    os.kill(own_server.process.pid, signal.SIGSTOP)
    try:
        start = time.monotonic()
        with pytest.raises(terra.TerraExecutorError, match="UNAVAILABLE"):
            params, opt_state, loss = step(params, opt_state, *data[4])
            float(loss)
        assert time.monotonic() - start < 10
    finally:
        os.kill(own_server.process.pid, signal.SIGCONT)


@pytest.mark.parametrize("request_, code, message", [
    (pb.Request(), "INVALID_ARGUMENT", "empty request"),
    (pb.Request(put=pb.Put(handle=1, tensor=pb.Tensor(dtype="float32", shape=[3], data=b"\0" * 8))),
     "INVALID_ARGUMENT", "8 bytes do not hold a float32[3] array"),
    (pb.Request(put=pb.Put(handle=1, tensor=pb.Tensor(dtype="object", shape=[1], data=b"x"))),
     "INVALID_ARGUMENT", "unsupported dtype 'object'"),
    (pb.Request(id=1, load=pb.Load(exported=b"\x80\x04cos\nsystem\n")),
     "INVALID_ARGUMENT", "not a jax.export serialized function"),
    (pb.Request(execute=pb.Execute(executable="f" * 64, results=[1])),
     "NOT_FOUND", "unknown executable"),
    (fetch(42), "NOT_FOUND", "unknown handle 42"),
    # Refused by gRPC itself before the service sees it; the service logs the ended stream.
    (put(1, np.zeros((MAX_MESSAGE_MB << 20) // 4 + 16, np.float32)),
     "RESOURCE_EXHAUSTED", "larger than max"),
])
def test_bad_requests_get_the_right_status_and_the_server_keeps_serving(
        server, request_, code, message):
    before = status(server)
    _, err = raw_session(server, [request_])
    assert err is not None and err.code() == getattr(grpc.StatusCode, code), err
    assert message in err.details()
    assert status(server).sessions_total == before.sessions_total + 1  # still serving
    logged = (code, "MiB limit") if code == "RESOURCE_EXHAUSTED" else (code, message)
    assert wait_for_log(server.log, *logged)


def wait_for_log(path, *words, timeout=5.0) -> bool:
    """Whether a line of the server's log mentions all `words` (within `timeout`)."""
    deadline = time.monotonic() + timeout
    while True:
        if any(all(w in line for w in words) for line in path.read_text().splitlines()):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def test_execute_with_unknown_handle_or_wrong_shapes(server):
    spec = jax.ShapeDtypeStruct((3,), jnp.float32)
    blob = bytes(jax.export.export(jax.jit(lambda a, b: [a * b]))(spec, spec).serialize())
    key = hashlib.sha256(blob).hexdigest()
    load = pb.Request(id=1, load=pb.Load(exported=blob))
    good = pb.Argument(tensor=to_tensor(np.ones(3, np.float32)))
    cases = [
        (pb.Execute(executable=key, args=[good, pb.Argument(handle=99)], results=[5]),
         grpc.StatusCode.NOT_FOUND, "unknown handle 99"),
        (pb.Execute(executable=key, args=[good, pb.Argument(tensor=to_tensor(np.ones(4, np.float32)))],
                    results=[5]),
         grpc.StatusCode.INVALID_ARGUMENT, "got float32[4], the function takes float32[3]"),
        (pb.Execute(executable=key, args=[good], results=[5]),
         grpc.StatusCode.INVALID_ARGUMENT, "takes 2 arguments"),
    ]
    for execute, code, message in cases:
        replies, err = raw_session(server, [load, pb.Request(execute=execute)])
        assert [r.loaded.executable for r in replies] == [key]
        assert err.code() == code and message in err.details(), err
    replies, err = raw_session(server, [load, pb.Request(execute=pb.Execute(
        executable=key, args=[good, good], results=[5])), fetch(5, request_id=2)])
    assert err is None and np.frombuffer(replies[-1].tensor.data, np.float32).tolist() == [1, 1, 1]


def test_graphs_that_call_back_into_the_host_are_refused(server):
    """jax.export refuses host callbacks; a hand-made module naming one is refused too."""
    target = "xla_ffi_python_cpu_callback"
    spec = jax.ShapeDtypeStruct((3,), jnp.float32)
    exported = jax.export.export(
        jax.jit(lambda x: jax.ffi.ffi_call(target, spec)(x)),
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(target)])(spec)
    _, err = raw_session(server, [pb.Request(id=1, load=pb.Load(exported=bytes(exported.serialize())))])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"host callbacks cannot run in the executor ({target})" in err.details()


# -- security defaults ---------------------------------------------------------------


def test_token_is_required_and_health_and_reflection_stay_open(token_server, monkeypatch):
    _, err = raw_session(token_server, [fetch(1)])
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    _, err = raw_session(token_server, [fetch(1)], token="wrong")
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as info:
        status(token_server)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert wait_for_log(token_server.log, "refused /terra.executor.v1.Executor/Status")
    with pytest.raises(terra.TerraExecutorError, match="TERRA_EXECUTOR_TOKEN_FILE"):
        terra.function(MLP.train_step, executor=token_server.address)

    with grpc.insecure_channel(token_server.address.split("://")[1]) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="terra.executor.v1.Executor"), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        answers = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
        services = [s.name for a in answers for s in a.list_services_response.service]
        assert "terra.executor.v1.Executor" in services

    monkeypatch.setenv("TERRA_EXECUTOR_TOKEN_FILE", str(token_server.token_file))
    step = terra.function(MLP.train_step, executor=token_server.address)
    losses = []
    mlp_loop(step, 6, losses)
    assert step.stats().coexecuted >= 3
    assert status(token_server, token="s3cret-token").executes >= step.stats().segments_dispatched


def test_serve_refuses_a_non_loopback_address():
    out = subprocess.run([sys.executable, "-m", "terra", "serve", "--host", "0.0.0.0"],
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "not a loopback address" in out.stderr and "--allow-non-loopback" in out.stderr


def test_tls_with_token(tmp_path, monkeypatch):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    (tmp_path / "token").write_text("tls-token")
    with ServerProcess("--tls-cert", str(cert), "--tls-key", str(key),
                       "--token-file", str(tmp_path / "token")) as tls_server:
        assert tls_server.address.startswith("grpcs://127.0.0.1:")
        monkeypatch.setenv("TERRA_EXECUTOR_TOKEN_FILE", str(tmp_path / "token"))
        with pytest.raises(terra.TerraExecutorError):  # plaintext to a TLS port
            terra.function(MLP.train_step, executor=tls_server.address.replace("grpcs", "grpc"))
        monkeypatch.setenv("TERRA_EXECUTOR_TLS_CA", str(cert))
        step = terra.function(MLP.train_step, executor=tls_server.address)
        eager_losses, losses = [], []
        mlp_loop(MLP.train_step, 5, eager_losses)
        mlp_loop(step, 5, losses)
        np.testing.assert_allclose(losses, eager_losses, rtol=harness.RTOL, atol=harness.ATOL)
        assert step.stats().coexecuted >= 2
        assert step._executor.status().executes >= step.stats().segments_dispatched
