"""The banner: 'waiting for data: n of N events' before the first model, then the current model's
figures next to its baseline."""

from __future__ import annotations

import html
from datetime import UTC, datetime

from bokeh.models import Div, InlineStyleSheet

from visualizer.panels.stream import TRAINING
from visualizer.state import MODELS, STREAM, DashboardState


def banner_html(status: dict, eval_k: int) -> str:
    n, threshold = status["n"], status["threshold"]
    model = status["model"]
    if model is None:
        head = (
            f'<span class="recsys-waiting">Waiting for data: {n:,} of {threshold:,} events'
            "</span> before the first model is trained."
        )
        if not status["caught_up"]:
            head += f" (reading history: {status['records']:,} records so far)"
        return f'<div class="recsys-banner waiting">{head}</div>'
    when = datetime.fromtimestamp(model.trained_at_ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")

    def fig(name: str, label: str) -> str:
        ours, base = model.metrics.get(name), model.baseline.get(name)
        if ours is None:
            return ""
        text = f"<b>{label}</b> {ours:.4f}"
        return text + (f" (baseline {base:.4f})" if base is not None else "")

    parts = [
        f"<b>Model v{model.version}</b> trained {when} UTC ({html.escape(model.trigger)})",
        f"{model.events:,} events, {model.users:,} users × {model.products:,} products",
        fig("rmse", "RMSE"),
        fig("precision_at_k", f"precision@{eval_k}"),
        fig("ndcg_at_k", f"NDCG@{eval_k}"),
        f"next model: {n:,} of {threshold:,} events"
        + (TRAINING if threshold and n >= threshold else ""),
    ]
    if not status["caught_up"]:
        parts.append(f"reading history: {status['records']:,} records")
    bad = sum(status["bad"].values())
    if bad:
        parts.append(f"{bad:,} undecodable records skipped")
    return '<div class="recsys-banner">' + " · ".join(p for p in parts if p) + "</div>"


CSS = """
.recsys-banner { font-size: 14px; padding: 8px 12px; border-radius: 6px; background: #eef5fb;
  border: 1px solid #c6dcef; color: #223; line-height: 1.5; }
.recsys-banner.waiting { background: #fff6e0; border-color: #f0d28a; }
.recsys-waiting { font-size: 20px; font-weight: 600; color: #8a5a00; }
"""


class StatusPanel:
    parts = (MODELS, STREAM)

    def __init__(self, eval_k: int) -> None:
        self.k = eval_k
        self.div = Div(text="", name="banner", sizing_mode="stretch_width", 
                       stylesheets=[InlineStyleSheet(css=CSS)])
        self.layout = self.div

    def refresh(self, state: DashboardState) -> None:
        text = banner_html(state.status(), self.k)
        if text != self.div.text:
            self.div.text = text
