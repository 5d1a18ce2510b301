"""`recsys dashboard`: the Bokeh server for the directory app beside this file.

Started programmatically (not through `bokeh serve`) so the same settings object the CLI built —
RECSYS_* variables under the command's flags — reaches the feed, and so SIGTERM stops the feed and
the server cleanly. `bokeh serve visualizer/` works too and reads the settings from the
environment.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from recsys.settings import Settings, override

log = logging.getLogger(__name__)

APP_DIR = Path(__file__).resolve().parent


def origins(settings: Settings) -> list[str]:
    """The websocket origins a browser may load the page from."""
    if settings.dashboard_allow_websocket_origin:
        return list(settings.dashboard_allow_websocket_origin)
    port = settings.dashboard_port
    return [f"localhost:{port}", f"127.0.0.1:{port}"]


def _with_flags(settings: Settings, args: argparse.Namespace) -> Settings:
    """Settings with the command's flags on top (validated like the environment)."""
    return override(
        settings,
        dashboard_host=getattr(args, "host", None),
        dashboard_port=getattr(args, "port", None),
        dashboard_allow_websocket_origin=getattr(args, "allow_websocket_origin", None),
    )


def build_server(settings: Settings) -> Any:
    """A started-but-not-running Bokeh server serving the dashboard at `/`."""
    from bokeh.application import Application
    from bokeh.application.handlers.directory import DirectoryHandler
    from bokeh.server.server import Server

    from visualizer import feed

    feed.configure(settings)
    app = Application(DirectoryHandler(filename=str(APP_DIR)))
    return Server(
        {"/": app},
        address=settings.dashboard_host,
        port=settings.dashboard_port,
        allow_websocket_origin=origins(settings),
        **auth_options(settings),
    )


def auth_options(settings: Settings) -> dict[str, Any]:
    """Bokeh server options putting the dashboard behind RECSYS_DASHBOARD_TOKEN (none: open)."""
    token = settings.dashboard_token.get_secret_value()
    if not token:
        return {}
    from visualizer.auth import TokenAuth

    return {"auth_provider": TokenAuth(token)}


def token_problem(settings: Settings) -> str | None:
    """The line refusing to serve the dashboard without a token while Kafka is secured."""
    from recsys.security import token_problem as problem

    return problem(settings, "dashboard_token", "the dashboard would show purchases and lists")


def cli(settings: Settings, args: argparse.Namespace) -> int:
    settings = _with_flags(settings, args)
    if (problem := token_problem(settings)) is not None:  # before any network I/O
        print(f"recsys: {problem}", file=sys.stderr)
        return 2
    try:
        server = build_server(settings)
    except OSError as exc:  # the port is taken, or the address is not this machine's
        log.error("cannot listen on %s:%d: %s", settings.dashboard_host,
                  settings.dashboard_port, exc)
        from visualizer import feed

        feed.stop()
        return 1
    server.start()
    url = f"http://{settings.dashboard_host}:{server.port}/"
    log.info("dashboard on %s (Kafka %s, websocket origins %s)", url, settings.kafka_bootstrap,
             ",".join(origins(settings)))
    print(f"recsys dashboard: {url}", flush=True)
    loop = server.io_loop
    stopping = []

    def _shutdown(signum: int) -> None:
        if stopping:
            return
        stopping.append(signum)
        log.info("signal %d: stopping the dashboard", signum)
        server.unlisten()
        server.stop()  # runs on_server_unloaded: the feed stops and closes its consumer
        loop.stop()

    aio = loop.asyncio_loop  # type: ignore[attr-defined]
    for sig in (signal.SIGTERM, signal.SIGINT):
        aio.add_signal_handler(sig, _shutdown, sig)
    if getattr(args, "show", False):
        loop.add_callback(server.show, "/")
    loop.start()
    from visualizer import feed

    feed.stop()
    log.info("dashboard stopped")
    return 0
