"""The executor service: runs a program's skeleton graph in its own process.

    python -m terra serve [--host 127.0.0.1] [--port N] [--token-file F]
                          [--tls-cert F --tls-key F] [--max-message-mb N]

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
"""
from __future__ import annotations

import argparse
import hashlib
import hmac
import ipaddress
import itertools
import logging
import os
import queue
import re
import subprocess
import sys
import threading
import weakref
from concurrent import futures
from typing import Callable, Iterator, Sequence

import grpc
import jax
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from runtime._proto import executor_pb2 as pb
from runtime._proto import executor_pb2_grpc as pb_grpc
from runtime.executor import EAGER_ROUNDING
from runtime.tensors import MalformedTensor, from_tensor, to_tensor

log = logging.getLogger("terra.serve")

SERVICE = pb.DESCRIPTOR.services_by_name["Executor"].full_name
DEFAULT_MAX_MESSAGE_MB = 64
MAX_SESSIONS = 16            # open streams; each holds one server thread
_SPARE_THREADS = 4           # for health checks and Status while sessions are open
# A graph that calls back into the host would run code named by the sender.
_CUSTOM_CALL = re.compile(r'custom_call\s*@"?([\w.$-]+)|call_target_name\s*=\s*"([^"]+)"')


class RequestError(Exception):
    """A request the service refuses: ends the session with `code`."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


class Executable:
    """A loaded function: the deserialized export, compiled for this server."""

    def __init__(self, key: str, blob: bytes, platform: str):
        try:
            exported = jax.export.deserialize(bytearray(blob))
        except Exception as err:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"Load: not a jax.export serialized function ({err})") from err
        if platform not in exported.platforms:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"Load: the function was exported for {', '.join(exported.platforms)}; "
                               f"this server runs {platform}")
        for match in _CUSTOM_CALL.finditer(exported.mlir_module()):
            target = match.group(1) or match.group(2)
            if "callback" in target.lower():
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"Load: host callbacks cannot run in the executor ({target})")
        self.key = key
        self.in_avals = exported.in_avals
        self.out_avals = exported.out_avals
        specs = [jax.ShapeDtypeStruct(a.shape, a.dtype, weak_type=a.weak_type)
                 for a in exported.in_avals]
        self.run = jax.jit(exported.call).lower(*specs).compile(compiler_options=EAGER_ROUNDING)


class ClientSession:
    """One client stream: its handles and loaded functions, private to it."""

    def __init__(self, number: int, peer: str):
        self.number = number
        self.peer = peer
        self.handles: dict[int, jax.Array] = {}
        self.executables: dict[str, Executable] = {}

    def __str__(self) -> str:
        return f"session {self.number} ({self.peer})"

    def array(self, handle: int) -> jax.Array:
        try:
            return self.handles[handle]
        except KeyError:
            raise RequestError(grpc.StatusCode.NOT_FOUND,
                               f"unknown handle {handle}: not stored in this session, "
                               "or already released") from None

    def store(self, handle: int, value: jax.Array) -> None:
        if handle in self.handles:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"handle {handle} is already in use in this session")
        self.handles[handle] = value

    def release(self, handles: Sequence[int]) -> None:
        for h in handles:
            if self.handles.pop(h, None) is None:
                raise RequestError(grpc.StatusCode.NOT_FOUND,
                                   f"cannot release unknown handle {h}")


class ExecutorService(pb_grpc.ExecutorServicer):
    """Serves sessions; compiled functions are shared by content hash."""

    def __init__(self, platform: str, max_message_bytes: int):
        self.platform = platform
        self.max_message_bytes = max_message_bytes
        self._lock = threading.Lock()
        self._compiled: weakref.WeakValueDictionary[str, Executable] = weakref.WeakValueDictionary()
        self._sessions: set[ClientSession] = set()
        self._numbers = itertools.count(1)
        self._counts = dict(executes=0, fetches=0, puts=0, sessions_total=0)

    # -- the stream ----------------------------------------------------------
    def Session(self, requests: Iterator[pb.Request], context) -> Iterator[pb.Reply]:
        session = ClientSession(next(self._numbers), context.peer())
        with self._lock:
            full = len(self._sessions) >= MAX_SESSIONS
            if not full:
                self._sessions.add(session)
                self._counts["sessions_total"] += 1
        if full:  # keep threads for health checks and the sessions already open
            log.warning("%s refused: %d sessions are open", session, MAX_SESSIONS)
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"the executor serves at most {MAX_SESSIONS} sessions at once")
        log.info("%s opened", session)
        try:
            for request in requests:
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
            with self._lock:
                self._sessions.discard(session)
            log.info("%s closed: %d handles freed", session, len(session.handles))
            session.handles.clear()

    def _log_broken_stream(self, session: ClientSession) -> None:
        # gRPC does not tell which; an oversized message got RESOURCE_EXHAUSTED.
        log.warning("%s: stream ended by gRPC: the client disconnected, or sent a message "
                    "over the %d MiB limit (RESOURCE_EXHAUSTED)", session,
                    self.max_message_bytes >> 20)

    def _handle(self, session: ClientSession, request: pb.Request) -> pb.Reply | None:
        kind = request.WhichOneof("kind")
        if kind is None:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "empty request: set one of "
                               "load, put, execute, fetch")
        reply = getattr(self, "_" + kind)(session, request)
        session.release(request.release)
        return reply

    def _load(self, session: ClientSession, request: pb.Request) -> pb.Reply:
        blob = request.load.exported
        key = hashlib.sha256(blob).hexdigest()
        with self._lock:
            executable = self._compiled.get(key)
        if executable is None:
            executable = Executable(key, blob, self.platform)
            with self._lock:
                self._compiled[key] = executable
        session.executables[key] = executable
        return pb.Reply(id=request.id, loaded=pb.Loaded(executable=key))

    def _put(self, session: ClientSession, request: pb.Request) -> None:
        session.store(request.put.handle, jax.device_put(_array(request.put.tensor, "Put")))
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
        args = [self._argument(session, arg, aval, i)
                for i, (arg, aval) in enumerate(zip(call.args, executable.in_avals))]
        for handle, value in zip(call.results, executable.run(*args)):
            session.store(handle, value)
        self._count("executes")

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
        tensor = to_tensor(session.array(request.fetch.handle))  # waits until computed
        self._count("fetches")
        return pb.Reply(id=request.id, tensor=tensor)

    def _count(self, name: str) -> None:
        with self._lock:
            self._counts[name] += 1

    # -- counters ------------------------------------------------------------
    def Status(self, request: pb.StatusRequest, context) -> pb.ServerStatus:
        with self._lock:
            return pb.ServerStatus(platform=self.platform, sessions=len(self._sessions),
                                   handles=sum(len(s.handles) for s in self._sessions),
                                   executables=len(self._compiled), **self._counts)


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
                 tls: tuple[bytes, bytes] | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_MB << 20,
                 allow_non_loopback: bool = False) -> tuple[grpc.Server, int]:
    """Start the executor service; returns the server and the port it bound.

    Args:
        host: address to bind; loopback unless `allow_non_loopback`.
        port: 0 picks a free port.
        token: if given, Executor calls must send it as a bearer token.
        tls: (private key PEM, certificate chain PEM) to serve TLS.
        max_message_bytes: largest request or reply; larger ones end the
            session with RESOURCE_EXHAUSTED.

    Example:
        >>> server, port = start_server(port=0)     # doctest: +SKIP
        >>> server.stop(None)                       # doctest: +SKIP
    """
    if not is_loopback(host) and not allow_non_loopback:
        raise ValueError(f"refusing to serve on {host}: it is not a loopback address, and the "
                         "service runs any graph a client sends. Pass --allow-non-loopback "
                         "(with --token-file and TLS) to serve on the network.")
    options = [("grpc.max_receive_message_length", max_message_bytes),
               ("grpc.max_send_message_length", max_message_bytes),
               # Clients ping to notice a dead server; let them.
               ("grpc.keepalive_permit_without_calls", 1),
               ("grpc.http2.min_recv_ping_interval_without_data_ms", 1000),
               ("grpc.http2.max_ping_strikes", 0)]
    server = grpc.server(futures.ThreadPoolExecutor(MAX_SESSIONS + _SPARE_THREADS,
                                                    thread_name_prefix="terra-serve"),
                         interceptors=[TokenCheck(token)] if token else [],
                         options=options,
                         maximum_concurrent_rpcs=MAX_SESSIONS + _SPARE_THREADS)
    service = ExecutorService(jax.export.default_export_platform(), max_message_bytes)
    pb_grpc.add_ExecutorServicer_to_server(service, server)
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


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m terra serve`: run the executor service until interrupted."""
    parser = argparse.ArgumentParser(prog="python -m terra serve",
                                     description="Run Terra's graph executor service.")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback)")
    parser.add_argument("--port", type=int, default=0, help="port (default: a free one, printed)")
    parser.add_argument("--token-file", help="file holding the token clients must present")
    parser.add_argument("--tls-cert", help="PEM certificate chain: serve TLS (with --tls-key)")
    parser.add_argument("--tls-key", help="PEM private key of --tls-cert")
    parser.add_argument("--max-message-mb", type=int, default=DEFAULT_MAX_MESSAGE_MB,
                        help=f"largest request or reply in MiB (default {DEFAULT_MAX_MESSAGE_MB})")
    parser.add_argument("--allow-non-loopback", action="store_true",
                        help="allow --host to be a non-loopback address")
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
        server, port = start_server(ns.host, ns.port, token=token, tls=tls,
                                    max_message_bytes=ns.max_message_mb << 20,
                                    allow_non_loopback=ns.allow_non_loopback)
    except (ValueError, OSError) as err:
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
