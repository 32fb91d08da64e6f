"""A dashboard server on a free loopback port, for the server tests."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path

from devinterp.dashboard import DashboardServer


@contextlib.contextmanager
def running_server(root: Path) -> Iterator[DashboardServer]:
    """Serve ``root`` in a background thread; shut down and close on exit."""
    srv = DashboardServer(root, port=0, poll_seconds=0.2)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
