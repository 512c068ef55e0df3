"""The executor service: runs a program's skeleton graph in its own process.

    python -m terra serve [--host 127.0.0.1] [--port N] [--token-file F]
                          [--tls-cert F --tls-key F] [--max-message-mb N]
                          [--max-sessions N] [--max-sessions-per-peer N]
                          [--session-idle-timeout S] [--max-handles N]
                          [--max-session-mb N] [--max-total-mb N]
                          [--max-executables N]

A client (runtime/client.py) opens one `Session` stream. It uploads each
segment once as `jax.export` serialized StableHLO (`Load`; compiled here and
cached by content hash), then streams `Execute` requests whose arguments are
handles of arrays this session holds or arrays sent inline (feeds). Results
stay here under handles the client chose; only `Fetch` sends an array back.
Nothing received is ever unpickled or executed as code: graphs are StableHLO
(host callbacks refused), arrays are dtype + shape + bytes.

Security defaults: binds to loopback only (another address needs
--allow-non-loopback), optional bearer token (--token-file) checked on every
Executor call, optional TLS, message size limit (--max-message-mb).
Resource limits (`Limits`): sessions in all and per peer host, an idle
timeout, handles, bytes and executables per session, bytes in all; a request
past one ends its session with RESOURCE_EXHAUSTED, and the server keeps
serving everyone else.
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import hmac
import ipaddress
import itertools
import logging
import math
import os
import queue
import re
import subprocess
import sys
import threading
import weakref
from concurrent import futures
from typing import Callable, Iterator, NamedTuple, Sequence

import grpc
import jax
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from runtime._proto import executor_pb2 as pb
from runtime._proto import executor_pb2_grpc as pb_grpc
from runtime.module_check import ModuleCheck
from runtime.executor import EAGER_ROUNDING
from runtime.tensors import MalformedTensor, from_tensor, to_tensor

log = logging.getLogger("terra.serve")

SERVICE = pb.DESCRIPTOR.services_by_name["Executor"].full_name
_SPARE_THREADS = 4           # for health checks and Status while sessions are open
_MAX_GRPC_MESSAGE_MB = 2047  # gRPC's message limit is an int32 of bytes


class Limits(NamedTuple):
    """What one server grants; `python -m terra serve` flags of the same names set them."""

    max_sessions: int = 16              # open streams; each holds one server thread
    max_sessions_per_peer: int = 8      # from one client host: others keep a share
    session_idle_timeout_s: float = 60.0  # a stream silent this long is closed
    max_handles: int = 10_000           # arrays one session holds
    max_session_bytes: int = 2 << 30    # bytes of the arrays one session holds
    max_total_bytes: int = 8 << 30      # ... that all sessions hold
    max_executables: int = 1024         # functions one session loaded
    max_message_bytes: int = 64 << 20   # largest request or reply


DEFAULT_LIMITS = Limits()
MAX_SESSIONS = DEFAULT_LIMITS.max_sessions
# A graph that calls back into the host would run code named by the sender.
_CUSTOM_CALL = re.compile(r'custom_call\s*@"?([\w.$-]+)|call_target_name\s*=\s*"([^"]+)"')


class RequestError(Exception):
    """A request the service refuses: ends the session with `code`."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


class Executable:
    """A loaded function: the deserialized export, compiled for this server.

    `run` takes the flat inputs and returns the flat list of results, whatever
    the exported function's input and output pytrees (a single array included).
    """

    def __init__(self, key: str, blob: bytes, platform: str, check: ModuleCheck):
        exported = self._deserialize(blob)
        if platform not in exported.platforms:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"Load: the function was exported for {', '.join(exported.platforms)}; "
                               f"this server runs {platform}")
        why = check.check(blob)  # in a helper process: some corrupted modules crash the reader
        if why is not None:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"Load: the exported function is malformed: its StableHLO module "
                               f"cannot be read ({why})")
        try:
            module = exported.mlir_module()
        except Exception as err:
            raise _bad_export("its StableHLO module cannot be read", err) from err
        for match in _CUSTOM_CALL.finditer(module):
            target = match.group(1) or match.group(2)
            if "callback" in target.lower():
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"Load: host callbacks cannot run in the executor ({target})")
        self.key = key
        self.in_avals = exported.in_avals
        self.out_avals = exported.out_avals
        self.out_bytes = sum(nbytes(a) for a in exported.out_avals)
        self.run = self._compile(exported)

    @staticmethod
    def _deserialize(blob: bytes) -> jax.export.Exported:
        try:
            exported = jax.export.deserialize(bytearray(blob))
            # Fields the flatbuffer decodes lazily fail here, not in a later request.
            exported.in_avals, exported.out_avals, exported.in_tree, exported.out_tree
        except Exception as err:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"Load: not a jax.export serialized function ({err})") from err
        return exported

    @staticmethod
    def _compile(exported: jax.export.Exported) -> Callable:
        def flat_call(*leaves):
            args, kwargs = jax.tree.unflatten(exported.in_tree, leaves)
            return jax.tree.leaves(exported.call(*args, **kwargs))

        specs = [jax.ShapeDtypeStruct(a.shape, a.dtype, weak_type=a.weak_type)
                 for a in exported.in_avals]
        try:
            return jax.jit(flat_call).lower(*specs).compile(compiler_options=EAGER_ROUNDING)
        except Exception as err:  # a corrupted module: the sender's error, not ours
            raise _bad_export("it does not compile", err) from err


def _bad_export(why: str, err: Exception) -> RequestError:
    first_line = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                        f"Load: the exported function is malformed: {why} "
                        f"({type(err).__name__}: {first_line})")


def nbytes(array) -> int:
    """What an array (or an aval) counts against the limits."""
    return math.prod(array.shape) * array.dtype.itemsize


class ClientSession:
    """One client stream: its handles and loaded functions, private to it."""

    def __init__(self, number: int, peer: str):
        self.number = number
        self.peer = peer
        self.handles: dict[int, jax.Array] = {}
        self.executables: dict[str, Executable] = {}
        self.nbytes = 0  # of the arrays in `handles`

    def __str__(self) -> str:
        return f"session {self.number} ({self.peer})"

    def array(self, handle: int) -> jax.Array:
        try:
            return self.handles[handle]
        except KeyError:
            raise RequestError(grpc.StatusCode.NOT_FOUND,
                               f"unknown handle {handle}: not stored in this session, "
                               "or already released") from None

    def check_new(self, handles: Sequence[int]) -> None:
        """Refuse before any work is done: a handle in use, or named twice."""
        if len(set(handles)) != len(handles):
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"result handles {list(handles)} name a handle twice")
        for h in handles:
            if h in self.handles:
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"handle {h} is already in use in this session")

    def store(self, handle: int, value: jax.Array) -> None:
        self.handles[handle] = value
        self.nbytes += nbytes(value)

    def release(self, handles: Sequence[int]) -> int:
        """Free `handles` (all or none); returns the bytes freed."""
        for h in handles:
            if h not in self.handles:
                raise RequestError(grpc.StatusCode.NOT_FOUND,
                                   f"cannot release unknown handle {h}")
        if len(set(handles)) != len(handles):
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"release {list(handles)} names a handle twice")
        freed = sum(nbytes(self.handles.pop(h)) for h in handles)
        self.nbytes -= freed
        return freed


class _Requests:
    """A stream's requests, read on a thread of their own so that waiting for one can time out.

    The queue holds one request: the client still waits on gRPC's flow control
    while the session works.
    """

    _END = object()

    def __init__(self, requests: Iterator[pb.Request], name: str):
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._closed = threading.Event()
        threading.Thread(target=self._read, args=(requests,), name=f"terra-serve-{name}",
                         daemon=True).start()

    def _read(self, requests: Iterator[pb.Request]) -> None:
        try:
            for request in requests:
                if not self._offer(request):
                    return
            self._offer(self._END)
        except Exception as err:  # grpc.RpcError: gRPC ended the stream
            self._offer(err)

    def _offer(self, item) -> bool:
        while not self._closed.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def next(self, timeout: float) -> pb.Request | None:
        """The next request; None at the end of the stream.

        Raises RequestError (DEADLINE_EXCEEDED) after `timeout` seconds without one,
        and what gRPC raised if it ended the stream.
        """
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED,
                               f"no request for {timeout:g} s: the session is closed "
                               "(the server's --session-idle-timeout; an idle client sends Ping)"
                               ) from None
        if isinstance(item, Exception):
            raise item
        return None if item is self._END else item

    def close(self) -> None:
        self._closed.set()


class ExecutorService(pb_grpc.ExecutorServicer):
    """Serves sessions within `limits`; compiled functions are shared by content hash."""

    def __init__(self, platform: str, limits: Limits = DEFAULT_LIMITS):
        self.platform = platform
        self.limits = limits
        self._lock = threading.Lock()
        self._compiled: weakref.WeakValueDictionary[str, Executable] = weakref.WeakValueDictionary()
        self._sessions: set[ClientSession] = set()
        self._per_peer: collections.Counter[str] = collections.Counter()
        self._numbers = itertools.count(1)
        self._counts = dict(executes=0, fetches=0, puts=0, sessions_total=0)
        self._bytes = 0  # held by all sessions
        self.module_check = ModuleCheck()

    # -- the stream ----------------------------------------------------------
    def Session(self, requests: Iterator[pb.Request], context) -> Iterator[pb.Reply]:
        session = ClientSession(next(self._numbers), context.peer())
        refusal = self._open(session)
        if refusal:  # keep threads for health checks and the sessions already open
            log.warning("%s refused: %s", session, refusal)
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refusal)
        log.info("%s opened", session)
        stream = _Requests(requests, f"session-{session.number}")
        try:
            while (request := stream.next(self.limits.session_idle_timeout_s)) is not None:
                reply = self._handle(session, request)
                if reply is not None:
                    yield reply
            if not context.is_active():  # not the client's end of stream: gRPC ended it
                self._log_broken_stream(session)
        except RequestError as err:
            log.warning("%s: %s: %s", session, err.code.name, err)
            context.abort(err.code, str(err))
        except grpc.RpcError:  # gRPC ended the stream while we waited for a request
            self._log_broken_stream(session)
        except Exception as err:  # XLA or JAX failed on a well-formed request
            log.exception("%s: request failed", session)
            context.abort(grpc.StatusCode.INTERNAL, f"{type(err).__name__}: {err}")
        finally:
            stream.close()
            self._close(session)

    def _open(self, session: ClientSession) -> str:
        """Admit `session`; or why not."""
        host = _peer_host(session.peer)
        with self._lock:
            if len(self._sessions) >= self.limits.max_sessions:
                return f"the executor serves at most {self.limits.max_sessions} sessions at once"
            if self._per_peer[host] >= self.limits.max_sessions_per_peer:
                return (f"the executor serves at most {self.limits.max_sessions_per_peer} "
                        f"sessions at once per client host ({host} has them open)")
            self._sessions.add(session)
            self._per_peer[host] += 1
            self._counts["sessions_total"] += 1
        return ""

    def _close(self, session: ClientSession) -> None:
        host = _peer_host(session.peer)
        with self._lock:
            self._sessions.discard(session)
            self._per_peer[host] -= 1
            if not self._per_peer[host]:
                del self._per_peer[host]
            self._bytes -= session.nbytes
        log.info("%s closed: %d handles (%d bytes) freed", session, len(session.handles),
                 session.nbytes)
        session.handles.clear()
        session.nbytes = 0

    def _log_broken_stream(self, session: ClientSession) -> None:
        # gRPC does not tell which; an oversized message got RESOURCE_EXHAUSTED.
        log.warning("%s: stream ended by gRPC: the client disconnected, or sent a message "
                    "over the %d MiB limit (RESOURCE_EXHAUSTED)", session,
                    self.limits.max_message_bytes >> 20)

    def _handle(self, session: ClientSession, request: pb.Request) -> pb.Reply | None:
        if isinstance(request, MalformedMessage):
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(request))
        kind = request.WhichOneof("kind")
        if kind is None:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "empty request: set one of "
                               "load, put, execute, fetch, ping")
        reply = getattr(self, "_" + kind)(session, request)
        freed = session.release(request.release)
        with self._lock:
            self._bytes -= freed
        return reply

    # -- what a session may hold -------------------------------------------------
    def _reserve(self, session: ClientSession, what: str, count: int, nbytes: int) -> None:
        """Count `nbytes` in `count` new arrays against the limits, or refuse."""
        limits = self.limits
        if len(session.handles) + count > limits.max_handles:
            raise _exhausted(f"{what}: the session would hold more than {limits.max_handles} "
                             "arrays (--max-handles); release handles it no longer needs")
        if session.nbytes + nbytes > limits.max_session_bytes:
            raise _exhausted(f"{what}: {_mib(nbytes)} more would put the session over its "
                             f"{_mib(limits.max_session_bytes)} (--max-session-mb; it holds "
                             f"{_mib(session.nbytes)})")
        with self._lock:
            if self._bytes + nbytes > limits.max_total_bytes:
                raise _exhausted(f"{what}: {_mib(nbytes)} more would put the server over its "
                                 f"{_mib(limits.max_total_bytes)} for all sessions (--max-total-mb)")
            self._bytes += nbytes

    def _unreserve(self, nbytes: int) -> None:
        with self._lock:
            self._bytes -= nbytes

    # -- requests ------------------------------------------------------------------
    def _ping(self, session: ClientSession, request: pb.Request) -> None:
        return None

    def _load(self, session: ClientSession, request: pb.Request) -> pb.Reply:
        blob = request.load.exported
        key = hashlib.sha256(blob).hexdigest()
        if key not in session.executables and len(session.executables) >= self.limits.max_executables:
            raise _exhausted(f"Load: the session loaded {self.limits.max_executables} functions "
                             "already (--max-executables)")
        with self._lock:
            executable = self._compiled.get(key)
        if executable is None:
            executable = Executable(key, blob, self.platform, self.module_check)
            with self._lock:
                self._compiled[key] = executable
        session.executables[key] = executable
        return pb.Reply(id=request.id, loaded=pb.Loaded(executable=key))

    def _put(self, session: ClientSession, request: pb.Request) -> None:
        handle = request.put.handle
        session.check_new([handle])
        array = _array(request.put.tensor, "Put")
        self._reserve(session, "Put", 1, nbytes(array))
        try:
            value = jax.device_put(array)
        except Exception:
            self._unreserve(nbytes(array))
            raise
        if value.dtype != array.dtype:  # e.g. float64 on a server without jax_enable_x64
            self._unreserve(nbytes(array))
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"Put: this server stores {array.dtype} as {value.dtype} "
                               "(start it with JAX_ENABLE_X64=1 for 64-bit types)")
        session.store(handle, value)
        self._count("puts")

    def _execute(self, session: ClientSession, request: pb.Request) -> None:
        call = request.execute
        executable = session.executables.get(call.executable)
        if executable is None:
            raise RequestError(grpc.StatusCode.NOT_FOUND,
                               f"unknown executable {call.executable!r}: Load it in this session first")
        if len(call.args) != len(executable.in_avals) or len(call.results) != len(executable.out_avals):
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"Execute: the function takes {len(executable.in_avals)} arguments and "
                               f"returns {len(executable.out_avals)} results; got {len(call.args)} "
                               f"arguments and {len(call.results)} result handles")
        session.check_new(call.results)
        args = [self._argument(session, arg, aval, i)
                for i, (arg, aval) in enumerate(zip(call.args, executable.in_avals))]
        self._reserve(session, "Execute", len(call.results), executable.out_bytes)
        try:
            results = executable.run(*args)
            self._check_results(results, executable.out_avals)
        except Exception:
            self._unreserve(executable.out_bytes)
            raise
        for handle, value in zip(call.results, results):
            session.store(handle, value)
        self._count("executes")

    @staticmethod
    def _check_results(results: Sequence[jax.Array], avals: Sequence) -> None:
        """Never store a value that is not the one the function promised."""
        if len(results) != len(avals) or any(v.shape != a.shape or v.dtype != a.dtype
                                              for v, a in zip(results, avals)):
            got = ", ".join(f"{v.dtype}{list(v.shape)}" for v in results)
            raise RuntimeError(f"Execute: the function returned [{got}], not the exported "
                               f"{', '.join(f'{a.dtype}{list(a.shape)}' for a in avals)}")

    @staticmethod
    def _argument(session: ClientSession, arg: pb.Argument, aval, index: int):
        if arg.WhichOneof("value") == "handle":
            value = session.array(arg.handle)
            index = f"{index} (handle {arg.handle})"
        elif arg.WhichOneof("value") == "tensor":
            value = _array(arg.tensor, f"Execute argument {index}")
        else:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"Execute argument {index}: set a handle or a tensor")
        if value.shape != aval.shape or value.dtype != aval.dtype:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"Execute argument {index}: got {value.dtype}{list(value.shape)}, "
                               f"the function takes {aval.dtype}{list(aval.shape)}")
        return value

    def _fetch(self, session: ClientSession, request: pb.Request) -> pb.Reply:
        array = session.array(request.fetch.handle)
        if nbytes(array) > self.limits.max_message_bytes:
            raise _exhausted(f"Fetch: handle {request.fetch.handle} holds {_mib(nbytes(array))}, "
                             f"over the {_mib(self.limits.max_message_bytes)} message limit "
                             "(--max-message-mb)")
        tensor = to_tensor(array)  # waits until computed
        self._count("fetches")
        return pb.Reply(id=request.id, tensor=tensor)

    def _count(self, name: str) -> None:
        with self._lock:
            self._counts[name] += 1

    # -- counters ------------------------------------------------------------
    def Status(self, request: pb.StatusRequest, context) -> pb.ServerStatus:
        if isinstance(request, MalformedMessage):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(request))
        with self._lock:
            return pb.ServerStatus(platform=self.platform, sessions=len(self._sessions),
                                   handles=sum(len(s.handles) for s in self._sessions),
                                   executables=len(self._compiled), handle_bytes=self._bytes,
                                   session_idle_timeout_s=self.limits.session_idle_timeout_s,
                                   **self._counts)


class MalformedMessage(str):
    """What a request that does not parse becomes: the handler refuses it (INVALID_ARGUMENT).

    gRPC's own deserialization failure would answer INTERNAL.
    """


def _parser(message_type) -> Callable[[bytes], object]:
    def parse(data: bytes):
        try:
            return message_type.FromString(data)
        except Exception as err:  # google.protobuf.message.DecodeError
            return MalformedMessage(f"malformed {message_type.DESCRIPTOR.name} message ({err})")
    return parse


def add_service(service: ExecutorService, server: grpc.Server) -> None:
    """Register `service` as pb_grpc.add_ExecutorServicer_to_server does, with tolerant parsing."""
    handlers = {
        "Session": grpc.stream_stream_rpc_method_handler(
            service.Session, request_deserializer=_parser(pb.Request),
            response_serializer=pb.Reply.SerializeToString),
        "Status": grpc.unary_unary_rpc_method_handler(
            service.Status, request_deserializer=_parser(pb.StatusRequest),
            response_serializer=pb.ServerStatus.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


def _peer_host(peer: str) -> str:
    """"ipv4:127.0.0.1:5000" -> "ipv4:127.0.0.1": sessions are counted per client host."""
    return peer.rsplit(":", 1)[0] if peer.startswith(("ipv4:", "ipv6:")) else peer


def _exhausted(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, message)


def _mib(nbytes: int) -> str:
    return f"{nbytes / (1 << 20):.1f} MiB"


def _array(tensor: pb.Tensor, what: str) -> np.ndarray | jax.Array:
    try:
        return from_tensor(tensor)
    except MalformedTensor as err:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"{what}: {err}") from None


class TokenCheck(grpc.ServerInterceptor):
    """Executor calls must carry `authorization: Bearer <token>` metadata.

    Health checks and reflection stay open: they reveal nothing a client
    could not read in proto/executor.proto.
    """

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails):
        handler = continuation(details)
        if handler is None or not details.method.startswith(f"/{SERVICE}/"):
            return handler
        given = dict(details.invocation_metadata).get("authorization", "")
        if hmac.compare_digest(given.encode(), self._expected):
            return handler
        log.warning("refused %s: missing or wrong token", details.method)
        return _refusal(handler)


def _refusal(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind that ends the call with UNAUTHENTICATED."""
    def refuse(request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED,
                      "missing or wrong token: pass the server's --token-file to the client "
                      "(TERRA_EXECUTOR_TOKEN_FILE)")

    kinds = {(False, False): grpc.unary_unary_rpc_method_handler,
             (False, True): grpc.unary_stream_rpc_method_handler,
             (True, False): grpc.stream_unary_rpc_method_handler,
             (True, True): grpc.stream_stream_rpc_method_handler}
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(refuse, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


def host_port(host: str, port: int) -> str:
    """"host:port", with an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def start_server(host: str = "127.0.0.1", port: int = 0, *, token: str | None = None,
                 tls: tuple[bytes, bytes] | None = None, limits: Limits = DEFAULT_LIMITS,
                 allow_non_loopback: bool = False) -> tuple[grpc.Server, int]:
    """Start the executor service; returns the server and the port it bound.

    Args:
        host: address to bind; loopback unless `allow_non_loopback`.
        port: 0 picks a free port.
        token: if given, Executor calls must send it as a bearer token.
        tls: (private key PEM, certificate chain PEM) to serve TLS.
        limits: what sessions may hold (see `Limits`); a request past one ends
            its session with RESOURCE_EXHAUSTED.

    Example:
        >>> server, port = start_server(port=0)     # doctest: +SKIP
        >>> server.stop(None)                       # doctest: +SKIP
    """
    if not is_loopback(host) and not allow_non_loopback:
        raise ValueError(f"refusing to serve on {host}: it is not a loopback address, and the "
                         "service runs any graph a client sends. Pass --allow-non-loopback "
                         "(with --token-file and TLS) to serve on the network.")
    options = [("grpc.max_receive_message_length", limits.max_message_bytes),
               ("grpc.max_send_message_length", limits.max_message_bytes),
               # Clients ping to notice a dead server; let them.
               ("grpc.keepalive_permit_without_calls", 1),
               ("grpc.http2.min_recv_ping_interval_without_data_ms", 1000),
               ("grpc.http2.max_ping_strikes", 0)]
    threads = limits.max_sessions + _SPARE_THREADS
    server = grpc.server(futures.ThreadPoolExecutor(threads, thread_name_prefix="terra-serve"),
                         interceptors=[TokenCheck(token)] if token else [],
                         options=options, maximum_concurrent_rpcs=threads)
    service = ExecutorService(jax.export.default_export_platform(), limits)
    service.module_check.start()  # ready before the first Load
    add_service(service, server)
    health_servicer = health.HealthServicer()
    for name in ("", SERVICE):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME), server)
    address = host_port(host, port)
    if tls is None:
        bound = server.add_insecure_port(address)
    else:
        bound = server.add_secure_port(address, grpc.ssl_server_credentials([tls]))
    if bound == 0:
        raise OSError(f"cannot bind {address} (in use?)")
    server.start()
    return server, bound


def _bounded(kind: Callable[[str], int | float], low, high=None) -> Callable[[str], int | float]:
    """An argparse type: a `kind` number in [low, high], else a message naming the accepted range."""
    accepted = f"{'an integer' if kind is int else 'a number'} >= {low}" + (
        f" and <= {high}" if high is not None else "")

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {accepted}") from None
        if not (value >= low and (high is None or value <= high)):  # also refuses nan
            raise argparse.ArgumentTypeError(f"{text} is out of range: use {accepted}")
        return value
    return parse


def _arguments() -> argparse.ArgumentParser:
    d = DEFAULT_LIMITS
    parser = argparse.ArgumentParser(prog="python -m terra serve",
                                     description="Run Terra's graph executor service.")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback)")
    parser.add_argument("--port", type=_bounded(int, 0, 65535), default=0,
                        help="port, 0-65535 (default 0: a free one, printed)")
    parser.add_argument("--token-file", help="file holding the token clients must present")
    parser.add_argument("--tls-cert", help="PEM certificate chain: serve TLS (with --tls-key)")
    parser.add_argument("--tls-key", help="PEM private key of --tls-cert")
    parser.add_argument("--allow-non-loopback", action="store_true",
                        help="allow --host to be a non-loopback address")
    limits = parser.add_argument_group("limits (a request past one ends its session with "
                                       "RESOURCE_EXHAUSTED)")
    limits.add_argument("--max-message-mb", type=_bounded(int, 1, _MAX_GRPC_MESSAGE_MB),
                        default=d.max_message_bytes >> 20,
                        help=f"largest request or reply in MiB (default {d.max_message_bytes >> 20})")
    limits.add_argument("--max-sessions", type=_bounded(int, 1, 1024), default=d.max_sessions,
                        help=f"sessions open at once (default {d.max_sessions})")
    limits.add_argument("--max-sessions-per-peer", type=_bounded(int, 1, 1024),
                        default=d.max_sessions_per_peer,
                        help=f"sessions open at once from one client host "
                             f"(default {d.max_sessions_per_peer})")
    limits.add_argument("--session-idle-timeout", type=_bounded(float, 0.1, 86400.0),
                        default=d.session_idle_timeout_s, metavar="SECONDS",
                        help="close a session that sent nothing this long (default "
                             f"{d.session_idle_timeout_s:g}; clients ping well within it)")
    limits.add_argument("--max-handles", type=_bounded(int, 1), default=d.max_handles,
                        help=f"arrays one session holds (default {d.max_handles})")
    limits.add_argument("--max-session-mb", type=_bounded(int, 1), default=d.max_session_bytes >> 20,
                        help=f"MiB of arrays one session holds (default {d.max_session_bytes >> 20})")
    limits.add_argument("--max-total-mb", type=_bounded(int, 1), default=d.max_total_bytes >> 20,
                        help=f"MiB of arrays all sessions hold (default {d.max_total_bytes >> 20})")
    limits.add_argument("--max-executables", type=_bounded(int, 1), default=d.max_executables,
                        help=f"functions one session loads (default {d.max_executables})")
    return parser


def _limits(ns: argparse.Namespace) -> Limits:
    return Limits(max_sessions=ns.max_sessions, max_sessions_per_peer=ns.max_sessions_per_peer,
                  session_idle_timeout_s=ns.session_idle_timeout, max_handles=ns.max_handles,
                  max_session_bytes=ns.max_session_mb << 20, max_total_bytes=ns.max_total_mb << 20,
                  max_executables=ns.max_executables, max_message_bytes=ns.max_message_mb << 20)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m terra serve`: run the executor service until interrupted."""
    parser = _arguments()
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s terra.serve %(levelname)s %(message)s")
    if bool(ns.tls_cert) != bool(ns.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    token = _read(ns.token_file, parser).decode().strip() if ns.token_file else None
    if ns.token_file and not token:
        parser.error(f"--token-file {ns.token_file} is empty")
    tls = (_read(ns.tls_key, parser), _read(ns.tls_cert, parser)) if ns.tls_cert else None
    try:
        server, port = start_server(ns.host, ns.port, token=token, tls=tls, limits=_limits(ns),
                                    allow_non_loopback=ns.allow_non_loopback)
    except (ValueError, OSError, RuntimeError) as err:  # grpc raises RuntimeError for a bad TLS key
        parser.error(str(err))
    if not is_loopback(ns.host) and not (token and tls):
        log.warning("serving on %s without %s: anyone who can reach it can run graphs",
                    ns.host, " and ".join(w for w, on in (("a token", token), ("TLS", tls)) if not on))
    scheme = "grpcs" if tls else "grpc"
    print(f"terra executor serving on {scheme}://{host_port(ns.host, port)} "
          f"(platform {jax.export.default_export_platform()}, "
          f"token {'required' if token else 'off'})", flush=True)
    try:
        server.wait_for_termination()
    except KeyboardInterrupt:
        server.stop(grace=1.0)
    return 0


def _read(path: str, parser: argparse.ArgumentParser) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as err:
        parser.error(f"cannot read {path}: {err.strerror}")


class ServerProcess:
    """A `python -m terra serve` subprocess on a free loopback port (tests, benchmarks).

    Example:
        >>> with ServerProcess() as server:                     # doctest: +SKIP
        ...     step = terra.function(train_step, executor=server.address)
    """

    def __init__(self, *args: str, log_path: str | None = None, startup_timeout: float = 60.0):
        # The server runs this checkout's code, whatever is installed.
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = {**os.environ,
               "PYTHONPATH": os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH"))))}
        log = open(log_path, "ab") if log_path else subprocess.DEVNULL
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "terra", "serve", "--port", "0", *args],
                stdout=subprocess.PIPE, stderr=log, env=env, text=True)
        finally:
            if log_path:
                log.close()
        lines: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=lambda: lines.put(self.process.stdout.readline()),
                         daemon=True).start()
        try:
            line = lines.get(timeout=startup_timeout)
        except queue.Empty:
            self.stop()
            raise TimeoutError(f"`terra serve` printed no address within {startup_timeout} s")
        match = re.search(r"serving on (\S+)", line)
        if match is None:
            self.stop()
            raise RuntimeError(f"`terra serve` failed to start (exit code {self.process.poll()}): "
                               f"{line.strip() or 'no output; see its log'}")
        self.address = match.group(1)

    def stop(self) -> None:
        """Kill the server (SIGKILL: also how the fault tests make it die) and reap it."""
        self.process.kill()
        self.process.wait(timeout=30)
        self.process.stdout.close()

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
