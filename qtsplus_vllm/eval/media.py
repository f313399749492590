"""How the server gets the videos: ``file://`` URLs, or a small HTTP server the client starts.

- ``file``: ``file:///abs/path.mp4``. The endpoint must run on this machine (or see the same
  paths) and be started with ``--allowed-local-media-path`` covering the videos.
- ``http``: a threaded HTTP server in this process serves exactly the evaluated videos (nothing
  else: each gets an opaque path), on ``host:port``; ``public_host`` is the name the endpoint uses
  to reach it (default ``host``). Needs no server flag, works for a remote endpoint that can reach
  this machine.
"""

from __future__ import annotations

import http.server
import shutil
import threading
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import quote

CHUNK = 1 << 20


def file_url(path: Path) -> str:
    return path.resolve().as_uri()


class VideoServer:
    """Serves ``videos`` over HTTP in a daemon thread; use as a context manager, then :meth:`url`."""

    def __init__(
        self, videos: Iterable[Path], host: str = "127.0.0.1", port: int = 0, public_host: str | None = None
    ):
        self._routes: dict[str, Path] = {}
        self._urls: dict[Path, str] = {}
        for k, video in enumerate(sorted({Path(v).resolve() for v in videos})):
            route = f"/v/{k}/{quote(video.name)}"
            self._routes[route] = video
            self._urls[video] = route
        routes = self._routes

        class Handler(http.server.BaseHTTPRequestHandler):
            def _send(self, body: bool) -> None:
                path = routes.get(self.path.split("?", 1)[0])
                if path is None or not path.is_file():
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header(
                    "Content-Type", "video/mp4" if path.suffix == ".mp4" else "application/octet-stream"
                )
                self.send_header("Content-Length", str(path.stat().st_size))
                self.end_headers()
                if body:
                    with path.open("rb") as f:
                        shutil.copyfileobj(f, self.wfile, CHUNK)

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                self._send(body=True)

            def do_HEAD(self) -> None:  # noqa: N802
                self._send(body=False)

            def log_message(self, *args) -> None:  # quiet
                pass

        self._server = http.server.ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self.host = public_host or host
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="qtsplus-eval-videos", daemon=True
        )

    def url(self, video: Path) -> str:
        return f"http://{self.host}:{self.port}{self._urls[Path(video).resolve()]}"

    def __enter__(self) -> VideoServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
