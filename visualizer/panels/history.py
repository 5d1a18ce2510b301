"""Model history: offline metrics per model version next to the popularity baseline (RMSE on one
plot, precision@k and NDCG@k on the other), from `model-ready`. Each version's marker says what
the gate (or a manual promotion) decided: a filled circle for promoted, a red cross for rejected,
a star around the version in service; the titles end with "serving: vN"."""

from __future__ import annotations

import math

from bokeh.layouts import row
from bokeh.models import ColumnDataSource, HoverTool
from bokeh.plotting import figure
from bokeh.transform import factor_cmap, factor_mark

from schemas.topics import PROMOTED, REJECTED
from visualizer.state import MODELS, DashboardState

NAN = math.nan
STATUSES = [PROMOTED, REJECTED]
RMSE_TITLE = "RMSE per model version (lower is better)"


def markers() -> dict:
    """A filled circle for promoted, a cross for rejected: a new mapper per use (a Bokeh model
    belongs to one document, and each session builds its own)."""
    return factor_mark("status", ["circle", "x"], STATUSES)


class HistoryPanel:
    parts = (MODELS,)

    def __init__(self, eval_k: int) -> None:
        self.k = eval_k
        cols = ("version", "rmse", "base_rmse", "precision", "base_precision", "ndcg",
                "base_ndcg", "recall", "map", "coverage", "events", "trigger", "status",
                "reason", "serving")
        self.source = ColumnDataSource({c: [] for c in cols}, name="history")
        # The version in service, ringed by a star on both plots.
        self.serving = ColumnDataSource(dict(version=[], rmse=[], precision=[]),
                                        name="history-serving")
        self.rank_title = f"precision@{eval_k} and NDCG@{eval_k} (higher is better)"
        common = dict(height=300, sizing_mode="stretch_width", x_axis_label="model version",
                      tools="pan,wheel_zoom,reset,save", toolbar_location="above")
        rmse = figure(title=RMSE_TITLE, name="history-rmse", **common)
        rmse.line("version", "rmse", source=self.source, line_width=2, color="#1f77b4",
                  legend_label="ALS")
        r1 = rmse.scatter("version", "rmse", source=self.source, size=9, marker=markers(),
                          color=factor_cmap("status", ["#1f77b4", "#d62728"], STATUSES),
                          line_width=2, legend_label="ALS")
        rmse.line("version", "base_rmse", source=self.source, line_dash="dashed",
                  color="#7f7f7f", legend_label="popularity baseline")
        rmse.scatter("version", "base_rmse", source=self.source, size=6, color="#7f7f7f",
                     marker="square", legend_label="popularity baseline")
        rank = figure(title=self.rank_title, name="history-ranking", **common)
        for col, color, label in (("precision", "#2ca02c", f"precision@{eval_k}"),
                                  ("ndcg", "#9467bd", f"NDCG@{eval_k}")):
            rank.line("version", col, source=self.source, line_width=2, color=color,
                      legend_label=f"ALS {label}")
            rank.scatter("version", col, source=self.source, size=9, marker=markers(),
                         color=factor_cmap("status", [color, "#d62728"], STATUSES),
                         line_width=2, legend_label=f"ALS {label}")
            rank.line("version", f"base_{col}", source=self.source, line_dash="dashed",
                      color=color, alpha=0.6, legend_label=f"baseline {label}")
            rank.scatter("version", f"base_{col}", source=self.source, size=6, color=color,
                         alpha=0.6, marker="square", legend_label=f"baseline {label}")
        for f, col in ((rmse, "rmse"), (rank, "precision")):
            f.scatter("version", col, source=self.serving, size=22, marker="star",
                      fill_alpha=0, line_color="#ff7f0e", line_width=2,
                      legend_label="in service")
        tips = [("version", "@version"), ("status", "@status @serving"),
                ("reason", "@reason"), ("trigger", "@trigger"), ("events", "@events"),
                ("RMSE", "@rmse{0.0000} (baseline @base_rmse{0.0000})"),
                (f"precision@{eval_k}", "@precision{0.0000} (baseline @base_precision{0.0000})"),
                (f"NDCG@{eval_k}", "@ndcg{0.0000} (baseline @base_ndcg{0.0000})"),
                (f"recall@{eval_k}", "@recall{0.0000}"), (f"MAP@{eval_k}", "@map{0.0000}"),
                ("coverage", "@coverage{0.000}")]
        rmse.add_tools(HoverTool(renderers=[r1], tooltips=tips, mode="vline"))
        rank.add_tools(HoverTool(renderers=[rank.renderers[1]], tooltips=tips, mode="vline"))
        for f in (rmse, rank):
            f.legend.location = "top_left"
            f.legend.background_fill_alpha = 0.6
            f.legend.label_text_font_size = "8pt"
            f.xaxis.ticker.desired_num_ticks = 6
            f.xaxis.ticker.min_interval = 1  # versions are integers
        self.rmse, self.rank = rmse, rank
        self.layout = row(rmse, rank, sizing_mode="stretch_width")

    def refresh(self, state: DashboardState) -> None:
        models = state.model_history()
        if not models:
            return
        serving = state.serving_version()

        def m(name: str, base: bool = False) -> list[float]:
            return [(x.baseline if base else x.metrics).get(name, NAN) for x in models]

        self.source.data = dict(
            version=[x.version for x in models],
            rmse=m("rmse"), base_rmse=m("rmse", True),
            precision=m("precision_at_k"), base_precision=m("precision_at_k", True),
            ndcg=m("ndcg_at_k"), base_ndcg=m("ndcg_at_k", True),
            recall=m("recall_at_k"), map=m("map_at_k"), coverage=m("coverage"),
            events=[x.events for x in models], trigger=[x.trigger for x in models],
            status=[x.status for x in models], reason=[x.status_reason for x in models],
            serving=["(serving)" if x.version == serving else "" for x in models],
        )
        held = [x for x in models if x.version == serving]
        self.serving.data = dict(version=[x.version for x in held],
                                 rmse=[x.metrics.get("rmse", NAN) for x in held],
                                 precision=[x.metrics.get("precision_at_k", NAN) for x in held])
        label = f" · serving: v{serving}" if serving is not None else " · serving: none"
        rejected = sum(x.status == REJECTED for x in models)
        label += f" · {rejected} rejected" if rejected else ""
        self.rmse.title.text = RMSE_TITLE + label
        self.rank.title.text = self.rank_title + label
