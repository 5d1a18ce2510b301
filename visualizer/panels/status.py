"""The banner: 'waiting for data: n of N events' before the first model, then the figures of the
model in service next to its baseline, the newest model's status when it is not the one in
service (rejected by the gate, or demoted by a rollback), and the shadow comparison: the
rejected challenger's online hit-rate beside the champion's."""

from __future__ import annotations

import html

from bokeh.models import Div, InlineStyleSheet

from schemas.millis import from_ms
from visualizer.panels.stream import TRAINING
from visualizer.state import FEEDBACK, MODELS, STREAM, DashboardState


def shadow_html(shadow: dict | None) -> str:
    """'shadow: challenger v5 hit-rate 0.0410 (1,234 sales) vs v4 in service 0.0520 (...)'."""
    if not shadow:
        return ""

    def rate(role: str) -> str:
        r = shadow[f"{role}_hit_rate"]
        return "no feedback yet" if r is None else f"{r:.4f} ({shadow[f'{role}_sales']:,} sales)"

    champion = shadow["champion"]
    return (f'<span class="recsys-shadow"><b>shadow:</b> challenger v{shadow["challenger"]} '
            f"online hit-rate {rate('challenger')} vs "
            + (f"v{champion} in service {rate('champion')}" if champion is not None
               else "no model in service") + "</span>")


def banner_html(status: dict, eval_k: int) -> str:
    n, threshold = status["n"], status["threshold"]
    newest = status["model"]
    model = status.get("serving") or newest
    if model is None:
        head = (
            f'<span class="recsys-waiting">Waiting for data: {n:,} of {threshold:,} events'
            "</span> before the first model is trained."
        )
        if not status["caught_up"]:
            head += f" (reading history: {status['records']:,} records so far)"
        return f'<div class="recsys-banner waiting">{head}</div>'
    when = from_ms(model.trained_at_ms).strftime("%Y-%m-%d %H:%M:%S")

    def fig(name: str, label: str) -> str:
        ours, base = model.metrics.get(name), model.baseline.get(name)
        if ours is None:
            return ""
        text = f"<b>{label}</b> {ours:.4f}"
        return text + (f" (baseline {base:.4f})" if base is not None else "")

    serves = status.get("serving_version") == model.version
    parts = [
        f"<b>Model v{model.version}</b> " + ("serving, " if serves else f"{model.status}, ")
        + f"trained {when} UTC ({html.escape(model.trigger)})",
        f"{model.events:,} events, {model.users:,} users × {model.products:,} products",
        fig("rmse", "RMSE"),
        fig("precision_at_k", f"precision@{eval_k}"),
        fig("ndcg_at_k", f"NDCG@{eval_k}"),
        f"next model: {n:,} of {threshold:,} events"
        + (TRAINING if threshold and n >= threshold else ""),
    ]
    if newest is not None and newest.version != model.version:
        parts.append(f'<span class="recsys-{newest.status}">newest v{newest.version} '
                     f"{newest.status}</span>"
                     + (f" ({html.escape(newest.status_reason)})" if newest.status_reason else ""))
    parts.append(shadow_html(status.get("shadow")))
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
.recsys-rejected { color: #b03030; font-weight: 600; }
.recsys-promoted { color: #2a7a2a; font-weight: 600; }
.recsys-shadow { white-space: nowrap; }
"""


class StatusPanel:
    parts = (MODELS, STREAM, FEEDBACK)

    def __init__(self, eval_k: int) -> None:
        self.k = eval_k
        self.div = Div(text="", name="banner", sizing_mode="stretch_width", 
                       stylesheets=[InlineStyleSheet(css=CSS)])
        self.layout = self.div

    def refresh(self, state: DashboardState) -> None:
        text = banner_html(state.status(), self.k)
        if text != self.div.text:
            self.div.text = text
