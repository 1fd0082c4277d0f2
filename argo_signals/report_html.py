"""The report as one self-contained HTML page: matplotlib charts as inline SVG, each with its
numbers beside it in a small table.  No script, font or style sheet is fetched.

matplotlib is an optional extra (``pip install 'argo-signals[report]'``); ``render()`` raises
``MissingExtra`` naming that command when it cannot be imported.
"""
from __future__ import annotations

import html
import importlib.util
import io
import math
from datetime import datetime
from typing import Any, Callable, Dict, List, Optional, Sequence

from .safetext import clip, escape_controls

from .report import ACTIONS, DEFAULT_TOP, SYNC_STATES, other_row

__all__ = ["EXTRA_HINT", "MissingExtra", "charts_available", "render"]

EXTRA_HINT = "pip install 'argo-signals[report]'"
NO_OUTCOMES = "no closed signals yet: outcomes arrive through update_signal()"

COLORS = {"BUY": "#2e7d32", "SELL": "#c62828", "NEUTRAL": "#9e9e9e",
          "synced": "#2e7d32", "pending": "#f9a825", "skipped": "#9e9e9e", "rejected": "#c62828",
          "failed": "#6a1b9a", "p50": "#1565c0", "p99": "#ef6c00"}


class MissingExtra(RuntimeError):
    """matplotlib is not installed: the message says what to install."""


def charts_available() -> bool:
    try:
        return importlib.util.find_spec("matplotlib") is not None
    except (ImportError, ValueError):  # ValueError: sys.modules["matplotlib"] is None
        return False


def _figure_class() -> Any:
    try:
        import matplotlib
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingExtra(f"the report's charts need matplotlib: {EXTRA_HINT} "
                           "(or use --json, which needs nothing more)") from None
    matplotlib.rcParams.update({"svg.fonttype": "path", "svg.hashsalt": "argo-signals", "font.size": 8,
                                "axes.spines.top": False, "axes.spines.right": False, "text.usetex": False})
    if "text.parse_math" in matplotlib.rcParams:  # matplotlib >= 3.5: text is never read as $math$
        matplotlib.rcParams["text.parse_math"] = False
    return Figure


def _drawn(value: Any, limit: int = 40) -> str:
    """A stored name as a chart label: literal (a '$' escaped where matplotlib cannot be told to
    skip math), control characters escaped, clipped."""
    import matplotlib

    text = clip(escape_controls(value), limit)
    return text if "text.parse_math" in matplotlib.rcParams else text.replace("$", r"\$")


# -- formatting (rounded for reading; --json has the exact values) ------------------------------
def fmt_ms(ms: Optional[float]) -> str:
    if ms is None:
        return "–"
    a = abs(ms)
    if a < 1000:
        return f"{ms:.0f} ms"
    if a < 60_000:
        return f"{ms / 1000:.2f} s"
    if a < 3_600_000:
        return f"{ms / 60_000:.1f} min"
    if a < 86_400_000:
        return f"{ms / 3_600_000:.1f} h"
    return f"{ms / 86_400_000:.1f} d"


def fmt_share(x: Optional[float], digits: int = 1) -> str:
    return "–" if x is None else f"{x * 100:.{digits}f}%"


def fmt_num(x: Any, digits: int = 2) -> str:
    if x is None:
        return "–"
    if isinstance(x, float) and not math.isfinite(x):
        return "NaN" if x != x else ("Infinity" if x > 0 else "-Infinity")
    return f"{x:.{digits}f}"


def fmt_time(iso: Any, width_ms: int) -> str:
    try:
        dt = datetime.fromisoformat(iso)
    except (TypeError, ValueError):  # a value written by other means: show it as stored
        return str(iso)
    if width_ms < 1000:
        return dt.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    if width_ms < 60_000:
        return dt.strftime("%Y-%m-%d %H:%M:%S")
    return dt.strftime("%Y-%m-%d %H:%M")


def _tick(iso: str, width_ms: int) -> str:
    dt = datetime.fromisoformat(iso)
    if width_ms < 1000:
        return dt.strftime("%H:%M:%S.%f")[:-3]
    if width_ms < 60_000:
        return dt.strftime("%H:%M:%S")
    if width_ms < 86_400_000:
        return dt.strftime("%m-%d %H:%M")
    return dt.strftime("%Y-%m-%d")


def _e(value: Any) -> str:
    return html.escape(escape_controls(value), quote=True)


_DRAWABLE = 1e100  # matplotlib's transforms break on ranges near the float limit (1.8e308)


def _chartable(v: Any) -> float:
    """A number for a chart: None, +-Inf and magnitudes past 1e100 become NaN (a gap); the
    tables beside the chart show them."""
    return float(v) if v is not None and abs(v) <= _DRAWABLE else float("nan")


# -- pieces ---------------------------------------------------------------------------------------
def _table(tid: str, head: Sequence[str], rows: Sequence[Sequence[Any]], caption: str = "",
           scroll: bool = True) -> str:
    cap = f"<caption>{_e(caption)}</caption>" if caption else ""
    th = "".join(f"<th scope=\"col\">{_e(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f'<div class="{"tbl" if scroll else "tbl full"}"><table id="{tid}">{cap}<thead><tr>{th}</tr></thead><tbody>{body}</tbody></table></div>'


def _empty(tid: str, text: str) -> str:
    return f'<p class="empty" id="{tid}">{_e(text)}</p>'


def _panel(title: str, chart: str, table: str, note: str = "") -> str:
    note_html = f'<p class="note">{_e(note)}</p>' if note else ""
    return (f'<section class="panel"><h3>{_e(title)}</h3>{note_html}<div class="row">'
            f'<div class="chart">{chart}</div>{table}</div></section>')


class _Charts:
    def __init__(self, width_ms: int, starts: List[str]) -> None:
        self.Figure = _figure_class()
        self.width_ms = width_ms
        self.starts = starts

    def svg(self, draw: Callable[[Any], None], height: float = 2.6) -> str:
        fig = self.Figure(figsize=(6.2, height), dpi=100)
        ax = fig.add_subplot()
        draw(ax)
        buf = io.StringIO()
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None, "Format": None, "Type": None}, bbox_inches="tight")
        text = buf.getvalue()
        return text[text.index("<svg"):]

    def time_axis(self, ax: Any) -> None:
        n = len(self.starts)
        step = max(1, int(math.ceil(n / 8)))
        ticks = list(range(0, n, step))
        ax.set_xticks(ticks)
        ax.set_xticklabels([_tick(self.starts[k], self.width_ms) for k in ticks], rotation=30, ha="right")
        ax.set_xlim(-0.6, n - 0.4)
        ax.set_xlabel(f"interval start (UTC), {fmt_ms(self.width_ms)} each")


# -- sections --------------------------------------------------------------------------------------
def _health(r: Dict[str, Any], ch: _Charts) -> str:
    h = r["health"]
    width = r["period"]["interval_ms"]
    iv = h["intervals"]
    x = list(range(len(iv)))
    out: List[str] = []
    oldest = h["oldest_pending"]
    summary_rows = [
        ("signals committed in the period", h["signals"]),
        *((f"  {a}", h["by_action"].get(a, 0)) for a in ACTIONS),
        *((f"  sync {s}", h["by_sync_status"].get(s, 0)) for s in SYNC_STATES),
    ]
    state_rows = [
        ("time to durable p50", fmt_ms(h["time_to_durable_ms"]["p50"])),
        ("time to durable p99", fmt_ms(h["time_to_durable_ms"]["p99"])),
        ("batch_timeout (reference)", fmt_ms(r["batch_timeout_ms"])),
        ("sync lag p50", fmt_ms(h["sync_lag_ms"]["p50"])),
        ("sync lag p99", fmt_ms(h["sync_lag_ms"]["p99"])),
        ("pending now (whole database)", h["pending_now"]),
        ("oldest pending (UTC)", "none" if oldest is None else fmt_time(oldest["created_at"], 1000)),
        ("oldest pending age", "–" if oldest is None else fmt_ms(oldest["age_ms"])),
        ("refused rows (rejected_signals)", h["refused"]["total"]),
        ("spill lines waiting", h["spill_lines"]),
        ("updates waiting for their insert", h.get("waiting_updates", 0)),
    ]
    out.append('<section class="panel"><h3>At a glance</h3><div class="row">'
               + _table("t-summary", ("in the period", "signals"), summary_rows, scroll=False)
               + _table("t-state", ("measure", "value"), state_rows, scroll=False) + "</div></section>")
    if not h["signals"]:
        out.append(_empty("empty-health", "no signals committed in this period: nothing to chart "
                                          "(is the producer running? try a longer --since)"))
    else:
        def commits(ax: Any) -> None:
            bottom = [0] * len(iv)
            for a in ACTIONS:
                vals = [s["commits"].get(a, 0) for s in iv]
                ax.bar(x, vals, bottom=bottom, color=COLORS[a], label=a, width=0.85)
                bottom = [b + v for b, v in zip(bottom, vals)]
            ax.set_ylabel("signals committed")
            ax.legend(loc="upper left", fontsize=7, frameon=False, ncol=3)
            ch.time_axis(ax)
        out.append(_panel(
            "Signals committed per interval, by action", ch.svg(commits),
            _table("t-commits", ("interval start (UTC)", *ACTIONS, "total"),
                   [(fmt_time(s["start"], width), *(s["commits"].get(a, 0) for a in ACTIONS), s["total"])
                    for s in iv])))

        def durable(ax: Any) -> None:
            for key in ("p50", "p99"):
                ax.plot(x, [_nan(s["time_to_durable_ms"][key]) for s in iv], marker="o", ms=3,
                        color=COLORS[key], label=key)
            ax.axhline(r["batch_timeout_ms"], color="#555", ls="--", lw=1,
                       label=f"batch_timeout {fmt_ms(r['batch_timeout_ms'])}")
            _duration_axis(ax)
            ax.legend(loc="upper center", bbox_to_anchor=(0.5, 1.18), fontsize=7, frameon=False, ncol=3)
            ch.time_axis(ax)
        out.append(_panel(
            "Time to durable (created_at − timestamp) per interval", ch.svg(durable),
            _table("t-durable", ("interval start (UTC)", "signals", "p50", "p99"),
                   [(fmt_time(s["start"], width), s["time_to_durable_ms"]["n"],
                     fmt_ms(s["time_to_durable_ms"]["p50"]), fmt_ms(s["time_to_durable_ms"]["p99"]))
                    for s in iv if s["time_to_durable_ms"]["n"]]),
            note="Commit time minus the signal's own timestamp. A signal given its own older timestamp shows "
                 "here as a long time to durable."
                 + (f" The {h['simulated_time_signals']} signals of argo-signals demo in this period "
                    "carry simulated timestamps and are left out (the demo prints their real time from "
                    "log_signal() to commit)." if h["simulated_time_signals"] else "")))

        def shares(ax: Any) -> None:
            bottom = [0.0] * len(iv)
            for st in SYNC_STATES:
                vals = [100.0 * s["sync"].get(st, 0) / s["total"] if s["total"] else 0.0 for s in iv]
                ax.bar(x, vals, bottom=bottom, color=COLORS[st], label=st, width=0.85)
                bottom = [b + v for b, v in zip(bottom, vals)]
            ax.set_ylim(0, 100)
            ax.set_ylabel("% of the interval's signals")
            ax.legend(loc="upper center", bbox_to_anchor=(0.5, 1.18), fontsize=7, frameon=False, ncol=5)
            ch.time_axis(ax)
        out.append(_panel(
            "Sync status share per interval", ch.svg(shares),
            _table("t-sync", ("interval start (UTC)", *SYNC_STATES),
                   [(fmt_time(s["start"], width),
                     *(f"{fmt_share(s['sync'].get(st, 0) / s['total'])} ({s['sync'].get(st, 0)})" for st in SYNC_STATES))
                    for s in iv if s["total"]])))

        if not h["sync_lag_ms"]["n"]:
            out.append(_panel("Sync lag (synced_at − created_at)",
                              _empty("empty-lag", "no synced signals in this period: sync is off or has not "
                                                  "delivered yet (argo-signals sync --alpine-url URL)"), ""))
        else:
            def lag(ax: Any) -> None:
                for key in ("p50", "p99"):
                    ax.plot(x, [_nan(s["sync_lag_ms"][key]) for s in iv], marker="o", ms=3,
                            color=COLORS[key], label=key)
                _duration_axis(ax)
                ax.legend(loc="upper left", fontsize=7, frameon=False, ncol=2)
                ch.time_axis(ax)
            out.append(_panel(
                "Sync lag (synced_at − created_at) per interval", ch.svg(lag),
                _table("t-lag", ("interval start (UTC)", "synced", "p50", "p99"),
                       [(fmt_time(s["start"], width), s["sync_lag_ms"]["n"], fmt_ms(s["sync_lag_ms"]["p50"]),
                         fmt_ms(s["sync_lag_ms"]["p99"])) for s in iv if s["sync_lag_ms"]["n"]])))

    errors = (_table("t-errors", ("sync_error", "status", "signals"),
                     [(e["reason"], e["status"], e["count"]) for e in h["sync_errors"]])
              if h["sync_errors"] else _empty("t-errors", "no sync errors in this period"))
    refusals = (_table("t-refusals", ("reason", "rows"), [(e["reason"], e["count"]) for e in h["refused"]["top_reasons"]])
                if h["refused"]["top_reasons"] else _empty("t-refusals", "no refused rows in this period"))
    out.append('<section class="panel"><h3>Top sync failure and refusal reasons</h3><div class="row">'
               f'<div><h4>Sync (signals.sync_error)</h4>{errors}</div>'
               f'<div><h4>Refused at write (rejected_signals)</h4>{refusals}</div></div></section>')
    return "".join(out)


def _duration_axis(ax: Any) -> None:
    from matplotlib.ticker import FuncFormatter

    ax.set_yscale("symlog", linthresh=1)
    if ax.get_ylim()[0] > 0:
        ax.set_ylim(bottom=0)  # show the scale from 0, unless there are negative durations (clock skew)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: fmt_ms(v)))
    ax.set_ylabel("log scale")


def _nan(v: Optional[float]) -> float:
    return float("nan") if v is None else float(v)


def _group_rows(groups: List[Dict[str, Any]], column: str, top: int, kind: str) -> List[Sequence[Any]]:
    """The first ``top`` groups, then one row summing the rest."""
    rest = other_row(groups, column, top)
    shown = groups[:top] + ([{**rest, column: f"other ({rest['count']} {kind})"}] if rest else [])
    return [(s[column], s["signals"], s["buy"], s["sell"], s["neutral"], fmt_num(s["mean_confidence"], 1),
             s["closed"], s["wins"], s["losses"], fmt_share(s["win_rate"]), fmt_num(s["mean_pnl_pct"]),
             fmt_num(s["total_pnl_pct"])) for s in shown]


def _group_title(what: str, groups: List[Dict[str, Any]], top: int) -> str:
    if len(groups) <= top:
        return what
    return (f"{what}: the {top} with the most signals of {len(groups)}, the rest summed as other "
            "(argo-signals report --json lists them all)")


_GROUP_HEAD = ("signals", "BUY", "SELL", "NEUTRAL", "mean confidence", "closed", "wins", "losses", "win rate",
               "mean P/L %", "total P/L %")


def _quality(r: Dict[str, Any], ch: _Charts) -> str:
    q = r["quality"]
    top = q.get("top", DEFAULT_TOP)
    out: List[str] = []
    strategies = q["by_strategy"]
    if not strategies:
        return _empty("empty-quality", "no signals in this period")
    out.append(f'<section class="panel"><h3>{_e(_group_title("Per strategy", strategies, top))}</h3>' + _table(
        "t-strategies", ("strategy", *_GROUP_HEAD), _group_rows(strategies, "strategy", top, "strategies"))
        + "</section>")
    if "by_symbol" in q:
        out.append(f'<section class="panel"><h3>{_e(_group_title("Per symbol", q["by_symbol"], top))}</h3>'
                   + _table("t-symbols", ("symbol", *_GROUP_HEAD), _group_rows(q["by_symbol"], "symbol", top, "symbols"))
                   + "</section>")
    if not q["pnl_distribution"]["n"] and not any(c["decided"] for c in q["calibration"]):
        out.append(_empty("empty-outcomes", NO_OUTCOMES))
        return "".join(out)

    axis = q["pnl_axis"]
    n_iv = axis["interval_count"]
    series_of = list(q["cumulative_pnl"].items())
    rest = q.get("cumulative_pnl_other") or []
    if rest:
        n_rest = len(strategies) - top
        series_of.append((f"other ({n_rest} strategies)", rest))
    if series_of:
        signal_time = _Charts(axis["interval_ms"], axis["starts"])

        def cumulative(ax: Any) -> None:
            lines, labels = [], []
            for name, points in series_of:
                ys = [float("nan")] * n_iv
                for p in points:
                    ys[p["interval"]] = _chartable(p["cumulative_pnl_pct"])
                run = 0.0
                for k, v in enumerate(ys):  # flat between the intervals with closed signals
                    run = v if v == v else run
                    ys[k] = run
                lines.extend(ax.plot(range(n_iv), ys, marker=".", ms=4))
                labels.append(_drawn(name))
            ax.axhline(0, color="#555", lw=0.8)
            ax.set_ylabel("cumulative P/L %")
            ax.legend(lines, labels, loc="upper left", fontsize=7, frameon=False, ncol=2)  # labels as given
            signal_time.time_axis(ax)
        rows = []
        for name, points in series_of:
            path = [p["cumulative_pnl_pct"] for p in points]
            rows.append((name, sum(p["closed"] for p in points), fmt_num(path[-1]), fmt_num(min(path)),
                         fmt_num(max(path))))
        out.append(_panel("Cumulative P/L % per strategy (by the signal's own time)", signal_time.svg(cumulative),
                          _table("t-cumulative", ("strategy", "with P/L", "at end", "lowest", "highest"), rows),
                          note="Over the signals' timestamps, not their commit time: "
                               f"{fmt_time(axis['starts'][0], 1)} to the end of "
                               f"{fmt_time(axis['starts'][-1], axis['interval_ms'])}, intervals of "
                               f"{fmt_ms(axis['interval_ms'])}."))
    else:
        out.append(_empty("empty-cumulative", "no profit_loss_pct recorded yet: " + NO_OUTCOMES))

    cal = q["calibration"]
    if any(c["decided"] for c in cal):
        def calibration(ax: Any) -> None:
            used = [c for c in cal if c["decided"]]
            mids = [(c["low"] + c["high"]) / 2 for c in used]
            rates = [100.0 * c["win_rate"] for c in used]
            ax.bar(mids, rates, width=8.5, color="#1565c0", alpha=0.8, label="win rate")
            for m, rate, c in zip(mids, rates, used):
                ax.annotate(f"n={c['decided']}", (m, rate), ha="center", va="bottom", fontsize=6)
            ax.plot([0, 100], [0, 100], color="#555", ls="--", lw=1, label="confidence = win rate")
            ax.set_xlim(0, 100)
            ax.set_ylim(0, 105)
            ax.set_xlabel("confidence band")
            ax.set_ylabel("win rate %")
            ax.legend(loc="upper left", fontsize=7, frameon=False)
        out.append(_panel("Confidence calibration (win rate per confidence band)", ch.svg(calibration),
                          _table("t-calibration", ("confidence", "wins + losses", "wins", "win rate"),
                                 [(f"{c['low']}–{c['high']}", c["decided"], c["wins"], fmt_share(c["win_rate"]))
                                  for c in cal if c["decided"]]),
                          note="Only outcomes 'win' and 'loss' count; other outcomes are closed but undecided."))
    else:
        out.append(_empty("empty-calibration", "no win/loss outcomes yet: " + NO_OUTCOMES))

    dist = q["pnl_distribution"]
    if dist["n"]:
        def distribution(ax: Any) -> None:
            bins = dist["bins"]  # drawn by bin number, labelled with the edges: any magnitude fits
            ax.bar(range(len(bins)), [b["count"] for b in bins], width=0.95, align="edge",
                   color=["#2e7d32" if b["low"] >= 0 else "#c62828" for b in bins])
            ticks = list(range(0, len(bins) + 1, max(1, len(bins) // 6)))
            ax.set_xticks(ticks)
            ax.set_xticklabels([f"{bins[0]['low'] + k * dist['bin_width']:.4g}" for k in ticks])
            ax.set_xlabel("P/L %")
            ax.set_ylabel("closed signals")
        out.append(_panel("P/L % distribution", ch.svg(distribution),
                          _table("t-pnl", ("P/L % from", "to", "signals"),
                                 [(fmt_num(b["low"]), fmt_num(b["high"]), b["count"]) for b in dist["bins"]])))
    else:
        out.append(_empty("empty-pnl", "no profit_loss_pct recorded yet: " + NO_OUTCOMES))
    return "".join(out)


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:1.5rem;color:#222;max-width:1240px}
h1{font-size:1.4rem;margin:0 0 .2rem} h2{font-size:1.15rem;border-bottom:2px solid #ddd;padding-bottom:.2rem;margin-top:1.6rem}
h3{font-size:.98rem;margin:.2rem 0 .4rem} h4{font-size:.85rem;margin:.2rem 0}
.meta{color:#555;font-size:.85rem;margin:0}
.panel{margin:.8rem 0 1.2rem} .row{display:flex;gap:1rem;align-items:flex-start;flex-wrap:wrap}
.chart{flex:0 0 auto} .chart svg{max-width:640px;height:auto}
.tbl{max-height:300px;overflow:auto;flex:1 1 300px} .tbl.full{max-height:none;flex:0 0 auto}
table{border-collapse:collapse;font-size:.78rem;font-variant-numeric:tabular-nums}
th,td{border:1px solid #ddd;padding:2px 6px;text-align:right;white-space:nowrap}
th{background:#f4f4f4;position:sticky;top:0} td:first-child,th:first-child{text-align:left}
.empty{color:#8a6d00;background:#fff8e1;border:1px solid #f0d98c;padding:.5rem .8rem;border-radius:4px}
.note{color:#666;font-size:.78rem;margin:0 0 .3rem}
"""


def render(report: Dict[str, Any]) -> str:
    """The whole page for a ``report.collect()`` result."""
    p = report["period"]
    starts = [s["start"] for s in report["health"]["intervals"]]
    ch = _Charts(p["interval_ms"], starts)
    strategy = report["filter"]["strategy"]
    title = "argo-signals report" + (f" — strategy {strategy}" if strategy else "")
    meta = (f"database {report['database']} · period {fmt_time(p['since'], 1)} to {fmt_time(p['until'], 1)} UTC "
            f"(by commit time) · {p['interval_count']} intervals of {fmt_ms(p['interval_ms'])} · "
            f"generated {fmt_time(report['generated_at'], 1000)} UTC")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>"
            f"<h1>{_e(title)}</h1><p class=\"meta\">{_e(meta)}</p>"
            "<p class=\"meta\">All times are UTC. Pipeline health is by commit time (created_at): its "
            "intervals, time to durable (created_at − timestamp) and sync lag (synced_at − created_at). "
            "The cumulative P/L is by the signals' own time (timestamp). Numbers are rounded here; "
            "<code>argo-signals report --json</code> prints them exactly.</p>"
            f"<h2>Pipeline health</h2>{_health(report, ch)}"
            f"<h2>Signal quality</h2>{_quality(report, ch)}"
            f"{_foreign(report.get('foreign'))}"
            "</body></html>\n")


_FOREIGN = {"created_at": "created_at not a time from 1970 to a year ahead (row not placed)",
            "timestamp": "timestamp not a time from 1970 to a year ahead (left off the P/L time axis)",
            "strategy": "strategy a BLOB or not UTF-8", "action": "action not BUY, SELL or NEUTRAL",
            "sync_status": "sync_status not one of ours", "confidence": "confidence not a finite number",
            "profit_loss_pct": "profit_loss_pct not a finite number (left out of P/L figures)"}


def _foreign(f: Optional[Dict[str, Any]]) -> str:
    """Values another program wrote: how many rows, examples as stored (escaped)."""
    if f is None:
        return ""
    rows = [("rows the report could not place in time", f["unplaced_rows"], "")]
    rows += [(label, f[col]["count"], ", ".join(escape_controls(_shown_value(v)) for v in f[col]["examples"]))
             for col, label in _FOREIGN.items() if f[col]["count"]]
    return ('<section class="panel"><h3>Values written by other means (whole database)</h3>'
            '<p class="note">Rows whose created_at cannot be placed are left out of every figure above; '
            'other odd values are left out of the figure they would distort.</p>'
            + _table("t-foreign", ("what", "rows", "examples as stored"), rows, scroll=False) + "</section>")


def _shown_value(v: Any) -> str:
    return repr(v) if isinstance(v, float) else str(v)
