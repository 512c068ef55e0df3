"""Render a Terra timeline (Chrome trace JSON) as a PNG, for docs and reports.

    python docs/render_timeline.py TRACE.json OUT.png [--steps 3]

Top: the whole run, one bar per step coloured by phase, compiles below.
Bottom: the last few co-executed steps zoomed in, one row per lane (Python,
executor, device, compiler), fetches that waited in red, arrows from each
segment to the fetch it served. For interactive use open the JSON in
https://ui.perfetto.dev instead.
"""
import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PHASE_COLORS = {"tracing": "#f2a541", "coexec": "#3a7ca5", "fallback": "#d1495b",
                "eager": "#999999", "passthrough": "#999999"}
KIND_COLORS = {"dispatch": "#81c3d7", "segment": "#2f6690", "compile": "#8d6a9f",
               "record": "#f2c57c", "fetch": "#6a994e"}


def load(path: str) -> tuple[list, dict]:
    events = json.load(open(path))
    lanes = {e["tid"]: e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
    return events, lanes


def render(path: str, out: str, zoom_steps: int) -> None:
    events, lanes = load(path)
    slices = [e for e in events if e.get("ph") == "X"]
    steps = sorted((e for e in slices if e["cat"] == "step"), key=lambda e: e["ts"])
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(13, 6.5),
                                      gridspec_kw={"height_ratios": [1, 2.2]})
    t0 = steps[0]["ts"] if steps else 0.0

    # Overview: steps by phase, compiles.
    for e in steps:
        top.barh(1, e["dur"] / 1e3, left=(e["ts"] - t0) / 1e3, height=0.6,
                 color=PHASE_COLORS.get(e["args"].get("phase"), "#999"))
    for e in slices:
        if e["cat"] == "compile":
            top.barh(0, e["dur"] / 1e3, left=(e["ts"] - t0) / 1e3, height=0.6,
                     color=KIND_COLORS["compile"])
    top.set_yticks([0, 1], ["compiler", "steps"])
    top.set_xlabel("ms since the first step")
    top.set_title("whole run: steps by phase (orange tracing, blue co-executed, red fell back), "
                  "background compiles", fontsize=10)

    # Zoom: the last co-executed steps, every lane.
    coexec = [e for e in steps if e["args"].get("phase") == "coexec"][-zoom_steps:]
    if coexec:
        lo, hi = coexec[0]["ts"], coexec[-1]["ts"] + coexec[-1]["dur"]
        rows = {tid: i for i, tid in enumerate(sorted(lanes, reverse=True))}
        for e in slices:
            if e["ts"] + e["dur"] < lo or e["ts"] > hi or e["tid"] not in rows:
                continue
            is_step = e["cat"] == "step"
            color = (PHASE_COLORS.get(e["args"].get("phase"), "#999") if is_step
                     else "#d1495b" if e["cat"] == "fetch" and e["args"].get("wait_us", 0) > 0
                     else KIND_COLORS.get(e["cat"], "#bbbbbb"))
            width = max(e["dur"] / 1e3, 0.002 * (hi - lo) / 1e3)  # short slices stay visible
            bottom.barh(rows[e["tid"]], width, left=(e["ts"] - lo) / 1e3,
                        height=0.8 if is_step else 0.4, color=color,
                        alpha=0.3 if is_step else 1.0, zorder=1 if is_step else 2)
        flows = {}
        for e in events:
            if e.get("ph") in ("s", "f") and lo <= e["ts"] <= hi:
                flows.setdefault(e["id"], {})[e["ph"]] = e
        for pair in flows.values():
            if "s" in pair and "f" in pair and pair["s"]["tid"] in rows and pair["f"]["tid"] in rows:
                s, f = pair["s"], pair["f"]
                bottom.annotate("", xy=((f["ts"] - lo) / 1e3, rows[f["tid"]]),
                                xytext=((s["ts"] - lo) / 1e3, rows[s["tid"]]),
                                arrowprops={"arrowstyle": "->", "color": "#333", "lw": 0.8})
        bottom.set_yticks(list(rows.values()), [lanes[t] for t in rows])
        bottom.set_xlabel("ms")
        bottom.set_title(f"last {len(coexec)} co-executed steps (pale bars): fetches (green; red "
                         "= waited for the graph), segment dispatch, device;\n"
                         "arrows link each segment to the fetch it served", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace")
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=3, help="co-executed steps in the zoom")
    ns = parser.parse_args()
    render(ns.trace, ns.out, ns.steps)


if __name__ == "__main__":
    main()
