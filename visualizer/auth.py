"""The dashboard behind a token (`RECSYS_DASHBOARD_TOKEN`), through Bokeh's own auth hooks.

Bokeh asks its `AuthProvider` for the user of every request: the page, its static files and the
websocket. A request is the dashboard's user when it carries the token as `?token=` (the link
you open once; a cookie then keeps it, HttpOnly and SameSite=Strict, so the websocket the page
opens carries it too), as `Authorization: Bearer`, or in that cookie. Anyone else is sent to
/login, which answers 401 and says how to get in. Tokens are compared in constant time and
never logged. The websocket-origin check (`allow_websocket_origin`) stays on either way: a page
from another origin cannot open the socket even with the cookie.
"""

from __future__ import annotations

import hmac
import logging
import re
from typing import Any

from bokeh.server.auth_provider import AuthProvider
from tornado.web import RequestHandler

COOKIE = "recsys_dashboard_token"
USER = "dashboard"


def _given(handler: RequestHandler) -> tuple[str | None, bool]:
    """(the token the request carries, whether it came in the query)."""
    query = handler.get_query_argument("token", None)
    if query:
        return query, True
    scheme, _, value = (handler.request.headers.get("Authorization") or "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip(), False
    return handler.get_cookie(COOKIE), False


class LoginHandler(RequestHandler):
    def get(self) -> None:
        self.set_status(401)
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.finish("This recsys dashboard asks for a token: open it once as "
                    "/?token=<RECSYS_DASHBOARD_TOKEN> (with `recsys up` or `recsys demo` on the "
                    "secured local broker: the file <data_dir>/kafka/security/dashboard.token).\n")


_IN_QUERY = re.compile(r"([?&]token=)[^&\s]*")


class HideTokenInAccessLog(logging.Filter):
    """Tornado's access log prints each request's URI, `?token=` included: masked here."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if "token=" in text:
            record.msg, record.args = _IN_QUERY.sub(r"\1***", text), ()
        return True


class TokenAuth(AuthProvider):
    def __init__(self, token: str) -> None:
        self._token = token.encode()
        super().__init__()
        access = logging.getLogger("tornado.access")
        if not any(isinstance(f, HideTokenInAccessLog) for f in access.filters):
            access.addFilter(HideTokenInAccessLog())

    def _user(self, handler: RequestHandler) -> str | None:
        given, from_query = _given(handler)
        if not given or not hmac.compare_digest(given.encode(), self._token):
            return None
        if from_query:  # the link opened once: keep the token for the page's own requests
            handler.set_cookie(COOKIE, given, httponly=True, samesite="Strict", path="/")
        return USER

    @property
    def get_user(self) -> Any:
        return self._user

    @property
    def login_url(self) -> str:
        return "/login"

    @property
    def login_handler(self) -> type[RequestHandler]:
        return LoginHandler
