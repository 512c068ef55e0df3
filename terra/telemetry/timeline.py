"""Timeline export: events as Chrome trace event JSON (Perfetto, chrome://tracing).

The file is written while the program runs, in the JSON Array Format, one
event per line: memory stays flat on long runs, and a process killed before
`close()` leaves a file Perfetto still opens (the format allows the missing `]`).

Lanes (threads in the viewer): the Python runner, the executor (segment
dispatch), the device (segments computing) and the compiler. Flow arrows link
each fetch to the segment that produced its value; counters show segments in
flight and placeholders held by the running step.
"""
from __future__ import annotations

import collections
import json
import os
import sys
import threading
from typing import IO

from terra.telemetry.events import (
    COMPILE, COUNTER, DEVICE, DISPATCH, EXECUTOR, FETCH, PYTHON, SEGMENT, STEP, Event,
)
from terra.telemetry.events import COMPILER as COMPILER_LANE

_LANE_TIDS = {EXECUTOR: 2, DEVICE: 3, COMPILER_LANE: 4}
_LANE_NAMES = {1: "python (step runner)", 2: "executor (segment dispatch)",
               3: "device (segments computing)", 4: "compiler"}
_INSTANT_SCOPE = {"gave_up": "p", "internal_error": "p"}  # shown across all lanes
_REMEMBERED = 4096  # segments kept to draw flows to fetches that come later
_ENCODE = json.JSONEncoder(separators=(",", ":"), check_circular=False, default=str).encode


class ChromeTraceSink:
    """A sink that streams events into a Chrome trace JSON file."""

    def __init__(self, path: str, origin_ns: int):
        self.path = path
        self._origin_ns = origin_ns
        self._pid = os.getpid()
        self._file: IO[str] = open(path, "w", encoding="utf-8")
        self._first = True
        self._python_tids: dict[int, int] = {threading.main_thread().ident: 1}
        self._segment_end: collections.OrderedDict = collections.OrderedDict()  # flow id -> ts
        self._waiting_fetch: collections.OrderedDict = collections.OrderedDict()  # flow id -> [ts]
        self._flows = 0
        self._file.write("[\n")
        name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"
        self._write([{"ph": "M", "name": "process_name", "pid": self._pid,
                      "args": {"name": f"terra: {name}"}}]
                    + [m for tid, lane in _LANE_NAMES.items() for m in self._thread_meta(tid, lane)])

    def _thread_meta(self, tid: int, name: str) -> list[dict]:
        return [{"ph": "M", "name": "thread_name", "pid": self._pid, "tid": tid,
                 "args": {"name": name}},
                {"ph": "M", "name": "thread_sort_index", "pid": self._pid, "tid": tid,
                 "args": {"sort_index": tid}}]

    def _us(self, ns: int) -> float:
        return round((ns - self._origin_ns) / 1000, 3)

    def _tid(self, ev: Event, out: list) -> int:
        lane = ev.lane
        if lane != PYTHON:
            return _LANE_TIDS[lane]
        tid = self._python_tids.get(ev.thread)
        if tid is None:  # another Python thread runs steps: its own lane
            tid = self._python_tids[ev.thread] = 10 + len(self._python_tids)
            out.extend(self._thread_meta(tid, f"python (thread {ev.thread})"))
        return tid

    # -- one event -> Chrome trace events ------------------------------------
    def _convert(self, ev: Event, out: list) -> None:
        data = dict(ev.data or {})
        if ev.kind == COUNTER:
            for name, value in data.items():
                out.append({"ph": "C", "name": name, "pid": self._pid, "ts": self._us(ev.start_ns),
                            "args": {name: value}})
            return
        tid = self._tid(ev, out)
        data["step"] = ev.step
        base = {"name": _title(ev), "cat": ev.kind, "pid": self._pid, "tid": tid,
                "ts": self._us(ev.start_ns), "args": data}
        if ev.dur_ns or ev.kind in (STEP, FETCH, DISPATCH, SEGMENT, COMPILE):
            out.append({**base, "ph": "X", "dur": round(ev.dur_ns / 1000, 3)})
        else:
            out.append({**base, "ph": "i", "s": _INSTANT_SCOPE.get(ev.kind, "t")})
        flow = data.get("flow")
        if ev.kind == SEGMENT:
            # Flow starts bind to the enclosing slice: put them at the slice's end.
            seg_ts = max(base["ts"], round(self._us(ev.start_ns + ev.dur_ns) - 0.001, 3))
            self._remember(self._segment_end, flow, seg_ts)
            for fetch in self._waiting_fetch.pop(flow, ()):
                self._flow(out, flow, min(seg_ts, fetch[0]), fetch, tid)
        elif ev.kind == FETCH and flow is not None:
            fetch_end = self._us(ev.start_ns + ev.dur_ns)
            seg_ts = self._segment_end.get(flow)
            if seg_ts is None:  # the segment's completion is reported later
                self._waiting_fetch.setdefault(flow, []).append((fetch_end, tid))
                self._trim(self._waiting_fetch)
            else:
                self._flow(out, flow, min(seg_ts, fetch_end), (fetch_end, tid), _LANE_TIDS[DEVICE])

    def _flow(self, out: list, segment: int, seg_ts: float, fetch: tuple, seg_tid: int) -> None:
        fetch_ts, fetch_tid = fetch
        self._flows += 1
        common = {"name": "value", "cat": "flow", "pid": self._pid, "id": self._flows}
        out.append({**common, "ph": "s", "tid": seg_tid, "ts": seg_ts, "args": {"segment": segment}})
        out.append({**common, "ph": "f", "bp": "e", "tid": fetch_tid, "ts": fetch_ts})

    def _remember(self, table: collections.OrderedDict, key, value) -> None:
        table[key] = value
        self._trim(table)

    @staticmethod
    def _trim(table: collections.OrderedDict) -> None:
        while len(table) > _REMEMBERED:
            table.popitem(last=False)

    # -- Sink --------------------------------------------------------------------
    def consume(self, events: list[Event]) -> None:
        out: list = []
        for ev in events:
            self._convert(ev, out)
        self._write(out)

    def _write(self, records: list[dict]) -> None:
        if not records:
            return
        text = ",\n".join(map(_ENCODE, records))
        self._file.write(text if self._first else ",\n" + text)
        self._first = False
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.write("\n]\n")
            self._file.close()


def _title(ev: Event) -> str:
    data = ev.data or {}
    if ev.kind == STEP:
        return f"{ev.fn} #{ev.step} ({data.get('phase', '?')})"
    if ev.kind == FETCH:
        what = data.get("name") or data.get("op", "value")
        return f"fetch {what}" + (" (waited)" if data.get("wait_us", 0) > 0 else "")
    if ev.kind in (DISPATCH, SEGMENT):
        return f"{ev.fn} segment {data.get('segment', '?')}"
    if ev.kind == COMPILE:
        return f"compile {ev.fn} (v{data.get('version', '?')})"
    if "op" in data:
        return f"{ev.kind} {data['op']}"
    return ev.kind
