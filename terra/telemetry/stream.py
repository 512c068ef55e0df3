"""The live event stream: a gRPC service pushing events to any subscriber.

`StreamSink` is a telemetry sink that copies each batch of events into every
subscriber's bounded queue (a slow subscriber loses its oldest events and is
told how many, the program never waits for it); `subscribe` is the client.
"""
from __future__ import annotations

import collections
import ipaddress
import threading
import time
from concurrent import futures
from typing import Iterator

import grpc

from runtime._proto import telemetry_pb2, telemetry_pb2_grpc
from terra import config
from terra.telemetry.events import Event

_QUEUE = 1 << 14          # events buffered per subscriber
_POLL_S = 0.25            # how often a stream checks that its client is still there
_MAX_SUBSCRIBERS = 8
_DRAIN_S = 1.0            # at close, how long subscribers get to receive the last events


def parse_address(text: str) -> tuple[str, int]:
    """`PORT` or `HOST:PORT` -> (host, port); the host defaults to loopback."""
    return config.parse_address("telemetry address", text)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def to_proto(ev: Event, origin_ns: int, dropped: int = 0) -> telemetry_pb2.Event:
    msg = telemetry_pb2.Event(kind=ev.kind, function=ev.fn, step=ev.step,
                              start_us=(ev.start_ns - origin_ns) / 1000,
                              duration_us=ev.dur_ns / 1000, lane=ev.lane, dropped=dropped)
    for key, value in (ev.data or {}).items():
        if isinstance(value, (bool, int, float)):
            msg.values[key] = float(value)
        elif value is not None:
            msg.labels[key] = str(value)
    return msg


class _DaemonThreads(futures.Executor):
    """Runs each RPC on its own daemon thread.

    Interpreter exit joins non-daemon threads before it runs `atexit` handlers
    (which close the server): with a thread pool's workers, a subscribed
    dashboard would keep the program alive until it disconnected.
    """

    def submit(self, fn, /, *args, **kwargs) -> futures.Future:
        future: futures.Future = futures.Future()

        def run() -> None:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args, **kwargs))
                except BaseException as err:  # handed to gRPC through the future
                    future.set_exception(err)

        threading.Thread(target=run, name="terra-telemetry-rpc", daemon=True).start()
        return future


class _Subscriber:
    def __init__(self, function: str):
        self.function = function
        self.queue: collections.deque = collections.deque(maxlen=_QUEUE)
        self.ready = threading.Condition()
        self.dropped = 0  # the oldest events pushed out of a full queue

    def offer(self, events: list[Event]) -> None:
        with self.ready:
            for ev in events:
                if not self.function or ev.fn in (self.function, ""):
                    self.dropped += len(self.queue) == self.queue.maxlen
                    self.queue.append(ev)
            self.ready.notify()

    def take(self, timeout: float) -> list[Event]:
        with self.ready:
            if not self.queue:
                self.ready.wait(timeout)
            batch = list(self.queue)
            self.queue.clear()
            return batch


class StreamSink(telemetry_pb2_grpc.TelemetryServicer):
    """A sink that serves `Telemetry.Subscribe` on `address` (HOST:PORT, port 0 = any)."""

    def __init__(self, host: str, port: int, origin_ns: int):
        self._origin_ns = origin_ns
        self._subscribers: list[_Subscriber] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._server = grpc.server(_DaemonThreads(), maximum_concurrent_rpcs=_MAX_SUBSCRIBERS)
        telemetry_pb2_grpc.add_TelemetryServicer_to_server(self, self._server)
        bound = self._server.add_insecure_port(f"{host}:{port}")
        if bound == 0:
            raise OSError(f"terra: cannot serve telemetry on {host}:{port} (port in use?); "
                          "set TERRA_TELEMETRY to a free port, or 0 to pick one")
        self.address = f"{host}:{bound}"
        self._server.start()

    # -- Sink --------------------------------------------------------------------
    def consume(self, events: list[Event]) -> None:
        with self._lock:
            subscribers = list(self._subscribers)
        for sub in subscribers:
            sub.offer(events)

    def close(self) -> None:
        """End every stream after its last events (bounded), then stop serving."""
        self._closed.set()
        deadline = time.monotonic() + _DRAIN_S
        while self._subscribers and time.monotonic() < deadline:
            time.sleep(0.02)
        self._server.stop(None).wait(2)

    # -- the service -------------------------------------------------------------
    def Subscribe(self, request, context) -> Iterator[telemetry_pb2.Event]:
        sub = _Subscriber(request.function)
        with self._lock:
            if len(self._subscribers) >= _MAX_SUBSCRIBERS - 1:
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"at most {_MAX_SUBSCRIBERS - 1} subscribers")
            self._subscribers.append(sub)
        try:
            while context.is_active() and not self._closed.is_set():
                for ev in sub.take(_POLL_S):
                    yield to_proto(ev, self._origin_ns, sub.dropped)
            for ev in sub.take(0):  # closed: what the program emitted last, then the end
                yield to_proto(ev, self._origin_ns, sub.dropped)
        finally:
            with self._lock:
                self._subscribers.remove(sub)


class Subscription:
    """The events of the program serving telemetry at `address`, as they happen.

    Connecting is bounded (`ConnectionError` naming the address); iterate to
    receive `telemetry_pb2.Event`s; `close()` (any thread) ends the iteration.

    Example:
        >>> with Subscription("127.0.0.1:7007") as events:   # doctest: +SKIP
        ...     for ev in events:
        ...         print(ev.kind, ev.function, ev.step, ev.duration_us)
    """

    def __init__(self, address: str, function: str = "", connect_timeout_s: float = 5.0):
        host, port = parse_address(address)
        self._channel = grpc.insecure_channel(f"{host}:{port}")
        try:
            grpc.channel_ready_future(self._channel).result(timeout=connect_timeout_s)
        except grpc.FutureTimeoutError:
            self._channel.close()
            raise ConnectionError(f"terra: no telemetry stream at {host}:{port} after "
                                  f"{connect_timeout_s:.0f} s; is the program running with "
                                  f"TERRA_TELEMETRY={host}:{port}?") from None
        stub = telemetry_pb2_grpc.TelemetryStub(self._channel)
        self._call = stub.Subscribe(telemetry_pb2.SubscribeRequest(function=function))

    def __iter__(self) -> Iterator[telemetry_pb2.Event]:
        try:
            yield from self._call
        except grpc.RpcError as err:  # closed by us, or the program exited
            if err.code() not in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE):
                raise

    def close(self) -> None:
        self._call.cancel()
        self._channel.close()

    def __enter__(self) -> "Subscription":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
