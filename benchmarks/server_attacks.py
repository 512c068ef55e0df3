"""Attacks on the executor server (`python -m terra serve`): the status each gets,
and whether the server still serves a fresh client afterwards.

    python benchmarks/server_attacks.py            # prints a markdown table

Every attack talks to a real server on loopback. The servers run with small
limits (flags below) so that exhausting them stays cheap; the defaults are in
`runtime.server.Limits`.
"""
from __future__ import annotations

import hashlib
import os
import pathlib
import queue
import subprocess
import sys
import tempfile
import threading
import time

import grpc
import jax
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from runtime._proto import executor_pb2 as pb  # noqa: E402
from runtime._proto import executor_pb2_grpc as pb_grpc  # noqa: E402
from runtime.server import ServerProcess  # noqa: E402
from runtime.tensors import to_tensor  # noqa: E402

MiB = 1 << 20
FLAGS = ("--max-session-mb", "64", "--max-total-mb", "96", "--max-message-mb", "8",
         "--session-idle-timeout", "5", "--max-executables", "8", "--max-handles", "10000")
SPEC = jax.ShapeDtypeStruct((3,), jnp.float32)
FLIPS = 400


def target(server) -> str:
    return server.address.split("://")[1]


def session(server, requests, token=None, credentials=None, timeout=60):
    """Send `requests` on one stream: (status name, replies)."""
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    channel = (grpc.secure_channel(target(server), credentials, options=options) if credentials
               else grpc.insecure_channel(target(server), options=options))
    with channel:
        call = pb_grpc.ExecutorStub(channel).Session(iter(requests), timeout=timeout,
                                                     metadata=metadata)
        try:
            return "OK", list(call)
        except grpc.RpcError as err:
            return err.code().name, []


def put(handle, array):
    return pb.Request(put=pb.Put(handle=handle, tensor=to_tensor(np.asarray(array))))


def raw_put(handle, dtype, shape, data=b""):
    return pb.Request(put=pb.Put(handle=handle, tensor=pb.Tensor(dtype=dtype, shape=shape, data=data)))


def fetch(handle, request_id=1):
    return pb.Request(id=request_id, fetch=pb.Fetch(handle=handle))


def exported(fn, *specs, **kwargs):
    blob = bytes(jax.export.export(jax.jit(fn), **kwargs)(*specs).serialize())
    return blob, hashlib.sha256(blob).hexdigest()


def load(blob):
    return pb.Request(id=1, load=pb.Load(exported=blob))


def execute(key, args, results):
    return pb.Request(execute=pb.Execute(executable=key, args=args, results=results))


def feed(array):
    return pb.Argument(tensor=to_tensor(np.asarray(array, np.float32)))


def still_serving(server, **kwargs) -> bool:
    code, replies = session(server, [put(1, np.arange(3, dtype=np.float32)), fetch(1)], **kwargs)
    return (code == "OK" and server.process.poll() is None
            and np.frombuffer(replies[0].tensor.data, np.float32).tolist() == [0, 1, 2])


def status(server, token=None) -> pb.ServerStatus:
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    with grpc.insecure_channel(target(server)) as channel:
        return pb_grpc.ExecutorStub(channel).Status(pb.StatusRequest(), timeout=10, metadata=metadata)


def settled(server, timeout=30.0) -> None:
    """Wait (bounded) until the sessions of earlier attacks are closed."""
    deadline = time.monotonic() + timeout
    while status(server).sessions and time.monotonic() < deadline:
        time.sleep(0.05)


def silent_streams(server, n):
    """n streams that send nothing; returns the status each ends with."""
    channel = grpc.insecure_channel(target(server))
    calls = [pb_grpc.ExecutorStub(channel).Session(iter(queue.SimpleQueue().get, None), timeout=60)
             for _ in range(n)]
    codes = []
    for call in calls:
        try:
            list(call)
            codes.append("OK")
        except grpc.RpcError as err:
            codes.append(err.code().name)
    channel.close()
    return codes


def attacks(server):
    """(attack, status) pairs against `server` (started with FLAGS)."""
    blob, key = exported(lambda x: x * 2 + 1, SPEC)
    big_blob, big_key = exported(lambda x: jnp.zeros((16 * MiB // 4,), jnp.float32) + x[0], SPEC)
    x = np.arange(3, dtype=np.float32)
    yield "empty request", session(server, [pb.Request()])[0]
    yield "Put shape [0, 2^63-1]", session(server, [raw_put(1, "float32", [0, 2**63 - 1])])[0]
    yield "Put shape [0, 2^62, 2^62]", session(server, [raw_put(1, "float32", [0, 2**62, 2**62])])[0]
    yield "Put with 100 dimensions", session(server, [raw_put(1, "float32", [1] * 100)])[0]
    yield "Put shape [-1]", session(server, [raw_put(1, "float32", [-1])])[0]
    yield "Put 8 bytes as float32[3]", session(server, [raw_put(1, "float32", [3], b"\0" * 8)])[0]
    yield "Put dtype 'object'", session(server, [raw_put(1, "object", [1], b"x")])[0]
    yield "Put dtype 'key<bogus>'", session(server, [raw_put(1, "key<bogus>", [1], b"\0" * 8)])[0]
    yield "Put float64 on a 32-bit server", session(server, [put(1, np.ones(2))])[0]
    yield "Put a handle already in use", session(server, [put(1, x), put(1, x)])[0]
    yield "Load pickle bytes", session(server, [load(b"\x80\x04cos\nsystem\n")])[0]
    yield "Load a truncated export", session(server, [load(blob[:len(blob) // 2])])[0]
    module = jax.export.deserialize(bytearray(blob)).mlir_module_serialized
    at = blob.index(module)
    yield "Load an export with its module zeroed", session(
        server, [load(blob[:at] + bytes(len(module)) + blob[at + len(module):])])[0]
    rng = np.random.default_rng(0)
    flips = {}
    for _ in range(FLIPS):
        bad = bytearray(blob)
        for _ in range(3):
            bad[rng.integers(len(bad))] ^= 1 << int(rng.integers(8))
        code = session(server, [load(bytes(bad))])[0]
        flips[code] = flips.get(code, 0) + 1
    yield f"Load {FLIPS} exports with 3 random bit flips", ", ".join(f"{c} x{n}" for c, n in sorted(flips.items()))
    yield "Load an export for another platform", session(
        server, [load(exported(lambda x: x + 1, SPEC, platforms=("cuda",))[0])])[0]
    target_name = "xla_ffi_python_cpu_callback"
    callback = bytes(jax.export.export(
        jax.jit(lambda x: jax.ffi.ffi_call(target_name, SPEC)(x)),
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(target_name)])(SPEC).serialize())
    yield "Load a graph calling a host callback", session(server, [load(callback)])[0]
    yield "Load 9 functions (--max-executables 8)", session(
        server, [load(exported(lambda x, k=k: x + k, SPEC)[0]) for k in range(9)])[0]
    yield "Execute an unknown executable", session(server, [execute("f" * 64, [feed(x)], [2])])[0]
    yield "Execute with an unknown handle", session(
        server, [load(blob), execute(key, [pb.Argument(handle=99)], [2])])[0]
    yield "Execute with a wrong shape", session(server, [load(blob), execute(key, [feed(np.ones(4))], [2])])[0]
    yield "Execute with a wrong dtype", session(server, [load(blob), execute(
        key, [pb.Argument(tensor=to_tensor(np.ones(3, np.int32)))], [2])])[0]
    yield "Execute with an empty argument", session(server, [load(blob), execute(key, [pb.Argument()], [2])])[0]
    yield "Execute with 2 arguments for 1", session(server, [load(blob), execute(key, [feed(x)] * 2, [2])])[0]
    yield "Execute naming a result handle in use", session(
        server, [put(2, x), load(blob), execute(key, [feed(x)], [2])])[0]
    pair_blob, pair_key = exported(lambda x: (x, x), SPEC)
    yield "Execute naming one result handle twice", session(
        server, [load(pair_blob), execute(pair_key, [feed(x)], [2, 2])])[0]
    code, replies = session(server, [load(blob), execute(key, [feed(x)], [2]), fetch(2, 2)])
    value = np.frombuffer(replies[-1].tensor.data, np.float32).tolist() if replies else None
    yield "Execute a single-array function: value stored", f"{code}, {value} (x*2+1 of [0,1,2])"
    yield "Execute results over --max-session-mb", session(
        server, [load(big_blob)] + [put(h, np.zeros(6 * MiB // 4, np.float32)) for h in range(1, 10)]
        + [execute(big_key, [feed(x)], [99])])[0]
    yield "Fetch an unknown handle", session(server, [fetch(42)])[0]
    yield "Fetch 16 MiB over an 8 MiB message limit", session(
        server, [load(big_blob), execute(big_key, [feed(x)], [1]), fetch(1)])[0]
    yield "Release an unknown handle", session(server, [pb.Request(put=pb.Put(
        handle=1, tensor=to_tensor(x)), release=[77])])[0]
    yield "Release one handle twice in a request", session(server, [put(1, x), pb.Request(
        put=pb.Put(handle=2, tensor=to_tensor(x)), release=[1, 1])])[0]
    yield "Request of 9 MiB (--max-message-mb 8)", session(
        server, [put(1, np.zeros(9 * MiB // 4, np.float32))])[0]
    with grpc.insecure_channel(target(server)) as channel:
        raw = channel.stream_stream("/terra.executor.v1.Executor/Session")
        try:
            list(raw(iter([b"\xff\xff\xff\xff"]), timeout=30))
            yield "bytes that are not a Request", "OK"
        except grpc.RpcError as err:
            yield "bytes that are not a Request", err.code().name
        try:
            channel.unary_unary("/terra.executor.v1.Executor/Status")(b"\x0a", timeout=30)
            yield "bytes that are not a StatusRequest", "OK"
        except grpc.RpcError as err:
            yield "bytes that are not a StatusRequest", err.code().name
        try:
            channel.unary_unary("/terra.executor.v1.Executor/Shell")(b"", timeout=30)
            yield "an RPC the service does not have", "OK"
        except grpc.RpcError as err:
            yield "an RPC the service does not have", err.code().name
    yield "10,001 handles in one session", session(
        server, [put(h, np.ones(1, np.float32)) for h in range(1, 10_002)] + [fetch(1)])[0]
    yield "65 MiB of Puts in one session (--max-session-mb 64)", session(
        server, [put(h, np.zeros(MiB // 4, np.float32)) for h in range(1, 66)] + [fetch(1)])[0]
    channel = grpc.insecure_channel(target(server))
    holders = []
    for _ in range(2):  # two open sessions hold 2 x 40 MiB of the 96 MiB total
        q = queue.SimpleQueue()
        call = pb_grpc.ExecutorStub(channel).Session(iter(q.get, None), timeout=60)
        for h in range(1, 9):
            q.put(put(h, np.zeros(5 * MiB // 4, np.float32)))
        q.put(put(9, x))
        q.put(fetch(9))
        next(call)
        holders.append((q, call))
    yield "a third session's 20 MiB over --max-total-mb 96", session(
        server, [put(h, np.zeros(5 * MiB // 4, np.float32)) for h in range(1, 5)] + [fetch(4)])[0]
    for q, call in holders:
        q.put(None)
        list(call)
    channel.close()
    settled(server)
    codes = silent_streams(server, 9)
    yield ("9 silent streams from one host (8 per peer, idle timeout 5 s)",
           ", ".join(f"{c} x{codes.count(c)}" for c in sorted(set(codes))))
    settled(server)
    results, lock = [], threading.Lock()

    def client(k):
        y = np.full(3, k, np.float32)
        code, replies = session(server, [load(blob)] + [
            execute(key, [feed(y)], [h]) for h in range(1, 51)] + [fetch(50, 2)])
        ok = code == "OK" and np.frombuffer(replies[-1].tensor.data, np.float32).tolist() == [2 * k + 1] * 3
        with lock:
            results.append("correct" if ok else code)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    yield "8 concurrent sessions, 50 Executes each", ", ".join(
        f"{r} x{results.count(r)}" for r in sorted(set(results)))


def token_attacks(server, token):
    yield "no token", session(server, [fetch(1)])[0], still_serving(server, token=token)
    yield "a wrong token", session(server, [fetch(1)], token="wrong")[0], still_serving(server, token=token)
    try:
        status(server)
        code = "OK"
    except grpc.RpcError as err:
        code = err.code().name
    yield "Status without the token", code, still_serving(server, token=token)


def tls_attacks(server, cert, other_cert):
    yield "plaintext to a TLS port", session(server, [fetch(1)], timeout=10)[0], still_serving(
        server, credentials=grpc.ssl_channel_credentials(cert))
    yield "TLS checked against another CA", session(
        server, [fetch(1)], credentials=grpc.ssl_channel_credentials(other_cert), timeout=10)[0], \
        still_serving(server, credentials=grpc.ssl_channel_credentials(cert))


def certificate(directory, name):
    key, cert = directory / f"{name}.key", directory / f"{name}.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return key, cert


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        with ServerProcess(*FLAGS, log_path=str(tmp / "server.log")) as server:
            for attack, code in attacks(server):
                rows.append((attack, code, still_serving(server)))
        (tmp / "token").write_text("s3cret")
        with ServerProcess("--token-file", str(tmp / "token")) as server:
            rows.extend(token_attacks(server, "s3cret"))
        key, cert = certificate(tmp, "server")
        _, other = certificate(tmp, "other")
        with ServerProcess("--tls-cert", str(cert), "--tls-key", str(key)) as server:
            rows.extend(tls_attacks(server, cert.read_bytes(), other.read_bytes()))
    print("| attack | status returned | server still serving |")
    print("|---|---|---|")
    for attack, code, serving in rows:
        print(f"| {attack} | {code} | {'yes' if serving else 'NO'} |")


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    main()
