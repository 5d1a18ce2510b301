"""The products the current model recommends to most users, with their descriptions (from the
`Sale.description` of the sales the feed has read)."""

from __future__ import annotations

from bokeh.models import ColumnDataSource, FactorRange, HoverTool
from bokeh.plotting import figure

from visualizer.state import GRAPH, STREAM, DashboardState

SHOWN = 15
LABEL_CHARS = 34


def bar_label(product_id: str, description: str) -> str:
    text = f"{product_id} · {description}" if description else product_id
    return text if len(text) <= LABEL_CHARS else text[: LABEL_CHARS - 1] + "…"


class TopProductsPanel:
    # STREAM: descriptions come from sales, which are read after the result topics.
    parts = (GRAPH, STREAM)

    def __init__(self) -> None:
        self.source = ColumnDataSource(
            dict(label=[], product=[], users=[], mean_rank=[], description=[]),
            name="top-products",
        )
        p = figure(
            title="Top recommended products: waiting for a model",
            y_range=FactorRange(factors=[]), height=380, sizing_mode="stretch_width",
            x_axis_label="users it is recommended to", tools="save", toolbar_location="above",
            name="top-products-plot",
        )
        bars = p.hbar(y="label", right="users", height=0.75, source=self.source,
                      fill_color="#ff7f0e", line_color=None)
        p.add_tools(HoverTool(renderers=[bars], tooltips=[
            ("product", "@product"), ("description", "@description"),
            ("recommended to", "@users users"), ("mean rank", "@mean_rank{0.0}")]))
        p.x_range.start = 0
        p.ygrid.visible = False
        p.yaxis.major_label_text_font_size = "8pt"
        self.figure = p
        self.layout = p
        self._last: tuple = ()

    def refresh(self, state: DashboardState) -> None:
        top = state.top_products(SHOWN)
        if not top:
            return
        key = tuple(top)
        if key == self._last:
            return
        self._last = key
        rows = list(reversed(top))  # best at the top
        labels = [bar_label(p, d) for p, _, _, d in rows]
        if len(set(labels)) < len(labels):  # factors must be unique: fall back to the ids
            labels = [p for p, _, _, _ in rows]
        self.figure.y_range.factors = labels
        self.source.data = dict(
            label=labels,
            product=[p for p, _, _, _ in rows],
            users=[n for _, n, _, _ in rows],
            mean_rank=[r for _, _, r, _ in rows],
            description=[d or "–" for _, _, _, d in rows],
        )
        current, _ = state.versions()
        self.figure.title.text = f"Top {len(rows)} recommended products, v{current}"
