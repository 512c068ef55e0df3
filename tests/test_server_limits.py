"""The executor server under abuse: every bad or greedy request is refused with
its gRPC status, and the server keeps serving everyone else.

Each test starts its own `python -m terra serve` on a free loopback port with
the limits it probes (small, so the test stays cheap) and kills it at the end.
Waits are bounded loops on the server's own counters, never timed assertions.
"""

import hashlib
import pathlib
import queue
import time

import grpc
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import harness
import terra
from runtime._proto import executor_pb2 as pb
from runtime._proto import executor_pb2_grpc as pb_grpc
from runtime.server import ServerProcess
from runtime.tensors import to_tensor

MLP = harness.load_program("mlp")
MiB = 1 << 20


@pytest.fixture
def serve(tmp_path):
    """serve(*flags): a server with these flags, stopped when the test ends."""
    servers = []

    def start(*flags):
        server = ServerProcess(*flags, log_path=str(tmp_path / f"server{len(servers)}.log"))
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def target(server) -> str:
    return server.address.split("://")[1]


def status(server) -> pb.ServerStatus:
    with grpc.insecure_channel(target(server)) as channel:
        return pb_grpc.ExecutorStub(channel).Status(pb.StatusRequest(), timeout=10)


def session(server, requests, timeout=30):
    """Send `requests` on one Session stream; returns (replies, RpcError or None)."""
    with grpc.insecure_channel(target(server),
                               options=[("grpc.max_send_message_length", -1),
                                        ("grpc.max_receive_message_length", -1)]) as channel:
        call = pb_grpc.ExecutorStub(channel).Session(iter(requests), timeout=timeout)
        try:
            return list(call), None
        except grpc.RpcError as err:
            return [], err


class OpenSession:
    """A Session stream kept open; requests are fed one by one."""

    def __init__(self, channel):
        self.requests = queue.SimpleQueue()
        self.call = pb_grpc.ExecutorStub(channel).Session(iter(self.requests.get, None), timeout=60)

    def ask(self, *requests):
        """Send `requests`, the last one a Fetch; returns its reply."""
        for r in requests:
            self.requests.put(r)
        return next(self.call)

    def close(self):
        self.requests.put(None)
        try:
            list(self.call)
        except grpc.RpcError:
            pass


def put(handle, array):
    return pb.Request(put=pb.Put(handle=handle, tensor=to_tensor(np.asarray(array))))


def fetch(handle, request_id=1):
    return pb.Request(id=request_id, fetch=pb.Fetch(handle=handle))


def load(fn, *specs):
    blob = bytes(jax.export.export(jax.jit(fn))(*specs).serialize())
    return pb.Request(id=1, load=pb.Load(exported=blob)), hashlib.sha256(blob).hexdigest()


def execute(key, args, results):
    return pb.Request(execute=pb.Execute(
        executable=key, args=[pb.Argument(tensor=to_tensor(np.asarray(a))) for a in args],
        results=results))


def wait_until(condition, timeout=30.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def still_serving(server) -> bool:
    """A fresh session stores and returns an array."""
    replies, err = session(server, [put(1, np.arange(3.0, dtype=np.float32)), fetch(1)])
    return err is None and np.frombuffer(replies[0].tensor.data, np.float32).tolist() == [0, 1, 2]


# -- sessions: silent streams time out, one host cannot take every slot ------------


def test_silent_sessions_time_out_and_free_their_slots(serve):
    server = serve("--max-sessions", "3", "--max-sessions-per-peer", "3",
                   "--session-idle-timeout", "3")
    channel = grpc.insecure_channel(target(server))
    stub = pb_grpc.ExecutorStub(channel)
    silent = [stub.Session(iter(queue.SimpleQueue().get, None), timeout=60) for _ in range(3)]
    try:
        assert wait_until(lambda: status(server).sessions == 3)
        for call in silent:
            with pytest.raises(grpc.RpcError) as info:
                next(call)
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "no request for 3 s" in info.value.details()
        assert wait_until(lambda: status(server).sessions == 0)
        assert still_serving(server)
    finally:
        channel.close()


def test_one_client_host_cannot_hold_every_session(serve):
    server = serve("--max-sessions", "4", "--max-sessions-per-peer", "2")
    channel = grpc.insecure_channel(target(server))
    open_ = [OpenSession(channel) for _ in range(2)]
    try:
        for s in open_:
            s.ask(put(1, np.ones(1, np.float32)), fetch(1))
        _, err = session(server, [fetch(1)])
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "at most 2 sessions at once per client host" in err.details()
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                          timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        reply = open_[0].ask(fetch(1, request_id=9))            # the open ones still work
        assert reply.id == 9
    finally:
        for s in open_:
            s.close()
        channel.close()
    assert wait_until(lambda: status(server).sessions == 0)
    assert still_serving(server)


def test_a_paused_program_keeps_its_session_by_pinging(serve):
    """The client pings within the idle timeout: a pause between steps loses nothing."""
    server = serve("--session-idle-timeout", "4")
    step = terra.function(MLP.train_step, executor=server.address)
    data = MLP.make_dataset(0)
    runs = {}
    for name, fn in (("eager", MLP.train_step), ("terra", step)):
        params = MLP.init_params(0)
        opt_state = MLP.optimizer.init(params)
        losses = []
        for i in range(8):
            if name == "terra" and i == 4:
                opened = status(server).sessions_total
                time.sleep(9)                    # longer than the idle timeout, twice over
            params, opt_state, loss = fn(params, opt_state, *data[i])
            losses.append(float(loss))
        runs[name] = (params, losses)
    np.testing.assert_allclose(runs["terra"][1], runs["eager"][1],
                               rtol=harness.RTOL, atol=harness.ATOL)
    harness.assert_same_tree(runs["eager"][0], runs["terra"][0])
    assert step.stats().coexecuted >= 3
    assert status(server).sessions_total == opened  # the same session, not a new one


# -- what one session, and all of them, may hold -----------------------------------


def test_handles_per_session_are_capped(serve):
    server = serve("--max-handles", "5")
    _, err = session(server, [put(h, np.ones(2, np.float32)) for h in range(1, 7)] + [fetch(1)])
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "more than 5 arrays (--max-handles)" in err.details()
    # Releasing makes room: a session cycling through handles is never refused.
    requests = [put(1, np.ones(2, np.float32))]
    requests += [pb.Request(put=pb.Put(handle=h, tensor=to_tensor(np.full(2, h, np.float32))),
                            release=[h - 1]) for h in range(2, 21)]
    replies, err = session(server, requests + [fetch(20)])
    assert err is None and np.frombuffer(replies[0].tensor.data, np.float32).tolist() == [20, 20]
    assert still_serving(server)


def test_bytes_per_session_and_in_total_are_capped(serve):
    server = serve("--max-session-mb", "1", "--max-total-mb", "2")
    quarter = np.zeros(MiB // 16, np.float32)          # 0.25 MiB
    # Puts: the fifth quarter MiB would put the session over 1 MiB.
    _, err = session(server, [put(h, quarter) for h in range(1, 6)] + [fetch(1)])
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "over its 1.0 MiB (--max-session-mb" in err.details()
    # Results: refused before the function runs.
    spec = jax.ShapeDtypeStruct((4,), jnp.float32)
    load_big, key = load(lambda x: jnp.zeros((MiB // 2,), jnp.float32) + x[0], spec)
    before = status(server).executes
    _, err = session(server, [put(1, quarter), put(2, quarter), load_big,
                              execute(key, [np.ones(4, np.float32)], [3]), fetch(3)])
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "Execute" in err.details()
    assert status(server).executes == before
    # All sessions together: two hold 0.75 MiB each; a third's 0.75 MiB is one too many.
    channel = grpc.insecure_channel(target(server))
    holders = [OpenSession(channel) for _ in range(2)]
    try:
        for s in holders:
            s.ask(put(1, quarter), put(2, quarter), put(3, quarter), fetch(1))
        assert status(server).handle_bytes == 6 * quarter.nbytes
        _, err = session(server, [put(1, quarter), put(2, quarter), put(3, quarter), fetch(1)])
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "for all sessions (--max-total-mb)" in err.details()
    finally:
        for s in holders:
            s.close()
        channel.close()
    assert wait_until(lambda: status(server).handle_bytes == 0)   # freed with their sessions
    assert still_serving(server)


def test_loaded_functions_per_session_are_capped(serve):
    server = serve("--max-executables", "2")
    spec = jax.ShapeDtypeStruct((3,), jnp.float32)
    loads = [load(lambda x, k=k: x + k, spec)[0] for k in range(3)]
    _, err = session(server, loads)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "loaded 2 functions already (--max-executables)" in err.details()
    assert still_serving(server)


def test_a_fetch_larger_than_a_message_is_refused_before_sending(serve):
    server = serve("--max-message-mb", "1")
    spec = jax.ShapeDtypeStruct((4,), jnp.float32)
    load_big, key = load(lambda x: jnp.zeros((MiB // 2,), jnp.float32) + x[0], spec)  # 2 MiB
    replies, err = session(server, [load_big, execute(key, [np.ones(4, np.float32)], [1]),
                                    fetch(1, request_id=2)])
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "Fetch: handle 1 holds 2.0 MiB, over the 1.0 MiB message limit" in err.details()
    assert still_serving(server)


# -- malformed requests are INVALID_ARGUMENT, never INTERNAL -----------------------


def test_impossible_shapes_and_corrupted_exports_are_invalid_arguments(serve):
    server = serve()
    spec = jax.ShapeDtypeStruct((3,), jnp.float32)
    identity, key = load(lambda x: x, spec)
    for shape, message in [([0, 2**63 - 1], "too large for any float32 array"),
                           ([0, 2**62, 2**62], "too large for any float32 array"),
                           ([1] * 100, "100 dimensions"),
                           ([2**20, 2**20], "do not hold a float32")]:
        bad = pb.Request(put=pb.Put(handle=1, tensor=pb.Tensor(dtype="float32", shape=shape)))
        _, err = session(server, [bad])
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (shape, err)
        assert message in err.details()
        feed = pb.Request(execute=pb.Execute(executable=key, results=[1], args=[
            pb.Argument(tensor=pb.Tensor(dtype="float32", shape=shape))]))
        _, err = session(server, [identity, feed])
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (shape, err)
        assert err.details().startswith("Execute argument 0:") and message in err.details()

    exported = jax.export.export(jax.jit(lambda x: x * 2 + 1))(spec)
    blob, module = bytes(exported.serialize()), exported.mlir_module_serialized
    at = blob.index(module)
    corrupted = [blob[:len(blob) // 2],                                           # truncated
                 blob[:at] + bytes(len(module)) + blob[at + len(module):],        # module zeroed
                 blob[:at] + module[:16] + module[16:][::-1] + blob[at + len(module):]]
    for bad in corrupted:
        _, err = session(server, [pb.Request(id=1, load=pb.Load(exported=bad))])
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
        assert "Load:" in err.details()
    assert still_serving(server)


def test_an_export_that_crashes_jaxlibs_reader_does_not_kill_the_server(serve):
    """Found by flipping 3 random bits of an export: jaxlib 0.10.2's StableHLO reader
    segfaults on it. The server reads new modules in a helper process first."""
    crashing = (pathlib.Path(__file__).parent / "data" / "export_crashing_jaxlib_reader.bin").read_bytes()
    server = serve()
    for _ in range(2):  # the helper is restarted after each crash
        _, err = session(server, [pb.Request(id=1, load=pb.Load(exported=crashing))])
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "StableHLO module cannot be read" in err.details()
        assert still_serving(server)
    spec = jax.ShapeDtypeStruct((3,), jnp.float32)
    request, key = load(lambda x: x * 2 + 1, spec)
    replies, err = session(server, [request, execute(key, [np.arange(3.0, dtype=np.float32)], [1]),
                                    fetch(1, request_id=2)])
    assert err is None and np.frombuffer(replies[1].tensor.data, np.float32).tolist() == [1, 3, 5]


def test_bytes_that_are_not_a_request_are_invalid_arguments(serve):
    server = serve()
    with grpc.insecure_channel(target(server)) as channel:
        raw = channel.stream_stream("/terra.executor.v1.Executor/Session",
                                    request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as info:
            list(raw(iter([b"\xff\xff\xff\xff"]), timeout=30))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "malformed Request message" in info.value.details()
        unary = channel.unary_unary("/terra.executor.v1.Executor/Status",
                                    request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as info:
            unary(b"\x0a", timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert still_serving(server)


def test_64_bit_arrays_on_a_32_bit_server_are_refused_not_truncated(serve):
    server = serve()
    _, err = session(server, [put(1, np.array([1 + 2**-40], np.float64)), fetch(1)])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "stores float64 as float32" in err.details()
    assert still_serving(server)


# -- results are always the values the function computed ---------------------------


def test_results_of_any_output_structure_are_stored_right(serve):
    server = serve()
    spec = jax.ShapeDtypeStruct((3,), jnp.float32)
    x = np.arange(3.0, dtype=np.float32)
    cases = [
        (lambda a: a * 2 + 1, [x * 2 + 1]),                                   # one array
        (lambda a: {"b": a + 1, "a": (a * 3, a.sum())}, [x * 3, x.sum(), x + 1]),  # dict, sorted keys
        (lambda a: [a], [x]),
    ]
    for fn, expected in cases:
        request, key = load(fn, spec)
        handles = list(range(10, 10 + len(expected)))
        replies, err = session(server, [request, execute(key, [x], handles)]
                               + [fetch(h, request_id=h) for h in handles])
        assert err is None, err
        got = [np.frombuffer(r.tensor.data, np.float32).reshape(r.tensor.shape) for r in replies[1:]]
        for g, e in zip(got, expected, strict=True):
            np.testing.assert_array_equal(g, e)
    # Nested inputs are taken in the exported order too.
    request, key = load(lambda pair, s: pair[0] * s - pair[1], (spec, spec), spec)
    replies, err = session(server, [request, execute(key, [x, np.ones(3, np.float32), 2 * x], [1]),
                                    fetch(1, request_id=2)])
    assert err is None
    np.testing.assert_array_equal(np.frombuffer(replies[1].tensor.data, np.float32), x * 2 * x - 1)
