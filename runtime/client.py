"""The client side of the executor service: an executor whose graph runs elsewhere.

    TERRA_EXECUTOR=grpc://127.0.0.1:50051 python train.py

`RemoteExecutor` offers the seam of the in-process `GraphExecutor`
(`compile_function`, `dispatch`, `compile`), so co-execution does not change:

- `compile_function` exports a segment with `jax.export` (for the server's
  platform), uploads the StableHLO once and waits until the server compiled it.
- Calling the result sends one `Execute` and returns at once: the client picks
  the result handles itself, so dispatches are pipelined on the session's
  stream and never wait for a reply. Results are `Handle`s (`RemoteValue`s).
- Arguments: a `Handle` of this session travels as its handle; a local
  jax.Array is uploaded once and then named by its handle while it lives;
  numpy arrays and Python numbers (feeds) travel inline.
- `Handle.local()` fetches one array, the only traffic back to Python.
- A `Handle` Python no longer references is released with the next request.
- A session with nothing to send pings the server well within its idle
  timeout, so a program paused between steps keeps its arrays there.

Token and TLS (`RemoteOptions`, from TERRA_EXECUTOR_TOKEN_FILE and
TERRA_EXECUTOR_TLS_CA): a file with the server's token; `grpcs://` connects
with TLS, checked against the system's roots or a PEM file of roots.
"""
from __future__ import annotations

import atexit
import collections
import itertools
import queue
import threading
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Sequence

import grpc
import jax
import numpy as np

from runtime._proto import executor_pb2 as pb
from runtime._proto import executor_pb2_grpc as pb_grpc
from runtime.executor import RemoteOptions, RemoteValue, TerraExecutorError, wait
from runtime.tensors import from_tensor, to_tensor

CONNECT_TIMEOUT_S = 5.0


def _channel_options(keepalive: int) -> list:
    # A server that stops answering (hung, or its host gone) is declared dead
    # after two keepalive periods.
    return [("grpc.max_receive_message_length", -1),  # the server's limit is the one that counts
            ("grpc.max_send_message_length", -1),
            ("grpc.keepalive_time_ms", keepalive),
            ("grpc.keepalive_timeout_ms", keepalive),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.ping_timeout_ms", keepalive),
            ("grpc.http2.max_pings_without_data", 0)]

_END = object()  # ends the request stream


class Handle(RemoteValue):
    """An array held by the server under `id`; released when Python drops it."""

    __slots__ = ("_session", "id", "aval", "_local")

    def __init__(self, session: "Session", aval):
        self._session = session
        self.id = next(session.handle_ids)
        self.aval = aval
        self._local = None

    def local(self) -> jax.Array:
        if self._local is None:
            self._local = _local_array(self._session.fetch(self.id), self.aval)
        return self._local

    def __del__(self):
        self._session.released.append(self.id)  # sent with the next request


class Session:
    """One `Session` stream: requests go out in order, replies come back by id.

    With `ping_interval_s`, a Ping goes out whenever nothing else went out for
    that long (the server closes silent sessions).
    """

    def __init__(self, channel: grpc.Channel, address: str, metadata: tuple,
                 ping_interval_s: float | None = None):
        self.address = address
        self.handle_ids = itertools.count(1)
        self.released: collections.deque[int] = collections.deque()  # thread-safe appends
        self._request_ids = itertools.count(1)
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._replies: dict[int, Future] = {}
        self._lock = threading.Lock()
        self._error: TerraExecutorError | None = None
        self._uploads: dict[int, Handle] = {}     # id(local jax.Array) -> its upload
        self._sent_at = time.monotonic()
        self._closed = threading.Event()
        self._call = pb_grpc.ExecutorStub(channel).Session(self._requests(), metadata=metadata)
        threading.Thread(target=self._read_replies, name="terra-remote-replies",
                         daemon=True).start()
        if ping_interval_s:
            threading.Thread(target=self._ping, args=(ping_interval_s,), name="terra-remote-ping",
                             daemon=True).start()

    # -- sending -------------------------------------------------------------
    def send(self, request: pb.Request) -> None:
        """Queue `request`; raises if the session already failed."""
        if self._error is not None:
            raise self._error
        self._enqueue(request)

    def ask(self, request: pb.Request) -> Future:
        """Send a request that has a reply; the Future gets the Reply."""
        future: Future = Future()
        request.id = next(self._request_ids)
        with self._lock:
            if self._error is not None:
                raise self._error
            self._replies[request.id] = future
        self._enqueue(request)
        return future

    def _enqueue(self, request: pb.Request) -> None:
        # A handle dies only after the request creating it was queued, so the
        # releases collected here always follow their creation on the stream.
        released = self.released
        while released:
            request.release.append(released.popleft())
        self._sent_at = time.monotonic()
        self._outbox.put(request)

    def _ping(self, interval: float) -> None:
        while not self._closed.wait(interval / 4):
            if self._error is not None:
                return
            if time.monotonic() - self._sent_at >= interval:
                self._enqueue(pb.Request(ping=pb.Ping()))

    def _requests(self):
        while True:
            request = self._outbox.get()
            if request is _END:
                return
            yield request

    def close(self) -> None:
        self._closed.set()
        self._outbox.put(_END)

    # -- replies ---------------------------------------------------------------
    def _read_replies(self) -> None:
        try:
            for reply in self._call:
                with self._lock:
                    future = self._replies.pop(reply.id, None)
                if future is not None:
                    future.set_result(reply)
            self._fail(TerraExecutorError(f"the session with the Terra executor at {self.address} "
                                          "was closed"))
        except grpc.RpcError as err:
            self._fail(executor_error(self.address, err))

    def _fail(self, error: TerraExecutorError) -> None:
        with self._lock:
            self._error = error
            pending, self._replies = self._replies, {}
        for future in pending.values():
            future.set_exception(error)

    # -- what the executor needs -------------------------------------------------
    def fetch(self, handle: int) -> np.ndarray | jax.Array:
        reply = wait(self.ask(pb.Request(fetch=pb.Fetch(handle=handle))))
        return from_tensor(reply.tensor)

    def load(self, blob: bytes) -> str:
        return wait(self.ask(pb.Request(load=pb.Load(exported=blob)))).loaded.executable

    def argument(self, value: Any, aval) -> pb.Argument:
        """How a segment input travels: a handle if the server has it, else inline."""
        if isinstance(value, Handle) and value._session is self:
            return pb.Argument(handle=value.id)
        if isinstance(value, RemoteValue):  # held by another executor: goes through here
            value = value.local()
        if isinstance(value, jax.Array):
            return pb.Argument(handle=self._uploaded(value).id)
        return pb.Argument(tensor=to_tensor(np.asarray(value, dtype=aval.dtype)))

    def _uploaded(self, array: jax.Array) -> Handle:
        """A local jax.Array goes up once; its handle lives as long as the array."""
        key = id(array)
        handle = self._uploads.get(key)
        if handle is None:
            handle = self._uploads[key] = Handle(self, jax.typeof(array))
            weakref.finalize(array, self._uploads.pop, key, None)
            self.send(pb.Request(put=pb.Put(handle=handle.id, tensor=to_tensor(array))))
        return handle


class RemoteExecutable:
    """A segment loaded in the server; calling it dispatches without waiting."""

    def __init__(self, session: Session, key: str, exported: jax.export.Exported):
        self._session = session
        self._key = key
        self._in_avals = exported.in_avals
        self._out_avals = exported.out_avals

    def __call__(self, *args: Any) -> list[Handle]:
        session = self._session
        call = pb.Execute(executable=self._key,
                          args=[session.argument(v, aval) for v, aval in zip(args, self._in_avals)])
        results = [Handle(session, aval) for aval in self._out_avals]
        call.results.extend(h.id for h in results)
        session.send(pb.Request(execute=call))
        return results


class RemoteExecutor:
    """The executor seam of `runtime.executor.GraphExecutor`, served over gRPC.

    Example:
        >>> executor = connect("grpc://127.0.0.1:50051")        # doctest: +SKIP
        >>> step = terra.function(train_step, executor=executor)  # doctest: +SKIP
    """

    def __init__(self, address: str, *, token: str | None = None,
                 root_certificates: bytes | None = None, tls: bool = False,
                 keepalive_ms: int = RemoteOptions().keepalive_ms,
                 connect_timeout: float = CONNECT_TIMEOUT_S):
        self.address = address
        target = address.split("://", 1)[-1]
        if tls:
            credentials = grpc.ssl_channel_credentials(root_certificates=root_certificates)
            self._channel = grpc.secure_channel(target, credentials,
                                                options=_channel_options(keepalive_ms))
        else:
            self._channel = grpc.insecure_channel(target, options=_channel_options(keepalive_ms))
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        try:
            status = self.status(timeout=connect_timeout)
        except grpc.RpcError as err:
            self._channel.close()
            raise executor_error(address, err, connecting=True) from None
        self.platform = status.platform
        # Ping at a third of the server's idle timeout: two pings may be late.
        self._session = Session(self._channel, address, self._metadata,
                                ping_interval_s=status.session_idle_timeout_s / 3 or None)
        self._compile = ThreadPoolExecutor(1, thread_name_prefix="terra-remote-compiler")

    def status(self, timeout: float = CONNECT_TIMEOUT_S) -> pb.ServerStatus:
        """The server's platform and counters."""
        stub = pb_grpc.ExecutorStub(self._channel)
        return stub.Status(pb.StatusRequest(), timeout=timeout, metadata=self._metadata)

    def compile_function(self, fn: Callable, specs: Sequence[jax.ShapeDtypeStruct],
                         out_shardings: Sequence | None = None) -> RemoteExecutable:
        """Export `fn` as StableHLO, load it in the server (which compiles it)."""
        if out_shardings is not None or any(s.sharding is not None for s in specs):
            raise TerraExecutorError(
                f"{self.address}: sharded steps run with the in-process executor only; "
                "unset TERRA_EXECUTOR (or pass executor=None) for steps over a Mesh")
        exported = jax.export.export(jax.jit(fn, keep_unused=True),
                                     platforms=(self.platform,))(*specs)
        return RemoteExecutable(self._session, self._session.load(bytes(exported.serialize())), exported)

    def dispatch(self, job: Callable[[], Any]) -> Future:
        """Run the job now (it only queues an Execute: a thread would cost more).

        Raises what the job raises, `TerraExecutorError` if the session failed.
        """
        future: Future = Future()
        future.set_result(job())
        return future

    def compile(self, job: Callable[[], Any]) -> Future:
        return self._compile.submit(job)

    def shutdown(self) -> None:
        self._compile.shutdown(wait=False, cancel_futures=True)
        self._session.close()
        self._channel.close()


def _local_array(array: np.ndarray | jax.Array, aval) -> jax.Array:
    """A fetched array as the jax.Array the graph produced, weak type included."""
    if isinstance(array, jax.Array):  # typed PRNG keys arrive as jax.Arrays
        return array
    if not aval.weak_type:
        return jax.device_put(array)
    return _weak_identity(array.shape, array.dtype)(array)


_weak_identities: dict = {}


def _weak_identity(shape: tuple, dtype) -> Callable:
    """jit of the identity taking a weakly typed input: gives the value its weak type back."""
    key = (shape, dtype)
    fn = _weak_identities.get(key)
    if fn is None:
        spec = jax.ShapeDtypeStruct(shape, dtype, weak_type=True)
        fn = _weak_identities[key] = jax.jit(lambda x: x).lower(spec).compile()
    return fn


def executor_error(address: str, err: grpc.RpcError, connecting: bool = False) -> TerraExecutorError:
    """What went wrong with the executor at `address`, and what to do."""
    code, details = err.code(), err.details()
    if code == grpc.StatusCode.UNAUTHENTICATED:
        hint = "set TERRA_EXECUTOR_TOKEN_FILE to the file the server got as --token-file"
    elif code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        hint = ("is `python -m terra serve` running there?" if connecting
                else "the executor process stopped or the connection broke")
    elif code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        hint = ("the server's limits refused it: start `terra serve` with larger ones "
                "(--max-message-mb, --max-session-mb, ...; see `terra serve --help`)")
    else:
        hint = "see the server's log"
    what = "cannot connect to" if connecting else "lost"
    return TerraExecutorError(f"terra {what} the executor at {address}: {code.name}: {details} "
                              f"({hint})")


_connections: dict[tuple[str, RemoteOptions], RemoteExecutor] = {}
_connections_lock = threading.Lock()


def connect(address: str, options: RemoteOptions = RemoteOptions()) -> RemoteExecutor:
    """The process's executor for `address` ("grpc://host:port" or "grpcs://host:port").

    One session per address and options, shared by every step function; a
    session that failed is replaced on the next call.
    """
    with _connections_lock:
        key = (address, options)
        executor = _connections.get(key)
        if executor is None or executor._session._error is not None:
            executor = _connections[key] = RemoteExecutor(
                address, token=_read_file("TERRA_EXECUTOR_TOKEN_FILE", options.token_file, text=True),
                root_certificates=_read_file("TERRA_EXECUTOR_TLS_CA", options.tls_ca),
                tls=address.startswith("grpcs://"), keepalive_ms=options.keepalive_ms)
            atexit.register(executor.shutdown)
        return executor


def _read_file(name: str, path: str | None, text: bool = False) -> Any:
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise TerraExecutorError(f"{name}={path}: cannot read it ({err.strerror})") from None
    if not text:
        return data
    try:
        token = data.decode().strip()
    except UnicodeDecodeError:
        raise TerraExecutorError(f"{name}={path}: the token file is not text") from None
    if not token:
        raise TerraExecutorError(f"{name}={path}: the token file is empty")
    return token
