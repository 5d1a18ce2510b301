"""Online hit-rate per model version, from the aggregator's `feedback` topic (the share of
recommended products the user then bought: hits / sales over all the version's windows) and
precision@k of the latest window."""

from __future__ import annotations

import math

from bokeh.models import ColumnDataSource, HoverTool
from bokeh.plotting import figure

from visualizer.state import FEEDBACK, DashboardState


class FeedbackPanel:
    parts = (FEEDBACK,)

    def __init__(self, eval_k: int) -> None:
        self.source = ColumnDataSource(
            dict(version=[], hit_rate=[], precision=[], sales=[], hits=[]), name="feedback"
        )
        p = figure(
            title="Online hit-rate per model version: no feedback yet", height=300,
            sizing_mode="stretch_width", x_axis_label="model version", tools="save",
            toolbar_location="above", name="feedback-plot",
        )
        bars = p.vbar(x="version", top="hit_rate", width=0.6, source=self.source,
                      fill_color="#17becf", line_color=None, legend_label="hit-rate")
        p.line("version", "precision", source=self.source, color="#8c564b", line_width=2,
               legend_label=f"precision@{eval_k} (online)")
        p.scatter("version", "precision", source=self.source, color="#8c564b", size=7,
                  legend_label=f"precision@{eval_k} (online)")
        p.add_tools(HoverTool(renderers=[bars], tooltips=[
            ("version", "@version"), ("hit-rate", "@hit_rate{0.0000}"),
            ("hits / sales", "@hits / @sales"),
            (f"precision@{eval_k} (latest window)", "@precision{0.0000}")]))
        p.y_range.start = 0
        p.legend.location = "top_left"
        p.legend.background_fill_alpha = 0.6
        p.xaxis.ticker.desired_num_ticks = 6
        p.xaxis.ticker.min_interval = 1
        self.figure = p
        self.layout = p

    def refresh(self, state: DashboardState) -> None:
        rows = state.feedback_by_version()
        if not rows:
            return
        self.source.data = dict(
            version=[v for v, _ in rows],
            hit_rate=[r.get("hit_rate", math.nan) for _, r in rows],
            precision=[r.get("precision_at_k", math.nan) for _, r in rows],
            sales=[r.get("sales", math.nan) for _, r in rows],
            hits=[r.get("hits", math.nan) for _, r in rows],
        )
        v, latest = rows[-1]
        self.figure.title.text = (
            f"Online hit-rate per model version (v{v}: {latest.get('hit_rate', math.nan):.3f})"
        )
