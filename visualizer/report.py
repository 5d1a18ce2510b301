"""`recsys report`: one standalone HTML page (Bokeh, resources inlined: it opens offline) from a
graph export folder (`spark.graph_export`), with three views:

- the user -> product network, sampled: the most recommended products and a capped number of
  their users (the smallest user ids, so the same export gives the same picture); products sized
  by GraphX PageRank, every node coloured by its label-propagation community, and a menu that
  picks one community (the others fade);
- the degree distribution of products, log-log, recommendations next to purchases (degree 0,
  which a log axis cannot show, is left out and counted in the title);
- the top products as bar charts, two tabs: by recommendations (users) and by PageRank.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd
from bokeh.embed import file_html
from bokeh.layouts import column
from bokeh.models import (
    ColumnDataSource,
    CustomJS,
    HoverTool,
    LayoutDOM,
    Select,
    TabPanel,
    Tabs,
)
from bokeh.palettes import Category10_10
from bokeh.plotting import figure
from bokeh.resources import INLINE

from recsys.settings import Settings

NETWORK_PRODUCTS = 15
NETWORK_USERS = 150
TOP_SHOWN = 20
OTHER = "#bbbbbb"  # communities past the ten largest, and vertices without one
FADED = 0.08
ALL = "all communities"


def community_colour(community: int) -> str:
    """Communities 1-10 (the largest ten) get Category10; the others grey."""
    return Category10_10[community - 1] if 1 <= community <= 10 else OTHER


def latest_version(export_dir: Path) -> int | None:
    """The highest numbered export folder with a summary.json (a complete one), or None."""
    done = [int(p.name) for p in Path(export_dir).glob("*") if p.name.isdigit()
            and (p / "summary.json").exists()]
    return max(done, default=None)


def network(edges: pd.DataFrame, descriptions: dict[str, str], products: int = NETWORK_PRODUCTS,
            users: int = NETWORK_USERS, measures: pd.DataFrame | None = None) -> LayoutDOM:
    """Users (left) linked to the `products` most recommended products (right), for at most
    `users` of their users; with `measures` (vertices.csv: id, pagerank, community) products are
    sized by PageRank, nodes coloured by community, and a menu picks one community."""
    counts = edges.groupby("product_id")["user_id"].nunique().reset_index(name="users")
    picked = counts.sort_values(["users", "product_id"], ascending=[False, True]).head(products)
    shown = edges[edges["product_id"].isin(picked["product_id"])]
    user_ids = sorted(shown["user_id"].unique())[:users]
    shown = shown[shown["user_id"].isin(user_ids)]
    y_user = {u: i / max(len(user_ids) - 1, 1) for i, u in enumerate(user_ids)}
    order = list(picked["product_id"])
    y_product = {p: i / max(len(order) - 1, 1) for i, p in enumerate(order)}
    rank, community = {}, {}
    if measures is not None and "pagerank" in measures:
        rank = dict(zip(measures["id"], measures["pagerank"], strict=True))
        community = dict(zip(measures["id"], measures["community"].fillna(0).astype(int),
                             strict=True))
    p_rank = [float(rank.get(f"p:{x}", 0.0) or 0.0) for x in order]
    top_rank = max(p_rank, default=0.0) or 1.0
    p_comm = [int(community.get(f"p:{x}", 0)) for x in order]
    u_comm = [int(community.get(f"u:{u}", 0)) for u in user_ids]
    sized = "by PageRank, " if rank else ""
    p = figure(
        title=f"Recommendation network: the {len(order)} most recommended products and "
        f"{len(user_ids)} of their users (smallest ids, at most {users}); products {sized}"
        "colour: community",
        width=900, height=600, x_range=(-0.2, 1.2), tools="pan,wheel_zoom,reset,save",
    )
    links = ColumnDataSource({
        "y0": [y_user[u] for u in shown["user_id"]],
        "y1": [y_product[x] for x in shown["product_id"]],
        "community": [int(community.get(f"p:{x}", 0)) for x in shown["product_id"]],
        "alpha": [0.15] * len(shown),
    })
    p.segment(x0=0, y0="y0", x1=1, y1="y1", source=links, line_alpha="alpha", color="gray")
    users_src = ColumnDataSource({
        "x": [0] * len(user_ids), "y": [y_user[u] for u in user_ids], "user_id": user_ids,
        "community": u_comm, "colour": [community_colour(c) for c in u_comm],
        "alpha": [1.0] * len(user_ids),
    })
    p.scatter("x", "y", source=users_src, size=5, color="colour", alpha="alpha",
              legend_label="users")
    products_src = ColumnDataSource({
        "x": [1] * len(order), "y": [y_product[x] for x in order], "product_id": order,
        "description": [descriptions.get(x, "") for x in order],
        "users": list(picked["users"]), "pagerank": p_rank, "community": p_comm,
        "size": [8 + 22 * (r / top_rank) ** 0.5 if rank else 10 for r in p_rank],
        "colour": [community_colour(c) for c in p_comm], "alpha": [1.0] * len(order),
    })
    dots = p.scatter("x", "y", source=products_src, size="size", color="colour", alpha="alpha",
                     marker="square", legend_label="products")
    p.add_tools(HoverTool(renderers=[dots], tooltips=[
        ("product", "@product_id"), ("description", "@description"), ("users", "@users"),
        ("PageRank", "@pagerank{0.000}"), ("community", "@community")]))
    p.axis.visible = False
    p.grid.visible = False
    shown_communities = sorted({c for c in p_comm + u_comm if c > 0})
    pick = Select(title="community", value=ALL,
                  options=[ALL, *(str(c) for c in shown_communities)], width=200)
    pick.js_on_change("value", CustomJS(
        args={"sources": [products_src, users_src, links], "all": ALL, "faded": FADED},
        code="""
        for (const src of sources) {
            const c = src.data.community;
            const on = src === sources[2] ? 0.15 : 1.0;
            src.data.alpha = c.map(x => (this.value === all || String(x) === this.value)
                                        ? on : faded);
            src.change.emit();
        }
        """))
    return column(pick, p)


def degree_plot(dist: pd.DataFrame) -> figure:
    """Products per in-degree, log-log, one line per graph."""
    zero = dist[dist["degree"] == 0].set_index("graph")["products"].to_dict()
    p = figure(
        title="Degree distribution of products (log-log; degree 0 left out: "
        + ", ".join(f"{g} {n}" for g, n in sorted(zero.items())) + ")",
        width=900, height=400, x_axis_type="log", y_axis_type="log",
        x_axis_label="in-degree (users)", y_axis_label="products",
    )
    for graph, color in (("recommendations", "darkorange"), ("purchases", "steelblue")):
        part = dist[(dist["graph"] == graph) & (dist["degree"] > 0)]
        p.scatter(part["degree"], part["products"], color=color, legend_label=graph, size=6)
    return p


def bars(rows: pd.DataFrame, value: str, title: str, axis: str, colour: str) -> figure:
    """Horizontal bars of `rows[value]`, first row at the top."""
    labels = [f"{pid} {str(d)[:30] if isinstance(d, str) else ''}".strip()
              for pid, d in zip(rows["product_id"], rows["description"], strict=True)]
    p = figure(title=title, y_range=list(reversed(labels)), width=900,
               height=30 * len(labels) + 80, x_axis_label=axis)
    p.hbar(y=labels, right=list(rows[value]), height=0.7, color=colour)
    return p


def top_plot(top: pd.DataFrame, verts: pd.DataFrame | None = None) -> LayoutDOM:
    """The top products, two tabs: most recommended (users each is recommended to) and, with the
    vertices' PageRank, highest PageRank in the recommendation graph."""
    rec = top[top["graph"] == "recommendations"].sort_values("rank")
    by_users = bars(rec, "users", "Most recommended products (users each is recommended to)",
                    "users", "darkorange")
    if verts is None or "pagerank" not in verts:
        return by_users
    products = verts[verts["type"] == "product"].rename(columns={"original_id": "product_id"})
    ranked = products.sort_values(["pagerank", "product_id"], ascending=[False, True]).head(
        TOP_SHOWN)
    by_rank = bars(ranked, "pagerank", "Products of highest PageRank in the recommendation "
                   "graph (GraphX; mean 1)", "PageRank", "seagreen")
    return Tabs(tabs=[TabPanel(child=by_users, title="by recommendations"),
                      TabPanel(child=by_rank, title="by PageRank")])


def build_layout(where: Path) -> LayoutDOM:
    """The three views of one export folder, one under the other."""
    edges = pd.read_csv(where / "edges.csv", dtype={"user_id": str, "product_id": str})
    verts = pd.read_csv(where / "vertices.csv", dtype={"original_id": str, "description": str})
    products = verts[verts["type"] == "product"].dropna(subset=["description"])
    names = dict(zip(products["original_id"], products["description"], strict=True))
    dist = pd.read_csv(where / "degree_distribution.csv")
    top = pd.read_csv(where / "top_products.csv", dtype={"product_id": str})
    measures = verts[["id", "pagerank", "community"]] if "pagerank" in verts else None
    return column(network(edges, names, measures=measures), degree_plot(dist),
                  top_plot(top, verts))


def render(where: Path) -> str:
    """The standalone HTML page of an export folder."""
    summary = json.loads((where / "summary.json").read_text())
    title = f"recsys graph of model {summary['model_version']}"
    return file_html(build_layout(where), resources=INLINE, title=title)


def cli(settings: Settings, args: argparse.Namespace) -> int:
    """`recsys report`: write the page of a model version's export (default: the newest)."""
    version = args.model_version or latest_version(settings.export_dir)
    where = Path(settings.export_dir) / str(version)
    if version is None or not (where / "summary.json").exists():
        which = "" if version is None else f" of model {version}"
        print(f"recsys report: no graph export{which} under {settings.export_dir} "
              "(RECSYS_EXPORT_DIR); train a model first", file=sys.stderr)
        return 1
    output = Path(args.output) if args.output else where / "report.html"
    tmp = output.with_name(output.name + ".tmp")
    tmp.write_text(render(where), encoding="utf-8")
    tmp.replace(output)
    print(f"report of model {version}: {output}")
    return 0
