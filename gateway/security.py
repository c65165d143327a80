"""HTTP security headers that Django's own ``SecurityMiddleware`` does not set: a Content-Security-Policy.

The console needs nothing but its own origin: one module script and one stylesheet from ``/static/``, a JSON data
block (``json_script``, never executed), and a WebSocket to ``/ws/`` on the same host. Everything a device sends is
put into the page as text (``textContent``, ``setAttribute``), so the policy can forbid inline scripts, inline
styles and event-handler attributes outright: a string that did slip through as markup would still not run.

``connect-src 'self'`` also covers ``ws:``/``wss:`` to the page's own host and port (CSP Level 3; the browser test in
``tests/gateway/test_console_browser.py`` checks it in Chromium), so no WebSocket source is listed separately.

The other headers (HSTS, nosniff, Referrer-Policy, X-Frame-Options, secure cookies, the HTTPS redirect) are Django's
own settings, in ``config/settings.py``.
"""

from __future__ import annotations

from django.http import HttpRequest, HttpResponseBase
from django.utils.deprecation import MiddlewareMixin

CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",  # data: for the empty favicon (<link rel="icon" href="data:,">)
        "connect-src 'self'",
        "font-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)

HEADER = "Content-Security-Policy"


class SecurityHeadersMiddleware(MiddlewareMixin):
    """Adds ``CONTENT_SECURITY_POLICY`` to every response that has no policy of its own (sync and async)."""

    def process_response(self, request: HttpRequest, response: HttpResponseBase) -> HttpResponseBase:
        if HEADER not in response:
            response[HEADER] = CONTENT_SECURITY_POLICY
        return response
