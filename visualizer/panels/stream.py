"""The stream: valid sales per second (by Kafka timestamp), progress to the next training
threshold (n of N valid events since the latest model), dead letters by reason, and the speed
layer: lists by source (retrain, fold-in) and the freshness of the last minute's fold-ins
(redrawn every second with the rest of the panel, so old fold-ins leave the figures)."""

from __future__ import annotations

import time

from bokeh.layouts import column, row
from bokeh.models import ColumnDataSource, Div, FactorRange, HoverTool
from bokeh.plotting import figure

from schemas.millis import now_ms
from visualizer.state import STREAM, DashboardState

WINDOW_S = 120
REASONS_SHOWN = 10
# Shown while the job trains: until its model-ready arrives, n keeps counting past N.
TRAINING = " — threshold reached, training"


def speed_html(speed: dict) -> str:
    lists = speed["lists"]
    shadow = lists.get("shadow", 0)
    text = (f"<b>lists:</b> {lists['retrain']:,} retrain · {lists['fold-in']:,} fold-in"
            + (f" · {shadow:,} shadow (a rejected challenger's, not served)" if shadow else "")
            + " &nbsp; <b>fold-in freshness</b> (last minute): ")
    if not speed["fold_ins"]:
        return text + "no fold-in"
    return text + (f"p50 {speed['p50_ms']:,} ms · p95 {speed['p95_ms']:,} ms "
                   f"({speed['fold_ins']:,} lists)")


def progress_html(n: int, threshold: int, has_model: bool) -> str:
    share = min(1.0, n / threshold) if threshold else 0.0
    what = "next model" if has_model else "first model"
    return (
        f'<div class="recsys-progress"><b>{what}:</b> {n:,} of {threshold:,} events '
        f"({share:.0%}){TRAINING if threshold and n >= threshold else ''}"
        '<div style="background:#e6e6e6;border-radius:4px;height:14px;margin-top:4px">'
        f'<div style="background:#2ca02c;width:{share * 100:.1f}%;height:14px;'
        'border-radius:4px"></div></div></div>'
    )


class StreamPanel:
    parts = (STREAM,)

    def __init__(self) -> None:
        self.rate = ColumnDataSource(dict(t=[], sales=[]), name="sales-rate")
        self.dlq = ColumnDataSource(dict(reason=[], count=[]), name="dlq")
        rate = figure(
            title=f"Valid sales per second (last {WINDOW_S} s)", x_axis_type="datetime",
            height=260, sizing_mode="stretch_width", tools="save", toolbar_location="above",
            y_axis_label="sales/s", name="sales-rate-plot",
        )
        rate.varea(x="t", y1=0, y2="sales", source=self.rate, fill_color="#1f77b4",
                   fill_alpha=0.25)
        line = rate.line("t", "sales", source=self.rate, line_width=1.5, color="#1f77b4")
        rate.add_tools(HoverTool(renderers=[line], mode="vline",
                                 tooltips=[("time", "@t{%T}"), ("sales/s", "@sales")],
                                 formatters={"@t": "datetime"}))
        rate.y_range.start = 0
        dlq = figure(
            title="Dead letters by reason: none yet", y_range=FactorRange(factors=[]),
            height=260, sizing_mode="stretch_width", tools="save", toolbar_location="above",
            x_axis_label="records", name="dlq-plot",
        )
        bars = dlq.hbar(y="reason", right="count", height=0.7, source=self.dlq,
                        fill_color="#d62728", line_color=None)
        dlq.add_tools(HoverTool(renderers=[bars], tooltips=[("reason", "@reason"),
                                                            ("records", "@count")]))
        dlq.x_range.start = 0
        dlq.ygrid.visible = False
        dlq.yaxis.major_label_text_font_size = "8pt"
        self.progress = Div(text=progress_html(0, 1, False), name="progress",
                            sizing_mode="stretch_width")
        self.totals = Div(text="", name="stream-totals", sizing_mode="stretch_width")
        self.speed = Div(text="", name="speed", sizing_mode="stretch_width")
        self.rate_fig, self.dlq_fig = rate, dlq
        self.layout = column(
            row(self.progress, column(self.totals, self.speed, sizing_mode="stretch_width"),
                sizing_mode="stretch_width"),
            row(rate, dlq, sizing_mode="stretch_width"),
            sizing_mode="stretch_width",
        )
        self._dlq_last: list = []

    def refresh(self, state: DashboardState) -> None:
        now = int(time.time())
        secs, counts = state.sales_rate(now, WINDOW_S)
        self.rate.data = dict(t=[s * 1000 for s in secs], sales=counts)
        n, threshold = state.progress()
        status = state.status()
        self.progress.text = progress_html(n, threshold, status["model"] is not None)
        last = counts[-5:]
        self.totals.text = (
            f"<b>valid sales read:</b> {status['valid_sales']:,} &nbsp; "
            f"<b>now:</b> {sum(last) / max(len(last), 1):,.0f}/s &nbsp; "
            f"<b>dead letters:</b> {status['dlq_total']:,}"
        )
        speed = speed_html(state.speed(now_ms()))
        if speed != self.speed.text:
            self.speed.text = speed
        reasons = state.dead_letters()[:REASONS_SHOWN]
        if reasons and reasons != self._dlq_last:
            self._dlq_last = reasons
            rows = list(reversed(reasons))
            self.dlq_fig.y_range.factors = [r for r, _ in rows]
            self.dlq.data = dict(reason=[r for r, _ in rows], count=[c for _, c in rows])
            self.dlq_fig.title.text = f"Dead letters by reason ({status['dlq_total']:,} in all)"
