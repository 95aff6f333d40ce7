"""/metrics, /healthz and /readyz over a stdlib HTTP server on its own thread.

/healthz: the process is alive and the pipeline loop ticked recently (a wedged loop turns it 503).
/readyz: the bundle is loaded and the broker accepted our connection.
"""
from __future__ import annotations

import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from prometheus_client.exposition import CONTENT_TYPE_LATEST

log = logging.getLogger(__name__)

Check = Callable[[], tuple[bool, str]]


class HttpServer:
    def __init__(self, host: str, port: int, exposition: Callable[[], bytes], healthy: Check, ready: Check):
        routes = {
            "/metrics": lambda: (200, CONTENT_TYPE_LATEST, exposition()),
            "/healthz": lambda: _check(healthy),
            "/readyz": lambda: _check(ready),
        }

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (stdlib name)
                route = routes.get(self.path.split("?", 1)[0])
                if route is None:
                    code, ctype, body = 404, "text/plain; charset=utf-8", b"not found\n"
                else:
                    try:
                        code, ctype, body = route()
                    except Exception as e:  # a failing probe must answer, not hang the scraper
                        log.exception("http %s failed", self.path)
                        code, ctype, body = 500, "text/plain; charset=utf-8", f"error: {e}\n".encode()
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt: str, *args) -> None:  # scrapes every 15 s would flood the journal
                log.debug("http: " + fmt, *args)

        try:
            self._server = ThreadingHTTPServer((host, port), Handler)
        except OSError as e:
            raise OSError(f"cannot serve metrics on {host}:{port}: {e.strerror}") from None
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="http", daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def start(self) -> "HttpServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread.is_alive():  # shutdown() would wait forever for a loop that never ran
            self._server.shutdown()
        self._server.server_close()


def _check(fn: Check) -> tuple[int, str, bytes]:
    ok, why = fn()
    return (200 if ok else 503), "text/plain; charset=utf-8", (("ok" if ok else "unavailable") + (f": {why}" if why else "") + "\n").encode()
