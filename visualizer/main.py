"""The dashboard document, built once per browser session (Bokeh runs this file per session).

Every session draws the one shared `DashboardState` that the server's feed fills. Sessions never
read Kafka: a periodic callback (on the session's own thread of control, so no locking of the
document is needed) compares the state's revision counters with what it last drew and redraws
only the panels whose data changed — model, graph and feedback changes at once (within
`TICK_MS`), stream figures at most once a second.
"""

from __future__ import annotations

import time

from bokeh.io import curdoc
from bokeh.layouts import column, row
from bokeh.models import Div

from visualizer import feed
from visualizer.panels.degrees import DegreesPanel
from visualizer.panels.feedback import FeedbackPanel
from visualizer.panels.history import HistoryPanel
from visualizer.panels.network import NetworkPanel
from visualizer.panels.status import StatusPanel
from visualizer.panels.stream import StreamPanel
from visualizer.panels.top_products import TopProductsPanel
from visualizer.state import STREAM

TICK_MS = 200
STREAM_EVERY_S = 1.0

state = feed.shared_state()
k = state.eval_k
status = StatusPanel(k)
network = NetworkPanel(state, feed.settings().export_dir)  # GraphX figures from the export
degrees = DegreesPanel()
top = TopProductsPanel(feed.settings().export_dir)
history = HistoryPanel(k)
stream = StreamPanel()
fb = FeedbackPanel(k)
panels = [status, network, degrees, top, history, stream, fb]

header = Div(
    text='<h1 class="recsys-title">recsys · live recommendations</h1>',
    sizing_mode="stretch_width",
)
layout = column(
    header,
    status.layout,
    row(network.layout, column(top.layout, degrees.layout, sizing_mode="stretch_width"),
        sizing_mode="stretch_width"),
    stream.layout,
    row(history.layout, fb.layout, sizing_mode="stretch_width"),
    sizing_mode="stretch_width",
    name="dashboard",
)

drawn: dict[int, tuple[int, ...]] = {}
last_at: dict[int, float] = {}


def tick() -> None:
    """Redraw what changed since this session last looked."""
    revs = state.revisions()
    now = time.monotonic()
    for i, panel in enumerate(panels):
        key = tuple(revs[p] for p in panel.parts)
        old = drawn.get(i)
        periodic = panel is stream and now - last_at.get(i, 0.0) >= STREAM_EVERY_S
        if key == old and not periodic:
            continue
        only_stream = old is not None and all(
            a == b for part, a, b in zip(panel.parts, key, old, strict=True) if part != STREAM
        )
        if only_stream and now - last_at.get(i, 0.0) < STREAM_EVERY_S:
            continue
        panel.refresh(state)
        drawn[i] = key
        last_at[i] = now


tick()  # a new session shows the current state at once
doc = curdoc()
doc.title = "recsys dashboard"
doc.add_root(layout)
doc.add_periodic_callback(tick, TICK_MS)
