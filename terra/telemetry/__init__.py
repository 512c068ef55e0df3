"""Telemetry: counters, timed events, timelines, the live stream and explain.

Counters (`Stats`) are always kept. Events are collected only while telemetry
is on, switched on by the environment when `terra` is imported:

- `TERRA_TRACE=path.json`: write a Chrome trace timeline (open in Perfetto).
- `TERRA_EXPLAIN=1`: print the explain report of every step function at exit.
- `TERRA_TELEMETRY=[host:]port`: serve the live event stream (loopback by
  default) for `python -m terra watch host:port`.
- `TERRA_PROMETHEUS=[host:]port`: serve Prometheus metrics (`metrics.py`).

While a `jax.profiler` trace is captured, steps, fetches, dispatches,
divergences and compiles are also profiler annotations (`profiler.py`).

or from code: `enable(...)`, the `timeline(path)` context manager, and
`terra.explain(step_fn)`.

Pipeline: the runtime emits `events.Event`s into `events.recorder`; its drain
thread hands them to the sinks: `timeline.ChromeTraceSink`,
`explain.ExplainSink`, `stream.StreamSink`, `metrics.PrometheusSink`.
"""
from __future__ import annotations

import atexit
import contextlib
import sys
import threading
from typing import Iterator

from terra import config
from terra.telemetry import events, hybrid
from terra.telemetry.events import Recorder
from terra.telemetry.explain import ExplainSink, render
from terra.telemetry.stats import Stats
from terra.telemetry.timeline import ChromeTraceSink

__all__ = ["Stats", "enable", "disable", "timeline", "report", "stream_address",
           "prometheus_address"]

_lock = threading.Lock()
_explain: ExplainSink | None = None    # attached whenever events are collected
_explain_at_exit = False
_stream = None                         # the StreamSink, if serving
_prometheus = None                     # the PrometheusSink, if serving


def enable(*, trace: str | None = None, explain_at_exit: bool = False,
           stream: str | None = None, prometheus: str | None = None) -> Recorder:
    """Start collecting events (idempotent); optionally add a sink.

    Args:
        trace: write a Chrome trace timeline to this path (closed at exit).
        explain_at_exit: print the explain report of every step function at exit.
        stream: serve the live event stream at `[host:]port` (loopback by default;
            port 0 picks a free one, see `stream_address()`).
        prometheus: serve Prometheus metrics at `[host:]port` (loopback by default;
            port 0 picks one, see `prometheus_address()`); needs `prometheus_client`
            (`pip install terra-jax[prometheus]`).

    Example:
        >>> import terra.telemetry as tt
        >>> rec = tt.enable()          # events are now aggregated for terra.explain
        >>> tt.disable()
    """
    global _explain, _explain_at_exit, _stream, _prometheus
    with _lock:
        rec = events.recorder
        if rec is None:
            rec = Recorder()
            _explain = ExplainSink()
            rec.add_sink(_explain)
            events.set_recorder(rec)
            atexit.register(_at_exit)
        if trace:
            rec.add_sink(ChromeTraceSink(trace, rec.origin_ns))
        if stream is not None and _stream is None:
            from terra.telemetry.stream import StreamSink, parse_address
            host, port = parse_address(stream)
            _stream = StreamSink(host, port, rec.origin_ns)
            rec.add_sink(_stream)
            print(f"terra: telemetry stream on {_stream.address} "
                  f"(watch it: python -m terra watch {_stream.address})", file=sys.stderr)
        if prometheus is not None and _prometheus is None:
            _prometheus = _prometheus_sink(prometheus)
            rec.add_sink(_prometheus)
            print(f"terra: Prometheus metrics on http://{_prometheus.address}/metrics",
                  file=sys.stderr)
        _explain_at_exit = _explain_at_exit or explain_at_exit
        return rec


def _prometheus_sink(address: str):
    from terra.telemetry.stream import parse_address
    host, port = parse_address(address)
    try:
        from terra.telemetry.metrics import PrometheusSink
    except ImportError as err:
        raise ImportError("terra: TERRA_PROMETHEUS needs prometheus_client "
                          "(pip install 'terra-jax[prometheus]')") from err
    try:
        return PrometheusSink(host, port)
    except OSError as err:
        raise OSError(f"terra: cannot serve Prometheus metrics on {host}:{port} ({err}); "
                      "set TERRA_PROMETHEUS to a free port, or 0 to pick one") from None


def disable() -> None:
    """Stop collecting events; flush and close every sink (timeline files, stream)."""
    global _stream, _prometheus
    with _lock:
        rec = events.recorder
        if rec is None:
            return
        events.set_recorder(None)
        _stream = _prometheus = None
    rec.close()


@contextlib.contextmanager
def timeline(path: str) -> Iterator[str]:
    """Write the events of the enclosed code as a Chrome trace to `path`.

    Example:
        >>> with terra.timeline("out/steps.json"):          # doctest: +SKIP
        ...     for batch in data:
        ...         params, opt_state, loss = train_step(params, opt_state, batch)
        # open out/steps.json in https://ui.perfetto.dev
    """
    started = events.recorder is None
    rec = enable()
    sink = ChromeTraceSink(path, rec.origin_ns)
    rec.add_sink(sink)
    try:
        yield path
    finally:
        rec.remove_sink(sink)
        if started:
            disable()


def report(name: str | None = None, check: bool = False) -> str:
    """The explain report of step function `name` (all of them when None); '' if no events.

    `check`: verify the hybridization verdict by running the step's last call
    eagerly and under jax.jit (and time them): it runs the step again.
    """
    sink = _explain
    if sink is None:
        return ""
    if events.recorder is not None:
        events.recorder.flush()
    names = sorted(sink.functions) if name is None else [name] if name in sink.functions else []
    return "\n\n".join(render(n, sink.aggregate(n), _hybrid_lines(n, sink, check))
                        for n in names)


def _hybrid_lines(name: str, sink: ExplainSink, check: bool) -> list[str]:
    step = hybrid.step_named(name)
    calls = None if step is None else step._calls
    checked, failed = None, []
    if check and calls is not None and calls.last is not None:
        try:
            checked = hybrid.probe(calls)
        except Exception as err:  # the step no longer runs eagerly on its last arguments
            failed = [f"    (not checked under jax.jit: re-running the last call eagerly raised "
                      f"{type(err).__name__}: {err})"]
    graph = None if step is None else step._graph
    return hybrid.render(sink.aggregate(name), calls, checked, graph) + failed


def stream_address() -> str | None:
    """`host:port` of the live event stream, when serving."""
    return None if _stream is None else _stream.address


def prometheus_address() -> str | None:
    """`host:port` of the Prometheus endpoint (`/metrics`), when serving."""
    return None if _prometheus is None else _prometheus.address


def configure_from_env() -> None:
    """Apply TERRA_TRACE / TERRA_EXPLAIN / TERRA_TELEMETRY / TERRA_PROMETHEUS (on `import terra`)."""
    settings = config.current()
    if settings.trace or settings.explain or settings.telemetry or settings.prometheus:
        enable(trace=settings.trace, explain_at_exit=settings.explain, stream=settings.telemetry,
               prometheus=settings.prometheus)


def _at_exit() -> None:
    sink = _explain
    if _explain_at_exit and sink is not None:
        text = report(check=True)
        if text:
            print(text, file=sys.stderr)
    disable()
