"""The user–product recommendation network of the current model version.

Readable at full size by focusing: the N products recommended to most users (a slider) and the
users with most edges into them (a second slider), drawn on two rings: products inside, users
outside. The layout is a deterministic radial bipartite layout with barycentric ordering (users sit
near the products they are linked to, products near their users), computed here in plain Python —
a few hundred nodes need no graph library.

GraphX's figures come from the version's export (`RECSYS_EXPORT_DIR/<version>/vertices.csv`,
written before its edges reach graph-edges): products are sized by PageRank and every node is
coloured by its label-propagation community (the ten largest in colour, the others grey); a menu
picks one community, whose most recommended products are then shown. Without the export (another
machine, not written yet) the panel sizes by degree and colours nothing.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import pandas as pd
from bokeh.layouts import column, row
from bokeh.models import (
    ColorBar,
    ColumnDataSource,
    HoverTool,
    LabelSet,
    LinearColorMapper,
    Select,
    Slider,
)
from bokeh.palettes import Category10_10, Viridis256
from bokeh.plotting import figure

from visualizer.state import GRAPH, DashboardState

log = logging.getLogger(__name__)

PRODUCT_RING = 0.45
ALL = "all communities"
OTHER = "#bbbbbb"
USER_COLOUR = "#1f77b4"
PRODUCT_COLOUR = "#ff7f0e"


@functools.lru_cache(maxsize=4)
def graph_measures(export_dir: str, version: int) -> dict[str, tuple[float, int, int]]:
    """`vertices.csv` id -> (pagerank, community, degree) of a version's export; {} when
    absent."""
    path = Path(export_dir) / str(version) / "vertices.csv"
    if not (path.parent / "summary.json").exists():  # summary.json last: a complete folder
        return {}
    try:
        verts = pd.read_csv(path, usecols=["id", "degree", "pagerank", "community"],
                            dtype={"id": str})
    except (OSError, ValueError) as exc:  # an export from before GraphX has no such columns
        log.info("no GraphX figures in %s: %s", path, exc)
        return {}
    return {
        i: (float(r), int(c), int(d))
        for i, r, c, d in zip(verts["id"], verts["pagerank"].fillna(0.0),
                              verts["community"].fillna(0), verts["degree"].fillna(0),
                              strict=True)
    }


def community_colour(community: int, default: str) -> str:
    """The ten largest communities (numbered 1-10) in Category10, the others grey."""
    if community <= 0:
        return default if community < 0 else OTHER
    return Category10_10[community - 1] if community <= 10 else OTHER

USER_RING = 1.0
SWEEPS = 3


def _circular_mean(angles: Iterable[float]) -> float | None:
    s = c = 0.0
    n = 0
    for a in angles:
        s += math.sin(a)
        c += math.cos(a)
        n += 1
    if n == 0 or math.hypot(s, c) < 1e-9 * n:
        return None
    return math.atan2(s, c) % (2 * math.pi)


def _ring(order: Sequence[str]) -> dict[str, float]:
    n = max(len(order), 1)
    return {node: 2 * math.pi * i / n for i, node in enumerate(order)}


def radial_bipartite_layout(
    products: Sequence[str], links: Mapping[str, Sequence[str]]
) -> tuple[dict[str, tuple[float, float]], dict[str, tuple[float, float]]]:
    """(product -> (x, y), user -> (x, y)) for `links` user -> its products.

    Products start on the inner ring in the given order; then, `SWEEPS` times, users are ordered
    by the circular mean angle of their products and spread evenly on the outer ring, and
    products are re-ordered by the mean angle of their users. Ties break by id, so the same
    input always gives the same picture.
    """
    users = sorted(links)
    p_angle = _ring(list(products))
    u_angle: dict[str, float] = {}
    users_of: dict[str, list[str]] = {p: [] for p in products}
    for u in users:
        for p in links[u]:
            if p in users_of:
                users_of[p].append(u)
    for sweep in range(SWEEPS):
        keyed = []
        for u in users:
            mean = _circular_mean(p_angle[p] for p in links[u] if p in p_angle)
            keyed.append((mean if mean is not None else 0.0, u))
        keyed.sort()
        u_angle = _ring([u for _, u in keyed])
        if sweep == SWEEPS - 1:
            break
        keyed_p = []
        for i, p in enumerate(products):
            mean = _circular_mean(u_angle[u] for u in users_of[p])
            keyed_p.append((mean if mean is not None else 2 * math.pi * i / len(products), p))
        keyed_p.sort()
        p_angle = _ring([p for _, p in keyed_p])
    # Align the rings: rotate users so their mean offset from their products is zero.
    if users:
        delta = _circular_mean(
            u_angle[u] - p_angle[p] for u in users for p in links[u] if p in p_angle
        )
        if delta is not None:
            u_angle = {u: a - delta for u, a in u_angle.items()}
    p_xy = {p: (PRODUCT_RING * math.cos(a), PRODUCT_RING * math.sin(a)) for p, a in p_angle.items()}
    u_xy = {u: (USER_RING * math.cos(a), USER_RING * math.sin(a)) for u, a in u_angle.items()}
    return p_xy, u_xy


def _short(text: str, n: int = 40) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


class NetworkPanel:
    parts = (GRAPH,)

    def __init__(self, state: DashboardState, export_dir: Path | str | None = None) -> None:
        self.export_dir = None if export_dir is None else str(export_dir)
        self.edges = ColumnDataSource(
            dict(xs=[], ys=[], user=[], product=[], score=[], rank=[], because=[]),
            name="network-edges",
        )
        self.products = ColumnDataSource(
            dict(x=[], y=[], product=[], degree=[], description=[], size=[], label=[],
                 pagerank=[], community=[], colour=[]),
            name="network-products",
        )
        self.users = ColumnDataSource(dict(x=[], y=[], user=[], links=[], size=[], community=[],
                                           colour=[]), name="network-users")
        self.community = Select(title="community (GraphX label propagation)", value=ALL,
                                options=[ALL], width=250, name="network-community")
        self.top = Slider(start=3, end=60, step=1, value=12, title="products shown (most "
                          "recommended)", width=330, name="network-products-slider")
        self.max_users = Slider(start=10, end=600, step=10, value=120, title="users at most",
                                width=330, name="network-users-slider")
        p = figure(
            title="Recommendation network: waiting for a model",
            frame_width=700, frame_height=700,  # square, so the rings stay round
            x_range=(-1.12, 1.12), y_range=(-1.12, 1.12),
            tools="pan,wheel_zoom,box_zoom,reset,save", toolbar_location="above",
            name="network",
        )
        p.axis.visible = False
        p.grid.visible = False
        mapper = LinearColorMapper(palette=Viridis256, low=1, high=10)
        self.mapper = mapper
        edge_r = p.multi_line(
            "xs", "ys", source=self.edges, line_alpha=0.3, line_width=1.2,
            line_color={"field": "rank", "transform": mapper},
            hover_line_alpha=1.0, hover_line_width=3, hover_line_color="#d62728",
        )
        user_r = p.scatter(
            "x", "y", source=self.users, size="size", marker="circle",
            fill_color="colour", line_color="white", line_width=0.5,
            hover_fill_color="#d62728", legend_label="users",
        )
        prod_r = p.scatter(
            "x", "y", source=self.products, size="size", marker="square",
            fill_color="colour", line_color="#7f3f00", fill_alpha=0.9,
            hover_fill_color="#d62728", legend_label="products",
        )
        p.add_layout(
            LabelSet(
                x="x", y="y", text="label", source=self.products, text_font_size="8pt",
                x_offset=7, y_offset=4, text_color="#5a2d00",
                background_fill_color="white", background_fill_alpha=0.75,
            )
        )
        p.add_tools(
            HoverTool(
                renderers=[edge_r], line_policy="interp",
                tooltips=[("user", "@user"), ("product", "@product"), ("score", "@score{0.000}"),
                          ("rank", "@rank"), ("because", "@because")],
            ),
            HoverTool(renderers=[prod_r], tooltips=[
                ("product", "@product"), ("description", "@description"),
                ("recommended to", "@degree users"), ("PageRank", "@pagerank{0.000}"),
                ("community", "@community")]),
            HoverTool(renderers=[user_r], tooltips=[("user", "@user"), ("edges shown", "@links"),
                                                    ("community", "@community")]),
        )
        p.add_layout(ColorBar(color_mapper=mapper, title="rank", width=10, padding=4,
                              title_text_font_size="9pt"), "right")
        p.legend.location = "top_left"
        p.legend.background_fill_alpha = 0.6
        self.figure = p
        self._state = state
        self.top.on_change("value_throttled", lambda attr, old, new: self.refresh(self._state))
        self.max_users.on_change(
            "value_throttled", lambda attr, old, new: self.refresh(self._state)
        )
        self.community.on_change("value", lambda attr, old, new: self.refresh(self._state))
        self.layout = column(row(self.top, self.max_users, self.community), p)

    def _measures(self, version: int | None) -> dict[str, tuple[float, int, int]]:
        if self.export_dir is None or version is None:
            return {}
        return graph_measures(self.export_dir, version)

    def _communities(self, measures: Mapping[str, tuple[float, int, int]]) -> list[str]:
        """The menu: all, then the communities by size (largest first), at most 30."""
        sizes: dict[int, int] = {}
        for _, c, _ in measures.values():
            if c > 0:
                sizes[c] = sizes.get(c, 0) + 1
        return [ALL, *(str(c) for c in sorted(sizes)[:30])]

    def refresh(self, state: DashboardState) -> None:
        measures = self._measures(state.latest_graph_version())
        options = self._communities(measures)
        if options != self.community.options:
            self.community.options = options
        picked = self.community.value if self.community.value in options else ALL
        only = None
        if picked != ALL:
            wanted = int(picked)
            only = lambda p: measures.get(f"p:{p}", (0.0, 0))[1] == wanted  # noqa: E731
        view = state.network(int(self.top.value), int(self.max_users.value), only)
        if view["version"] is None:
            return
        products = [p for p, _, _ in view["products"]]
        links: dict[str, list[str]] = {}
        for e in view["edges"]:
            links.setdefault(e.user_id, []).append(e.product_id)
        p_xy, u_xy = radial_bipartite_layout(products, links)
        e = view["edges"]
        self.edges.data = dict(
            xs=[[u_xy[x.user_id][0], p_xy[x.product_id][0]] for x in e],
            ys=[[u_xy[x.user_id][1], p_xy[x.product_id][1]] for x in e],
            user=[x.user_id for x in e],
            product=[x.product_id for x in e],
            score=[x.score for x in e],
            rank=[x.rank for x in e],
            because=[", ".join(x.because) or "–" for x in e],
        )
        degrees = [d for _, d, _ in view["products"]]
        top_degree = max(degrees, default=1) or 1
        ranks = [measures.get(f"p:{p}", (0.0, -1))[0] for p in products]
        p_comm = [measures.get(f"p:{p}", (0.0, -1))[1] for p in products]
        top_rank = max(ranks, default=0.0)
        if top_rank > 0:  # GraphX PageRank
            sizes = [8 + 16 * math.sqrt(r / top_rank) for r in ranks]
        else:
            sizes = [8 + 16 * math.sqrt(d / top_degree) for d in degrees]
        self.products.data = dict(
            x=[p_xy[p][0] for p in products],
            y=[p_xy[p][1] for p in products],
            product=products,
            degree=degrees,
            description=[d or "–" for _, _, d in view["products"]],
            size=sizes,
            label=[_short(f"{p} {d}".strip(), 22) for p, _, d in view["products"]],
            pagerank=ranks,
            community=p_comm,
            colour=[community_colour(c, PRODUCT_COLOUR) for c in p_comm],
        )
        users = [u for u, _ in view["users"] if u in u_xy]
        u_comm = [measures.get(f"u:{u}", (0.0, -1))[1] for u in users]
        self.users.data = dict(
            x=[u_xy[u][0] for u in users],
            y=[u_xy[u][1] for u in users],
            user=users,
            links=[len(links.get(u, ())) for u in users],
            size=[4 + 1.5 * len(links.get(u, ())) for u in users],
            community=u_comm,
            colour=[community_colour(c, USER_COLOUR) for c in u_comm],
        )
        self.mapper.high = max([x.rank for x in e], default=10) or 10
        which = "" if picked == ALL else f" of community {picked}"
        sized = "size: PageRank, node colour: community, " if top_rank > 0 else ""
        self.figure.title.text = (
            f"Recommendation network, v{view['version']}: {len(products)} most recommended "
            f"products{which}, {len(users)} of their users, {len(e)} edges ({sized}edge colour:"
            " rank)"
        )
