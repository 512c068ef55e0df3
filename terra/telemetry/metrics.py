"""A Prometheus endpoint: Terra's counters and latencies for Grafana & co.

`PrometheusSink` turns events into `prometheus_client` metrics, labelled by
step function, and serves them over HTTP (`TERRA_PROMETHEUS=[host:]port`,
loopback unless a host is given; port 0 picks one). It runs on the telemetry
drain thread: the step never waits for it.

    terra_steps_total{function,phase}          calls by phase (tracing, coexec, fallback, eager)
    terra_step_seconds{function,phase}         step latency histogram
    terra_step_wait_seconds{function}          per step, time Python waited for the graph
    terra_fetches_total{function}              values Python asked for
    terra_sync_points_total{function}          ... that had to wait (the graph had not computed them)
    terra_fetch_wait_seconds{function}         histogram of those waits
    terra_divergences_total{function,cause}    steps that left the graph's path (branch, shape, ...)
    terra_fallbacks_total{function}            steps finished eagerly after a divergence
    terra_compiles_total{function}             graphs generated and compiled
    terra_compile_seconds{function}            compile time histogram
    terra_internal_errors_total{function}      Terra failures that fell back to eager
    terra_stays_eager{function}                1 once the function gave up co-executing
    terra_segments_in_flight                   segments dispatched and not computed yet
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from terra.telemetry.events import (
    COMPILE, COUNTER, DIVERGENCE, FETCH, GAVE_UP, INTERNAL_ERROR, STEP, Event,
)

# Step latencies from a sub-millisecond co-executed step to a slow tracing one.
_STEP_BUCKETS = (.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 10)
_WAIT_BUCKETS = (.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, 1)
_COMPILE_BUCKETS = (.1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120)


class PrometheusSink:
    """A sink that keeps Prometheus metrics and serves them at `address` (HOST:PORT)."""

    def __init__(self, host: str, port: int):
        self.registry = r = CollectorRegistry()
        fn = ("function",)
        self.steps = Counter("terra_steps", "Step function calls, by phase", fn + ("phase",),
                             registry=r)
        self.step_seconds = Histogram("terra_step_seconds", "Step latency, by phase",
                                      fn + ("phase",), buckets=_STEP_BUCKETS, registry=r)
        self.step_wait = Histogram("terra_step_wait_seconds",
                                   "Per step, time Python waited for the graph", fn,
                                   buckets=_WAIT_BUCKETS, registry=r)
        self.fetches = Counter("terra_fetches", "Values Python asked for", fn, registry=r)
        self.sync_points = Counter("terra_sync_points",
                                   "Fetches that waited for the graph", fn, registry=r)
        self.fetch_wait = Histogram("terra_fetch_wait_seconds", "How long a waiting fetch waited",
                                    fn, buckets=_WAIT_BUCKETS, registry=r)
        self.divergences = Counter("terra_divergences", "Steps that left the graph's path",
                                   fn + ("cause",), registry=r)
        self.fallbacks = Counter("terra_fallbacks", "Steps finished eagerly after a divergence",
                                 fn, registry=r)
        self.compiles = Counter("terra_compiles", "Graphs generated and compiled", fn, registry=r)
        self.compile_seconds = Histogram("terra_compile_seconds", "Compile time", fn,
                                         buckets=_COMPILE_BUCKETS, registry=r)
        self.internal_errors = Counter("terra_internal_errors",
                                       "Terra failures that fell back to eager", fn, registry=r)
        self.stays_eager = Gauge("terra_stays_eager", "1 once the function gave up co-executing",
                                 fn, registry=r)
        self.in_flight = Gauge("terra_segments_in_flight",
                               "Segments dispatched whose outputs are not computed yet", registry=r)
        self._server, _ = start_http_server(port, addr=host, registry=r)
        self.address = f"{host}:{self._server.server_port}"

    def consume(self, events: list[Event]) -> None:
        for ev in events:
            handler = _HANDLERS.get(ev.kind)
            if handler is not None:
                handler(self, ev, ev.data or {})

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    # -- one event kind each -------------------------------------------------------
    def _step(self, ev: Event, data: dict) -> None:
        phase = data.get("phase", "?")
        self.steps.labels(ev.fn, phase).inc()
        self.step_seconds.labels(ev.fn, phase).observe(ev.dur_ns / 1e9)
        if phase == "fallback":
            self.fallbacks.labels(ev.fn).inc()
        if phase in ("coexec", "fallback"):
            self.step_wait.labels(ev.fn).observe(data.get("wait_us", 0.0) / 1e6)

    def _fetch(self, ev: Event, data: dict) -> None:
        self.fetches.labels(ev.fn).inc()
        wait = data.get("wait_us", 0.0)
        if wait > 0:
            self.sync_points.labels(ev.fn).inc()
            self.fetch_wait.labels(ev.fn).observe(wait / 1e6)

    def _divergence(self, ev: Event, data: dict) -> None:
        self.divergences.labels(ev.fn, data.get("cause", "?")).inc()

    def _compile(self, ev: Event, data: dict) -> None:
        self.compiles.labels(ev.fn).inc()
        self.compile_seconds.labels(ev.fn).observe(ev.dur_ns / 1e9)

    def _internal_error(self, ev: Event, data: dict) -> None:
        self.internal_errors.labels(ev.fn).inc()

    def _gave_up(self, ev: Event, data: dict) -> None:
        self.stays_eager.labels(ev.fn).set(1)

    def _counter(self, ev: Event, data: dict) -> None:
        if "segments in flight" in data:
            self.in_flight.set(data["segments in flight"])


_HANDLERS = {STEP: PrometheusSink._step, FETCH: PrometheusSink._fetch,
             DIVERGENCE: PrometheusSink._divergence, COMPILE: PrometheusSink._compile,
             INTERNAL_ERROR: PrometheusSink._internal_error, GAVE_UP: PrometheusSink._gave_up,
             COUNTER: PrometheusSink._counter}
