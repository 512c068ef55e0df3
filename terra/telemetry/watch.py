"""`python -m terra watch HOST:PORT`: a live terminal dashboard of a running program.

Subscribes to the program's event stream (TERRA_TELEMETRY) and shows, per step
function: step latency p50/p90/p99, the split of a step between Python running,
the graph computing and Python waiting for it, sync points per step,
divergences and compiles. `Dashboard` is the pure part (events in, text out).
"""
from __future__ import annotations

import argparse
import collections
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from terra import config

_WINDOW = 1000  # steps the percentiles and splits are taken over


@dataclass
class _Function:
    phases: collections.Counter = field(default_factory=collections.Counter)
    latency_us: collections.deque = field(default_factory=lambda: collections.deque(maxlen=_WINDOW))
    wait_us: collections.deque = field(default_factory=lambda: collections.deque(maxlen=_WINDOW))
    syncs: collections.deque = field(default_factory=lambda: collections.deque(maxlen=_WINDOW))
    graph_us: collections.OrderedDict = field(default_factory=collections.OrderedDict)  # step -> us
    divergences: int = 0
    compiles: int = 0
    compile_s: float = 0.0


class Dashboard:
    """Aggregates stream events (telemetry_pb2.Event) and renders them as a table."""

    def __init__(self, address: str):
        self.address = address
        self.functions: dict[str, _Function] = {}
        self.events = 0
        self.dropped = 0
        self.in_flight = 0.0
        self._lock = threading.Lock()

    def add(self, ev) -> None:
        with self._lock:
            self.events += 1
            self.dropped = max(self.dropped, ev.dropped)
            if ev.kind == "counter":
                self.in_flight = ev.values.get("segments in flight", self.in_flight)
                return
            if not ev.function:
                return
            f = self.functions.setdefault(ev.function, _Function())
            if ev.kind == "step":
                f.phases[ev.labels.get("phase", "?")] += 1
                f.latency_us.append(ev.duration_us)
                f.wait_us.append(ev.values.get("wait_us", 0.0))
                f.syncs.append(ev.values.get("syncs", 0.0))
            elif ev.kind == "segment":
                f.graph_us[ev.step] = f.graph_us.get(ev.step, 0.0) + ev.duration_us
                while len(f.graph_us) > _WINDOW:
                    f.graph_us.popitem(last=False)
            elif ev.kind == "divergence":
                f.divergences += 1
            elif ev.kind == "compile":
                f.compiles += 1
                f.compile_s += ev.duration_us / 1e6

    def render(self) -> str:
        with self._lock:
            head = (f"terra watch {self.address}  {time.strftime('%H:%M:%S')}  "
                    f"{self.events} events ({self.dropped} dropped), "
                    f"{self.in_flight:.0f} segments in flight")
            cols = ("function", "steps", "trace/coex/fall", "p50 ms", "p90 ms", "p99 ms",
                    "python ms", "graph ms", "wait ms", "syncs/step", "diverge", "compiles")
            rows = [cols]
            for name, f in sorted(self.functions.items()):
                rows.append(self._row(name, f))
        widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
        table = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
                 for r in rows]
        if len(rows) == 1:
            table.append("(no steps yet)")
        note = ("python = step time Python was running, wait = Python blocked on the graph "
                "(sync points), graph = device time of the step's segments; means over the "
                f"last {_WINDOW} steps")
        return "\n".join([head, "", *table, "", note])

    @staticmethod
    def _row(name: str, f: _Function) -> tuple:
        lat = np.asarray(f.latency_us) / 1000
        p50, p90, p99 = (np.percentile(lat, q) for q in (50, 90, 99)) if lat.size else (0, 0, 0)
        wait = float(np.mean(f.wait_us)) / 1000 if f.wait_us else 0.0
        step = float(lat.mean()) if lat.size else 0.0
        graph = float(np.mean(list(f.graph_us.values()))) / 1000 if f.graph_us else 0.0
        syncs = float(np.mean(f.syncs)) if f.syncs else 0.0
        phases = f"{f.phases['tracing']}/{f.phases['coexec']}/{f.phases['fallback']}"
        return (name, str(sum(f.phases.values())), phases, f"{p50:.2f}", f"{p90:.2f}",
                f"{p99:.2f}", f"{step - wait:.2f}", f"{graph:.2f}", f"{wait:.2f}",
                f"{syncs:.2f}", str(f.divergences), f"{f.compiles} ({f.compile_s:.1f} s)")


def main(argv: Sequence[str] | None = None) -> int:
    from terra.telemetry.stream import Subscription

    parser = argparse.ArgumentParser(prog="python -m terra watch",
                                     description="Live dashboard of a program run with "
                                                 "TERRA_TELEMETRY=HOST:PORT.")
    parser.add_argument("address", help="HOST:PORT (or PORT on loopback) of the program")
    parser.add_argument("--function", default="", help="only this step function")
    parser.add_argument("--interval", type=config.positive(float), default=0.5,
                        help="seconds between refreshes")
    parser.add_argument("--duration", type=config.positive(float), default=None,
                        help="stop after this many seconds (default: until the program ends)")
    ns = parser.parse_args(argv)

    board = Dashboard(ns.address)
    try:
        events = Subscription(ns.address, ns.function)
    except (ConnectionError, ValueError) as err:
        print(err, file=sys.stderr)
        return 2
    ended = threading.Event()
    failure: list[BaseException] = []

    def pump() -> None:
        try:
            for ev in events:
                board.add(ev)
        except Exception as err:  # reported by the main thread
            failure.append(err)
        finally:
            ended.set()

    threading.Thread(target=pump, name="terra-watch", daemon=True).start()
    clear = "\x1b[H\x1b[2J" if sys.stdout.isatty() else ""
    deadline = None if ns.duration is None else time.monotonic() + ns.duration
    try:
        while True:
            ended.wait(ns.interval)
            sys.stdout.write(clear + board.render() + "\n\n")
            sys.stdout.flush()
            if ended.is_set():
                print("(the program's stream ended)")
                break
            if deadline is not None and time.monotonic() >= deadline:
                break
    except KeyboardInterrupt:
        pass
    finally:
        events.close()
    if failure:
        print(f"terra watch: {failure[0]}", file=sys.stderr)
        return 1
    return 0
