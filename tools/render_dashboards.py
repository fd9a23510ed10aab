#!/usr/bin/env python3
"""Render every Grafana dashboard of the chart to a PNG from a live Prometheus, with matplotlib.

    python tools/render_dashboards.py --prometheus http://127.0.0.1:9090 --minutes 10 --out /tmp/dash

Not Grafana: a faithful-enough picture to check that each panel's PromQL returns the data it should. Each
panel sits where its gridPos puts it; time series are drawn as lines (range queries), stat panels show the
last value. Dashboard variables are substituted: `$namespace`/`$llmservice` -> `.*` (all), the SLO variables
-> their defaults (or --var name=value), `$__rate_interval` -> --rate-interval (default 1m).
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DASHBOARDS = REPO / "charts" / "baton" / "dashboards"


def default_variables(model: dict) -> dict[str, str]:
    out = {}
    for v in (model.get("templating") or {}).get("list", []):
        if v.get("type") in ("query",):
            out[v["name"]] = ".*"
        elif v.get("type") in ("custom", "textbox", "constant"):
            current = (v.get("current") or {}).get("value") or v.get("query") or ""
            out[v["name"]] = current if isinstance(current, str) else current[0]
    return out


def substitute(expr: str, variables: dict[str, str], rate_interval: str = "1m") -> str:
    expr = expr.replace("$__rate_interval", rate_interval)
    for name in sorted(variables, key=len, reverse=True):
        expr = re.sub(r"\$\{?" + re.escape(name) + r"\}?", variables[name], expr)
    if "$" in expr:
        raise ValueError(f"unresolved variable in {expr!r}")
    return expr


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as r:
        body = json.loads(r.read())
    if body.get("status") != "success":
        raise RuntimeError(f"prometheus: {body}")
    return body["data"]


def query_range(prom: str, expr: str, start: float, end: float, step: float) -> list[dict]:
    qs = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
    return _get(f"{prom}/api/v1/query_range?{qs}")["result"]


def legend(fmt: str, labels: dict) -> str:
    if not fmt or fmt == "__auto":
        return ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "value"
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt)


def render(model: dict, prom: str, start: float, end: float, out: Path, variables: dict[str, str],
           rate_interval: str = "1m") -> tuple[Path, dict[str, int]]:
    """Draw one dashboard; returns the PNG path and {panel title: number of series with data}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = model["panels"]
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    fig = plt.figure(figsize=(24, rows * 0.55 + 1), dpi=80)
    fig.suptitle(model["title"], fontsize=16, y=0.999)
    step = max(1.0, (end - start) / 200)
    counts: dict[str, int] = {}
    for p in panels:
        g = p["gridPos"]
        ax = fig.add_axes((g["x"] / 24 + 0.03, 1 - (g["y"] + g["h"]) / (rows + 1.5) - 0.01,
                           g["w"] / 24 - 0.045, g["h"] / (rows + 1.5) - 0.035))
        ax.set_title(p["title"], fontsize=10, loc="left")
        unit = (p.get("fieldConfig") or {}).get("defaults", {}).get("unit", "")
        n = 0
        lines = []
        for t in p.get("targets", []):
            expr = substitute(t["expr"], variables, rate_interval)
            for series in query_range(prom, expr, start, end, step):
                xs = [float(ts) - end for ts, _ in series["values"]]
                ys = [float(v) for _, v in series["values"]]
                if not any(math.isfinite(y) for y in ys):
                    continue
                n += 1
                lines.append((legend(t.get("legendFormat", ""), series["metric"]), xs, ys))
        counts[p["title"]] = n
        if p["type"] == "stat":
            ax.set_axis_off()
            text = "\n".join(f"{name}: {_fmt(ys[-1], unit)}" for name, _, ys in lines[:4]) or "No data"
            ax.text(0.5, 0.45, text, ha="center", va="center", fontsize=16 if len(lines) <= 1 else 11,
                    transform=ax.transAxes, color="black" if lines else "red")
            continue
        for name, xs, ys in lines[:12]:
            ax.plot(xs, ys, label=name, linewidth=1.2)
        if not lines:
            ax.text(0.5, 0.5, "No data", ha="center", va="center", color="red", transform=ax.transAxes)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("seconds before end", fontsize=7)
        if unit:
            ax.set_ylabel(unit, fontsize=7)
        if lines:
            ax.legend(fontsize=6, loc="upper left")
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{model['uid']}.png"
    fig.savefig(path)
    plt.close(fig)
    return path, counts


def _fmt(value: float, unit: str) -> str:
    if not math.isfinite(value):
        return "NaN"
    if unit == "percentunit":
        return f"{value * 100:.1f}%"
    if unit == "s":
        return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"
    return f"{value:.3g}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prometheus", required=True, help="base URL, e.g. http://127.0.0.1:9090")
    parser.add_argument("--minutes", type=float, default=10.0, help="time range ending now")
    parser.add_argument("--out", type=Path, default=Path("dashboard-png"))
    parser.add_argument("--rate-interval", default="1m")
    parser.add_argument("--var", action="append", default=[], metavar="NAME=VALUE")
    args = parser.parse_args(argv)
    end = time.time()
    start = end - args.minutes * 60
    for path in sorted(DASHBOARDS.glob("*.json")):
        model = json.loads(path.read_text())
        variables = default_variables(model) | dict(v.split("=", 1) for v in args.var)
        png, counts = render(model, args.prometheus, start, end, args.out, variables, args.rate_interval)
        empty = [t for t, n in counts.items() if not n]
        print(f"{png}: {len(counts)} panels, {len(empty)} without data{': ' + ', '.join(empty) if empty else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
