"""`recsys report`: one standalone HTML page (Bokeh, resources inlined: it opens offline) from a
graph export folder (`spark.graph_export`), with three views:

- the user -> product network, sampled: the most recommended products and a capped number of
  their users (the smallest user ids, so the same export gives the same picture);
- the degree distribution of products, log-log, recommendations next to purchases (degree 0,
  which a log axis cannot show, is left out and counted in the title);
- the most recommended products, as a bar chart.

PageRank is not shown: it awaits the GraphFrames jar.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd
from bokeh.embed import file_html
from bokeh.layouts import column
from bokeh.models import ColumnDataSource, HoverTool, LayoutDOM
from bokeh.plotting import figure
from bokeh.resources import INLINE

from recsys.settings import Settings

NETWORK_PRODUCTS = 15
NETWORK_USERS = 150


def latest_version(export_dir: Path) -> int | None:
    """The highest numbered export folder with a summary.json (a complete one), or None."""
    done = [int(p.name) for p in Path(export_dir).glob("*") if p.name.isdigit()
            and (p / "summary.json").exists()]
    return max(done, default=None)


def network(edges: pd.DataFrame, descriptions: dict[str, str], products: int = NETWORK_PRODUCTS,
            users: int = NETWORK_USERS) -> figure:
    """Users (left) linked to the `products` most recommended products (right), for at most
    `users` of their users."""
    counts = edges.groupby("product_id")["user_id"].nunique().reset_index(name="users")
    picked = counts.sort_values(["users", "product_id"], ascending=[False, True]).head(products)
    shown = edges[edges["product_id"].isin(picked["product_id"])]
    user_ids = sorted(shown["user_id"].unique())[:users]
    shown = shown[shown["user_id"].isin(user_ids)]
    y_user = {u: i / max(len(user_ids) - 1, 1) for i, u in enumerate(user_ids)}
    order = list(picked["product_id"])
    y_product = {p: i / max(len(order) - 1, 1) for i, p in enumerate(order)}
    p = figure(
        title=f"Recommendation network: the {len(order)} most recommended products and "
        f"{len(user_ids)} of their users (smallest ids, at most {users})",
        width=900, height=600, x_range=(-0.2, 1.2), tools="pan,wheel_zoom,reset,save",
    )
    p.segment(x0=0, y0=[y_user[u] for u in shown["user_id"]], x1=1,
              y1=[y_product[x] for x in shown["product_id"]], line_alpha=0.15, color="gray")
    p.scatter(x=[0] * len(user_ids), y=[y_user[u] for u in user_ids], size=4, color="steelblue",
              legend_label="users")
    products_src = ColumnDataSource({
        "x": [1] * len(order), "y": [y_product[x] for x in order], "product_id": order,
        "description": [descriptions.get(x, "") for x in order],
        "users": list(picked["users"]),
    })
    dots = p.scatter("x", "y", source=products_src, size=10, color="darkorange",
                     legend_label="products")
    p.add_tools(HoverTool(renderers=[dots], tooltips=[
        ("product", "@product_id"), ("description", "@description"), ("users", "@users")]))
    p.axis.visible = False
    p.grid.visible = False
    return p


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


def top_plot(top: pd.DataFrame) -> figure:
    """The most recommended products, most at the top."""
    rec = top[top["graph"] == "recommendations"].sort_values("rank")
    labels = [f"{pid} {str(d)[:30] if isinstance(d, str) else ''}".strip()
              for pid, d in zip(rec["product_id"], rec["description"], strict=True)]
    p = figure(title="Most recommended products (users each is recommended to)",
               y_range=list(reversed(labels)), width=900, height=30 * len(labels) + 80,
               x_axis_label="users")
    p.hbar(y=labels, right=list(rec["users"]), height=0.7, color="darkorange")
    return p


def build_layout(where: Path) -> LayoutDOM:
    """The three views of one export folder, one under the other."""
    edges = pd.read_csv(where / "edges.csv", dtype={"user_id": str, "product_id": str})
    verts = pd.read_csv(where / "vertices.csv", dtype={"original_id": str, "description": str})
    products = verts[verts["type"] == "product"].dropna(subset=["description"])
    names = dict(zip(products["original_id"], products["description"], strict=True))
    dist = pd.read_csv(where / "degree_distribution.csv")
    top = pd.read_csv(where / "top_products.csv", dtype={"product_id": str})
    return column(network(edges, names), degree_plot(dist), top_plot(top))


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
