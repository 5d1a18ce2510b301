"""The products the current model recommends to most users, with their descriptions (from the
`Sale.description` of the sales the feed has read); or, by a toggle, the products of highest
GraphX PageRank in the recommendation graph (from the version's export, as the network panel)."""

from __future__ import annotations

from pathlib import Path

from bokeh.layouts import column
from bokeh.models import ColumnDataSource, FactorRange, HoverTool, RadioButtonGroup
from bokeh.plotting import figure

from visualizer.panels.network import graph_measures
from visualizer.state import GRAPH, STREAM, DashboardState

SHOWN = 15
LABEL_CHARS = 34
RANKINGS = ["by recommendations", "by PageRank"]


def bar_label(product_id: str, description: str) -> str:
    text = f"{product_id} · {description}" if description else product_id
    return text if len(text) <= LABEL_CHARS else text[: LABEL_CHARS - 1] + "…"


class TopProductsPanel:
    # STREAM: descriptions come from sales, which are read after the result topics.
    parts = (GRAPH, STREAM)

    def __init__(self, export_dir: Path | str | None = None) -> None:
        self.export_dir = None if export_dir is None else str(export_dir)
        self.source = ColumnDataSource(
            dict(label=[], product=[], users=[], mean_rank=[], description=[], pagerank=[],
                 value=[]),
            name="top-products",
        )
        self.ranking = RadioButtonGroup(labels=RANKINGS, active=0, name="top-products-ranking")
        p = figure(
            title="Top recommended products: waiting for a model",
            y_range=FactorRange(factors=[]), height=380, sizing_mode="stretch_width",
            x_axis_label="users it is recommended to", tools="save", toolbar_location="above",
            name="top-products-plot",
        )
        bars = p.hbar(y="label", right="value", height=0.75, source=self.source,
                      fill_color="#ff7f0e", line_color=None)
        p.add_tools(HoverTool(renderers=[bars], tooltips=[
            ("product", "@product"), ("description", "@description"),
            ("recommended to", "@users users"), ("mean rank", "@mean_rank{0.0}"),
            ("PageRank", "@pagerank{0.000}")]))
        p.x_range.start = 0
        p.ygrid.visible = False
        p.yaxis.major_label_text_font_size = "8pt"
        self.figure = p
        self._last: tuple = ()
        self._state: DashboardState | None = None
        self.ranking.on_change("active", lambda attr, old, new: self._redraw())
        self.layout = column(self.ranking, p, sizing_mode="stretch_width")

    def _redraw(self) -> None:
        if self._state is not None:
            self.refresh(self._state)

    def _by_pagerank(self, state: DashboardState) -> list[tuple[str, int, float, str, float]]:
        """(product, users, mean rank (NaN: not known here), description, PageRank), best
        first; [] without the version's export."""
        version = state.latest_graph_version()
        if self.export_dir is None or version is None:
            return []
        measures = graph_measures(self.export_dir, version)
        ranked = sorted(((-r, i[2:], d) for i, (r, _, d) in measures.items()
                         if i.startswith("p:")))[:SHOWN]
        return [(p, d, float("nan"), state.description(p), -r) for r, p, d in ranked]

    def refresh(self, state: DashboardState) -> None:
        self._state = state
        by_rank = self.ranking.active == 1
        if by_rank:
            top = self._by_pagerank(state)
        else:
            top = [(*t, float("nan")) for t in state.top_products(SHOWN)]
        if not top:
            return
        key = (by_rank, *top)
        if key == self._last:
            return
        self._last = key
        rows = list(reversed(top))  # best at the top
        labels = [bar_label(p, d) for p, _, _, d, _ in rows]
        if len(set(labels)) < len(labels):  # factors must be unique: fall back to the ids
            labels = [p for p, _, _, _, _ in rows]
        self.figure.y_range.factors = labels
        self.source.data = dict(
            label=labels,
            product=[p for p, _, _, _, _ in rows],
            users=[n for _, n, _, _, _ in rows],
            mean_rank=[r for _, _, r, _, _ in rows],
            description=[d or "–" for _, _, _, d, _ in rows],
            pagerank=[x for _, _, _, _, x in rows],
            value=[x if by_rank else n for _, n, _, _, x in rows],
        )
        current, _ = state.versions()
        if by_rank:
            self.figure.title.text = (f"Top {len(rows)} products by PageRank (GraphX, "
                                      f"recommendation graph), v{current}")
            self.figure.xaxis.axis_label = "PageRank (mean 1)"
        else:
            self.figure.title.text = f"Top {len(rows)} recommended products, v{current}"
            self.figure.xaxis.axis_label = "users it is recommended to"
