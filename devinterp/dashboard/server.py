"""A local dashboard server over a folder of run directories (``devinterp dashboard ROOT --serve``).

Routes (all ``GET``; anything else is 404):

- ``/``                               index of the runs under ROOT (any folder with ``llc.csv``)
- ``/run/<path>``                     the dashboard of one run (``<path>`` relative to ROOT)
- ``/compare?run=<path>&run=<path>``  several runs overlaid
- ``/api/runs``                       the index as JSON (the index page polls it)
- ``/api/page?run=<path>[&run=...][&known=SIG]``  a page model as JSON (run pages poll it for
  new λ̂ rows; with the signature of the model they have, an unchanged page is a few bytes)
- ``/api/trace?run=<path>&step=<n>``  the loss trace (chain × draw) of one checkpoint
- ``/static/plotly.js``               plotly.js from the installed ``plotly`` package

It serves no file by path: every ``<path>`` is resolved (symlinks included) and must be ROOT or
a folder below it holding ``llc.csv``, else the answer is 403 (outside ROOT) or 404. Every file
of a run that is read (its tables, JSON documents and loss traces) must resolve inside ROOT and
be a regular file: a symlink out of ROOT is refused, and a FIFO or device never blocks a reader.
A request whose ``Host`` header names neither this machine nor an IP address is refused, so a
web page that rebinds its own domain name to 127.0.0.1 cannot read the runs. A run that cannot
be read shows its error in its own row of the index; the other runs stay listed. Pages are
rebuilt only when a file in the run directory changes (size or modification time).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import socket
import stat
import sys
import threading
from collections import OrderedDict
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

from devinterp.dashboard import assets
from devinterp.dashboard.figures import health_flags
from devinterp.dashboard.page import (
    CSP,
    build_page,
    fill,
    render_html,
    script_json,
    trace_payload,
)
from devinterp.run.store import (
    COMPONENT_STAGES_FILE,
    COMPONENTS_FILE,
    INFLUENCE_DIR,
    LLC_FILE,
    METRICS_FILE,
    RUN_FILE,
    SETTINGS_FILE,
    SNAPSHOT_DIR,
    STAGES_FILE,
    SUSCEPTIBILITIES_FILE,
    TRACE_DIR,
    Run,
    load_run,
)

LOOPBACK = ("127.0.0.1", "localhost", "::1")
_SKIP_DIRS = {SNAPSHOT_DIR, TRACE_DIR, INFLUENCE_DIR, "__pycache__", "node_modules"}
#: The files of a run directory that :func:`devinterp.run.store.load_run` reads.
_RUN_FILES = (LLC_FILE, METRICS_FILE, SETTINGS_FILE, RUN_FILE, STAGES_FILE, COMPONENTS_FILE,
              COMPONENT_STAGES_FILE, SUSCEPTIBILITIES_FILE)
#: Its folders whose files loading it reads (checked like the files above), by suffix.
_RUN_DIRS = ((TRACE_DIR, ".npy"), (INFLUENCE_DIR, (".csv", ".npy")))
#: A client that goes away mid-answer (a closed tab, a poll cut short): not worth a traceback.
_DISCONNECTS = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError)


class HTTPError(Exception):
    """An answer other than 200, with a message for the page."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def find_runs(root: Path) -> list[Path]:
    """Run directories under ``root`` (itself included): folders with an ``llc.csv`` entry
    (whatever its kind: a bad one is reported in the index, not skipped silently)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in _SKIP_DIRS)
        if LLC_FILE in filenames:
            found.append(Path(dirpath))
    return found


def check_run_files(root: Path, run_dir: Path) -> None:
    """Raise :class:`HTTPError` 403 unless every file that loading ``run_dir`` reads resolves
    inside ``root`` and is a regular file.

    A symlink in a run folder could otherwise serve a file from anywhere, and a FIFO would block
    the reading thread forever.
    """
    candidates = [run_dir / name for name in _RUN_FILES]
    for name, suffixes in _RUN_DIRS:
        folder = run_dir / name
        if os.path.lexists(folder):
            _require_inside(root, folder)
            if folder.is_dir():
                with os.scandir(folder) as it:
                    candidates += [folder / e.name for e in it if e.name.endswith(suffixes)]
    for path in candidates:
        if not os.path.lexists(path):
            continue
        _require_inside(root, path)
        try:
            mode = os.stat(path).st_mode
        except OSError as e:
            raise HTTPError(403, f"{_rel(root, path)} cannot be read ({e.strerror})") from e
        if not stat.S_ISREG(mode):
            raise HTTPError(403, f"{_rel(root, path)} is not a regular file; the dashboard "
                                 "reads only regular files")


def _require_inside(root: Path, path: Path) -> None:
    target = path.resolve()
    if target != root and root not in target.parents:
        raise HTTPError(403, f"{_rel(root, path)} links outside the served folder")


def _rel(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)


def dir_signature(path: Path) -> tuple:
    """Names, sizes and modification times of a run directory's files (and its traces and
    influence folders: a new checkpoint's file changes the folder's modification time).

    Symlinks are followed (their targets were checked by :func:`check_run_files`), so a link
    to a table that grows still changes the signature.
    """
    entries = []
    with os.scandir(path) as it:
        for e in it:
            if e.name.startswith("."):
                continue
            if e.is_file() or e.name in (TRACE_DIR, INFLUENCE_DIR):
                st = e.stat()
                entries.append((e.name, st.st_mtime_ns, st.st_size))
    return tuple(sorted(entries))


def host_name(header: str) -> str:
    """The host part of a ``Host`` header (``[::1]:8765`` -> ``::1``), lower-cased."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class _Cache:
    """Small thread-safe LRU of values keyed by run paths and their directory signatures."""

    def __init__(self, size: int = 64) -> None:
        self._items: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._size = size

    def get(self, key: Any, make: Any) -> Any:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = make()
        with self._lock:
            self._items[key] = value
            while len(self._items) > self._size:
                self._items.popitem(last=False)
        return value


class DashboardServer(ThreadingHTTPServer):
    """The HTTP server; holds ROOT, the polling interval and the caches."""

    daemon_threads = True

    def __init__(self, root: str | os.PathLike, host: str = "127.0.0.1", port: int = 0,
                 poll_seconds: float = 5.0) -> None:
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise FileNotFoundError(f"{str(root)!r} is not a directory; pass the folder that "
                                    "holds your run directories")
        if poll_seconds <= 0:
            raise ValueError(f"--poll must be positive, got {poll_seconds}")
        self.poll_ms = int(poll_seconds * 1000)
        self.runs = _Cache()
        self.pages = _Cache(16)
        self._plotly: bytes | None = None
        self._names = {"localhost", host.lower(), socket.gethostname().lower(),
                       socket.getfqdn().lower()}
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__((host, port), _Handler)

    def allows_host(self, header: str | None) -> bool:
        """Whether a request's ``Host`` header names this server.

        IP addresses are always fine (a DNS-rebinding page reaches the server under its own
        domain name, never under an address); names must be this machine's.
        """
        if not header:
            return False
        name = host_name(header).rstrip(".")
        if name in self._names:
            return True
        try:
            ipaddress.ip_address(name)
        except ValueError:
            return False
        return True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Quiet for clients that disconnect; the usual traceback for anything else."""
        if isinstance(sys.exc_info()[1], _DISCONNECTS):
            return
        super().handle_error(request, client_address)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in str(host) else host
        return f"http://{host}:{port}/"

    def plotly(self) -> bytes:
        if self._plotly is None:
            from devinterp.dashboard.page import plotly_js

            self._plotly = plotly_js().encode()
        return self._plotly

    def resolve(self, ref: str) -> Path:
        """The run directory ``ref`` names (relative to ROOT), or an :class:`HTTPError`."""
        if "\x00" in ref:
            raise HTTPError(400, "bad run path")
        target = (self.root / (ref.strip("/") or ".")).resolve()
        if target != self.root and self.root not in target.parents:
            raise HTTPError(403, "that path is outside the served folder")
        if not (target / LLC_FILE).is_file():
            raise HTTPError(404, f"no run (llc.csv) at {ref!r}")
        return target

    def ref(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def load(self, path: Path) -> tuple[Run, tuple]:
        """The run at ``path`` (cached while its files are unchanged), and its signature."""
        check_run_files(self.root, path)
        sig = dir_signature(path)
        return self.runs.get((path, sig), lambda: load_run(path)), sig

    def page(self, refs: list[str], known: str | None = None) -> dict:
        """The page model of ``refs``; just ``{"signature", "unchanged": true}`` when it is
        still the one whose signature the client ``known``s (a poll then costs bytes, not the
        whole model of a long run)."""
        paths = [self.resolve(r) for r in refs]
        loaded = [self.load(p) for p in paths]
        key = tuple((p, sig) for p, (_, sig) in zip(paths, loaded, strict=True))
        signature = hashlib.sha1(repr(key).encode()).hexdigest()
        if known == signature:
            return {"signature": signature, "unchanged": True}

        def make() -> dict:
            page = build_page([run for run, _ in loaded], refs=[self.ref(p) for p in paths],
                              embed_traces=False)
            page["signature"] = signature
            return page

        return self.pages.get(key, make)

    def index(self) -> list[dict]:
        """One entry per run under ROOT; a run that cannot be read gets ``error`` instead of
        its numbers, so one bad folder never hides the others."""
        out = []
        for path in find_runs(self.root):
            ref = self.ref(path)
            try:
                out.append({"ref": ref, **self._summary(path)})
            except (HTTPError, ValueError, OSError) as e:
                out.append({"ref": ref, "name": path.name, "error": str(e)})
        return out

    def _summary(self, path: Path) -> dict:
        run, sig = self.load(path)
        modified = max((m for _, m, _ in sig), default=0)
        return {
            "name": run.name, "points": int(len(run.llc)),
            "last_step": int(run.llc["step"].max()) if len(run.llc) else None,
            "stages": len(run.stages),
            "flagged": len({f.step for f in health_flags(run.llc)}),
            "modified": datetime.fromtimestamp(modified / 1e9).strftime("%Y-%m-%d %H:%M:%S"),
        }


class _Handler(BaseHTTPRequestHandler):
    server: DashboardServer
    server_version = "devinterp-dashboard"

    def do_GET(self) -> None:  # noqa: N802 (the http.server spelling)
        parts = urlsplit(self.path)
        is_api = parts.path.startswith("/api/")
        try:
            if not self.server.allows_host(self.headers.get("Host")):
                raise HTTPError(403, f"unexpected Host header {self.headers.get('Host')!r}; "
                                     f"open {self.server.url}")
            self._route(parts.path, parse_qs(parts.query))
        except _DISCONNECTS:
            self.close_connection = True
        except HTTPError as e:
            self._error(e.code, str(e), is_api)
        except (ValueError, OSError) as e:
            self._error(500, f"could not read the run: {e}", is_api)

    def _route(self, raw_path: str, query: dict[str, list[str]]) -> None:
        path = unquote(raw_path)
        srv = self.server
        if path == "/":
            self._index()
        elif path == "/static/plotly.js":
            self._send(200, srv.plotly(), "text/javascript; charset=utf-8", cache=True)
        elif path.startswith("/run/"):
            self._page([path[len("/run/"):]])
        elif path == "/compare":
            self._page(self._refs(query))
        elif path == "/api/runs":
            self._json(srv.index())
        elif path == "/api/page":
            self._json(srv.page(self._refs(query), query.get("known", [None])[0]))
        elif path == "/api/trace":
            self._trace(query)
        else:
            raise HTTPError(404, "not found")

    @staticmethod
    def _refs(query: dict[str, list[str]]) -> list[str]:
        refs = query.get("run", [])
        if not refs:
            raise HTTPError(400, "name at least one run: ?run=PATH")
        return refs

    def _index(self) -> None:
        srv = self.server
        config = {"runs_url": "/api/runs", "poll_ms": srv.poll_ms, "root": str(srv.root)}
        body = fill(assets.INDEX_TEMPLATE, CSP=CSP, TITLE="Runs", STYLE=assets.STYLE,
                    CONFIG=script_json(config), DATA=script_json(srv.index()),
                    SCRIPT=assets.INDEX_SCRIPT)
        self._send(200, body.encode(), "text/html; charset=utf-8")

    def _page(self, refs: list[str]) -> None:
        page = self.server.page(refs)
        query = "&".join(f"run={quote(r, safe='')}" for r in refs)
        live = {"page_url": f"/api/page?{query}", "trace_url": "/api/trace",
                "poll_ms": self.server.poll_ms, "index_url": "/"}
        body = render_html(page, plotly_src="/static/plotly.js", live=live)
        self._send(200, body.encode(), "text/html; charset=utf-8")

    def _trace(self, query: dict[str, list[str]]) -> None:
        refs = self._refs(query)
        try:
            step = int(query.get("step", [""])[0])
        except ValueError:
            raise HTTPError(400, "step must be an integer: ?step=N") from None
        run, _ = self.server.load(self.server.resolve(refs[0]))
        payload = trace_payload(run, step)
        if payload is None:
            raise HTTPError(404, f"no loss trace saved for step {step}")
        self._json(payload)

    def _json(self, obj: Any) -> None:
        body = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        self._send(200, body.encode(), "application/json; charset=utf-8")

    def _error(self, code: int, message: str, is_api: bool) -> None:
        try:
            if is_api:
                body = json.dumps({"error": message}).encode()
                self._send(code, body, "application/json; charset=utf-8")
            else:
                self._send(code, f"{code}: {message}\n".encode(), "text/plain; charset=utf-8")
        except _DISCONNECTS:
            self.close_connection = True

    def _send(self, code: int, body: bytes, content_type: str, cache: bool = False) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Cache-Control", "max-age=86400" if cache else "no-store")
        if content_type.startswith("text/html"):
            self.send_header("Content-Security-Policy", CSP)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        """Quiet: pages poll every few seconds, and a line per request would drown the log."""


def serve(root: str | os.PathLike, *, host: str = "127.0.0.1", port: int = 8765,
          poll_seconds: float = 5.0) -> None:
    """Serve the dashboards of the runs under ``root`` until interrupted (Ctrl-C)."""
    try:
        server = DashboardServer(root, host, port, poll_seconds)
    except socket.gaierror as e:
        raise ValueError(f"cannot listen on {host!r}: no such address ({e.strerror or e}); "
                         "pass an address of this machine with --host") from e
    except OSError as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"cannot listen on {host}:{port} ({e.strerror or e}); pick another "
                         "port with --port") from e
    if host not in LOOPBACK:
        print(f"warning: listening on {host}: anyone who can reach this machine can read the "
              "runs under this folder", file=sys.stderr)
    print(f"devinterp dashboard: serving {server.root} at {server.url} (Ctrl-C to stop)",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
