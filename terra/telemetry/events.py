"""Timed events: what Terra did, when, in which step, at which line of user code.

The runtime reads the module global `recorder` (None while telemetry is off:
one global read per call site, nothing else) and emits `Event`s to it.
Emitting only appends to a bounded ring buffer; a drain thread hands batches
to the sinks (timeline file, explain report, live stream), so the Python
runner never does their work and a long run never grows memory.
"""
from __future__ import annotations

import collections
import threading
import time
from typing import Any, Callable, NamedTuple, Protocol

# Event kinds. Slices have a duration; the others are instants or counters.
STEP = "step"                      # one call of a step function (data: phase, waits)
RECORD = "record"                  # an op run eagerly and recorded (tracing / fallback)
FEED = "feed"                      # Python values sent into the graph
FETCH = "fetch"                    # Python asked for a value; dur = time it waited
DIVERGENCE = "divergence"          # Python left the graph's path: the step falls back
DISPATCH = "dispatch"              # a segment handed to XLA (the executor)
SEGMENT = "segment"                # a segment computing on the device (until its outputs are ready)
COMPILE = "compile"                # a graph generated and compiled (compile thread)
GAVE_UP = "gave_up"                # retrace limit reached (or internal error): stays eager
INTERNAL_ERROR = "internal_error"  # Terra failed and finished the step eagerly
COUNTER = "counter"                # sampled values (segments in flight, placeholders)

# Lanes, one per runner: the Python thread(s) running steps, the executor
# thread dispatching segments, the device computing them, the compile thread.
PYTHON, EXECUTOR, DEVICE, COMPILER = "python", "executor", "device", "compiler"
LANE_OF = {DISPATCH: EXECUTOR, SEGMENT: DEVICE, COMPILE: COMPILER}  # default: PYTHON


class Event(NamedTuple):
    kind: str
    fn: str            # the step function's name
    step: int          # its step number (1-based); 0 when not tied to a step
    start_ns: int      # time.perf_counter_ns() at the start
    dur_ns: int        # 0 for instants and counters
    thread: int        # threading.get_ident() of the emitting thread
    data: dict | None  # kind-specific details (location, reason, wait, ...)

    @property
    def lane(self) -> str:
        return LANE_OF.get(self.kind, PYTHON)


class Sink(Protocol):
    def consume(self, events: list[Event]) -> None: ...
    def close(self) -> None: ...


class Recorder:
    """Collects events from every thread; a drain thread feeds the sinks.

    Example:
        >>> rec = Recorder()
        >>> rec.instant(GAVE_UP, "step", 3, {"reason": "retrace limit"})
        >>> rec.flush(); rec.close()
    """

    def __init__(self, capacity: int = 1 << 16, interval_s: float = 0.05):
        self.origin_ns = time.perf_counter_ns()   # the timeline's zero
        self._buffer: collections.deque = collections.deque(maxlen=capacity)
        self._sinks: list[Sink] = []
        self._lock = threading.Lock()               # sinks see batches one at a time
        self._interval_s = interval_s
        self._stop = threading.Event()
        self.emitted = 0
        self.delivered = 0
        self._drainer = threading.Thread(target=self._drain_loop, name="terra-telemetry",
                                         daemon=True)
        self._drainer.start()
        self._completions = _CompletionWatcher(self)

    # -- emitting (any thread; cheap) ------------------------------------------
    def emit(self, event: Event) -> None:
        self.emitted += 1
        self._buffer.append(event)  # deque.append is atomic; full -> the oldest is dropped

    def slice(self, kind: str, fn: str, step: int, start_ns: int, data: dict | None = None,
              end_ns: int | None = None) -> None:
        end = time.perf_counter_ns() if end_ns is None else end_ns
        self.emit(Event(kind, fn, step, start_ns, end - start_ns, threading.get_ident(), data))

    def instant(self, kind: str, fn: str, step: int, data: dict | None = None) -> None:
        self.emit(Event(kind, fn, step, time.perf_counter_ns(), 0, threading.get_ident(), data))

    def watch_segment(self, fn: str, step: int, data: dict, dispatched_ns: int,
                      wait_ready: Callable[[], Any]) -> None:
        """Time a dispatched segment until `wait_ready()` returns (its outputs exist)."""
        self._completions.submit(fn, step, data, dispatched_ns, wait_ready)

    def note_ready(self, flow: int, at_ns: int) -> None:
        """A fetch saw segment `flow`'s output ready by `at_ns` (bounds its end)."""
        self._completions.note_ready(flow, at_ns)

    @property
    def segments_in_flight(self) -> int:
        """Segments dispatched whose outputs are not computed yet."""
        return self._completions.in_flight

    # -- sinks -------------------------------------------------------------------
    def add_sink(self, sink: Sink) -> None:
        with self._lock:
            self._sinks.append(sink)

    def remove_sink(self, sink: Sink) -> None:
        self.flush()
        with self._lock:
            if sink in self._sinks:
                self._sinks.remove(sink)
        sink.close()

    def sinks(self) -> list[Sink]:
        with self._lock:
            return list(self._sinks)

    @property
    def dropped(self) -> int:
        """Events lost because the ring buffer overflowed before a drain."""
        return self.emitted - self.delivered - len(self._buffer)

    def flush(self) -> None:
        """Hand everything emitted so far to the sinks."""
        with self._lock:
            batch = []
            pop = self._buffer.popleft
            try:
                while True:
                    batch.append(pop())
            except IndexError:
                pass
            if not batch:
                return
            self.delivered += len(batch)
            for sink in self._sinks:
                sink.consume(batch)

    def _drain_loop(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.flush()

    def close(self) -> None:
        """Stop the threads (bounded wait), deliver what is left, close the sinks."""
        self._completions.close()
        self._stop.set()
        self._drainer.join(timeout=5)
        self.flush()
        with self._lock:
            sinks, self._sinks = self._sinks, []
        for sink in sinks:
            sink.close()


class _CompletionWatcher:
    """Waits, in dispatch order, for each segment's outputs; emits its device slice.

    Segments run in order on the device, so one starts when it was dispatched
    or when the previous one finished, whichever is later.
    """

    def __init__(self, rec: Recorder):
        self._rec = rec
        self._queue: collections.deque = collections.deque()
        self._ready = threading.Condition()
        self._closed = False
        self._last_end_ns = 0
        self._seen_ready: collections.OrderedDict = collections.OrderedDict()  # flow -> ns
        self.in_flight = 0
        self._thread = threading.Thread(target=self._loop, name="terra-device-watch", daemon=True)
        self._thread.start()

    def submit(self, fn, step, data, dispatched_ns, wait_ready) -> None:
        with self._ready:
            self.in_flight += 1
            self._queue.append((fn, step, data, dispatched_ns, wait_ready))
            self._ready.notify()

    def note_ready(self, flow: int, at_ns: int) -> None:
        # The watcher needs the GIL to read the clock after the device finished,
        # so it can be late by a thread switch; a fetch that saw the value earlier
        # gives a tighter bound.
        with self._ready:
            self._seen_ready[flow] = min(at_ns, self._seen_ready.get(flow, at_ns))
            while len(self._seen_ready) > 4096:
                self._seen_ready.popitem(last=False)

    def _loop(self) -> None:
        while True:
            with self._ready:
                while not self._queue and not self._closed:
                    self._ready.wait(0.5)
                if not self._queue:
                    return
                fn, step, data, dispatched_ns, wait_ready = self._queue.popleft()
            try:
                wait_ready()
            except Exception:  # a failed segment is reported by whoever fetches from it
                data = {**data, "failed": True}
            end = time.perf_counter_ns()
            with self._ready:
                self.in_flight -= 1
                end = min(end, self._seen_ready.pop(data.get("flow"), end))
            start = min(max(dispatched_ns, self._last_end_ns), end)
            self._last_end_ns = end
            self._rec.emit(Event(SEGMENT, fn, step, start, end - start, 0, data))

    def close(self) -> None:
        with self._ready:
            self._closed = True
            self._ready.notify()
        self._thread.join(timeout=5)


# The active recorder; None while telemetry is off. Set by `terra.telemetry.enable`.
recorder: Recorder | None = None


def set_recorder(rec: Recorder | None) -> None:
    global recorder
    recorder = rec

