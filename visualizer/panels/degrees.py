"""Degree distribution (log–log): how many products are recommended to d users, for the current
model version, with the previous version faded behind it."""

from __future__ import annotations

from bokeh.models import ColumnDataSource, HoverTool
from bokeh.plotting import figure

from visualizer.state import GRAPH, DashboardState


class DegreesPanel:
    parts = (GRAPH,)

    def __init__(self) -> None:
        self.current = ColumnDataSource(dict(degree=[], products=[]), name="degrees-current")
        self.previous = ColumnDataSource(dict(degree=[], products=[]), name="degrees-previous")
        p = figure(
            title="Product degree distribution: waiting for a model",
            x_axis_type="log", y_axis_type="log", height=300, sizing_mode="stretch_width",
            x_axis_label="users a product is recommended to (degree)",
            y_axis_label="products", tools="pan,wheel_zoom,reset,save",
            toolbar_location="above", name="degrees",
        )
        prev = p.scatter("degree", "products", source=self.previous, size=6, color="#7f7f7f",
                         alpha=0.3, legend_label="previous version")
        cur = p.scatter("degree", "products", source=self.current, size=7, color="#1f77b4",
                        legend_label="current version")
        p.add_tools(HoverTool(renderers=[cur, prev],
                              tooltips=[("degree", "@degree"), ("products", "@products")]))
        p.y_range.start = 0.7  # keep the many products of count 1 off the frame's edge
        p.legend.location = "top_right"
        p.legend.background_fill_alpha = 0.6
        self.figure = p
        self.layout = p

    def refresh(self, state: DashboardState) -> None:
        dist = state.degree_distribution()
        if "current" not in dist:
            return
        version, degrees, counts = dist["current"]
        self.current.data = dict(degree=degrees, products=counts)
        title = f"Product degree distribution (log–log), v{version}"
        if "previous" in dist:
            pv, pd, pc = dist["previous"]
            self.previous.data = dict(degree=pd, products=pc)
            title += f" over v{pv} (faded)"
        else:
            self.previous.data = dict(degree=[], products=[])
        self.figure.title.text = title
