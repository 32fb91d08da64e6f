"""Dashboard server and command line under hostile or broken input: bad runs, FIFOs, symlinks,
foreign Host headers, disconnecting clients, bad flags; and a page build linear in its rows."""

from __future__ import annotations

import http.client
import json
import os
import socket
import struct
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from served import running_server
from test_dashboard import RHAT_WARNING, write_run

from devinterp import cli
from devinterp.dashboard import DashboardServer, build_page
from devinterp.dashboard.server import host_name
from devinterp.run.store import RunStore, load_run


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    write_run(root / "good", name="good run", traces=False)
    return root


@pytest.fixture
def serving(root: Path) -> Iterator[DashboardServer]:
    with running_server(root) as srv:
        yield srv


def get(srv: DashboardServer, path: str, host: str | None = None,
        timeout: float = 10) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(*srv.server_address[:2], timeout=timeout)
    if host is None:
        conn.request("GET", path)
    else:
        conn.putrequest("GET", path, skip_host=True)
        conn.putheader("Host", host)
        conn.endheaders()
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp.status, body


# ----------------------------------------------------------------------------------------------
# Host header (DNS rebinding)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("host", ["evil.example", "evil.example:8765", "127.0.0.1.evil.example",
                                  "localhost.evil.example"])
def test_foreign_host_header_is_refused(serving: DashboardServer, host: str) -> None:
    for path in ("/", "/api/runs", "/run/good", "/api/page?run=good"):
        status, body = get(serving, path, host=host)
        assert status == 403, (host, path)
        assert b"good run" not in body and b"llc_mean" not in body


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "LOCALHOST:1", "[::1]:8765",
                                  "10.1.2.3:80", socket.gethostname()])
def test_own_names_and_addresses_are_accepted(serving: DashboardServer, host: str) -> None:
    status, body = get(serving, "/api/runs", host=host)
    assert status == 200 and json.loads(body)[0]["name"] == "good run"


def test_request_without_host_is_refused(serving: DashboardServer) -> None:
    with socket.create_connection(serving.server_address[:2], timeout=10) as s:
        s.sendall(b"GET /api/runs HTTP/1.0\r\n\r\n")
        reply = s.makefile("rb").read()
    assert reply.startswith(b"HTTP/1.0 403") and b"good run" not in reply


def test_host_name_parsing() -> None:
    assert host_name("[::1]:8765") == "::1"
    assert host_name("LocalHost:80") == "localhost"
    assert host_name("::1") == "::1"
    assert host_name("example.org") == "example.org"


# ----------------------------------------------------------------------------------------------
# Files inside run folders: symlinks out of ROOT, FIFOs, unreadable runs
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["llc.csv", "metrics.csv", "run.json", "stages.json",
                                  "settings.json"])
def test_symlinked_file_out_of_root_is_not_served(serving: DashboardServer, tmp_path: Path,
                                                  name: str) -> None:
    secret = write_run(tmp_path / "secret", name="secret run")
    run = serving.root / "linked"
    write_run(run, name="linked run", traces=False)
    os.unlink(run / name)
    os.symlink(secret / name, run / name)
    for path in ("/run/linked", "/api/page?run=linked", "/api/trace?run=linked&step=0"):
        status, body = get(serving, path)
        assert status == 403, (name, path, body[:200])
        assert b"secret run" not in body and b"links outside the served folder" in body
    runs = json.loads(get(serving, "/api/runs")[1])
    bad = next(r for r in runs if r["ref"] == "linked")
    assert "links outside" in bad["error"] and "points" not in bad


def test_symlinked_trace_out_of_root_is_not_served(serving: DashboardServer,
                                                   tmp_path: Path) -> None:
    secret = write_run(tmp_path / "secret", name="secret run")
    run = write_run(serving.root / "traced", name="traced")
    target = run / "traces" / "step_000000100.npy"
    assert target.exists()
    os.unlink(target)
    os.symlink(secret / "traces" / "step_000000100.npy", target)
    status, body = get(serving, "/api/trace?run=traced&step=100")
    assert status == 403 and b"links outside" in body


def test_symlink_inside_root_is_followed_and_tracked(serving: DashboardServer) -> None:
    """A link to a table elsewhere under ROOT is fine, and the page sees its new rows."""
    shared = serving.root / "shared"
    write_run(shared, name="shared", traces=False)
    run = serving.root / "alias"
    run.mkdir()
    os.symlink(shared / "llc.csv", run / "llc.csv")
    status, body = get(serving, "/api/page?run=alias")
    assert status == 200 and json.loads(body)["runs"][0]["points"] == 5
    time.sleep(0.01)  # a new modification time, even on coarse clocks
    RunStore(shared).write_llc_row({"step": 20000, "llc_mean": 9.0, "llc_std": 0.5})
    assert json.loads(get(serving, "/api/page?run=alias")[1])["runs"][0]["points"] == 6


@pytest.mark.parametrize("name", ["llc.csv", "metrics.csv", "run.json", "settings.json",
                                  "traces/step_000000100.npy"])
def test_fifo_in_a_run_never_hangs_the_server(serving: DashboardServer, name: str) -> None:
    run = write_run(serving.root / "piped", name="piped")
    os.unlink(run / name)
    os.mkfifo(run / name)
    status, body = get(serving, "/api/runs", timeout=10)
    assert status == 200
    runs = {r["ref"]: r for r in json.loads(body)}
    assert runs["good"]["name"] == "good run"
    assert "not a regular file" in runs["piped"]["error"]
    # A FIFO named llc.csv is no run (404); any other FIFO is refused by name (403).
    expected = (404, b"no run") if name == "llc.csv" else (403, b"is not a regular file")
    for path in ("/run/piped", "/api/page?run=piped", "/api/trace?run=piped&step=100"):
        status, body = get(serving, path, timeout=10)
        assert (status, expected[1] in body) == (expected[0], True), (path, body[:200])


def test_one_bad_run_leaves_the_index_working(serving: DashboardServer) -> None:
    bad = serving.root / "broken"
    bad.mkdir()
    (bad / "llc.csv").write_text("step,llc_mean\nnot-a-step,1\n")
    bad_json = write_run(serving.root / "badjson", name="x", traces=False)
    (bad_json / "run.json").write_text("{not json")
    status, body = get(serving, "/api/runs")
    assert status == 200
    runs = {r["ref"]: r for r in json.loads(body)}
    assert runs["good"]["points"] == 5 and "error" not in runs["good"]
    assert runs["broken"]["error"] and runs["badjson"]["error"]
    status, page = get(serving, "/")
    assert status == 200 and b"good run" in page
    status, body = get(serving, "/api/page?run=broken")
    assert status == 500 and "error" in json.loads(body)


# ----------------------------------------------------------------------------------------------
# Clients that disconnect
# ----------------------------------------------------------------------------------------------
def test_client_disconnects_leave_no_traceback(serving: DashboardServer,
                                               capfd: pytest.CaptureFixture) -> None:
    for path in (b"/static/plotly.js", b"/run/good", b"/api/page?run=good"):
        for _ in range(3):
            s = socket.create_connection(serving.server_address[:2])
            s.sendall(b"GET " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            # Close with a reset (SO_LINGER 0), mid-answer: the server's writes then fail.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
    s = socket.create_connection(serving.server_address[:2])
    s.sendall(b"GET /api/ru")  # a request cut off before its end
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
    time.sleep(0.5)
    assert get(serving, "/api/runs")[0] == 200  # still serving
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Exception" not in err, err


# ----------------------------------------------------------------------------------------------
# Command line: one line and exit 2 for every mistake; atomic output
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("args", "message"), [
    (["{run}", "--serve", "--port", "99999"], "not a port number"),
    (["{run}", "--serve", "--port", "-3"], "not a port number"),
    (["{run}", "--serve", "--port", "http"], "not a port number"),
    (["{run}", "--serve", "--poll", "0"], "positive number of seconds"),
    (["{run}", "--serve", "--poll", "nan"], "positive number of seconds"),
    (["{run}", "-o", "{tmp}"], "is a directory"),
    (["{run}/llc.csv", "-o", "{tmp}/x.html"], "is a file"),
    (["{tmp}/started", "-o", "{tmp}/x.html"], "nothing to draw yet"),
    (["{tmp}/dirtable", "-o", "{tmp}/x.html"], "cannot read"),
    (["{run}", "--serve", "--host", "no-such-host.invalid"], "--host"),
])
def test_cli_mistakes_are_one_line_with_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture,
                                               args: list[str], message: str) -> None:
    run = write_run(tmp_path / "run", traces=False)
    RunStore(tmp_path / "started", create=True).write_json("settings.json", {"num_chains": 4})
    (tmp_path / "dirtable" / "llc.csv").mkdir(parents=True)  # a directory where a table goes
    argv = ["dashboard", *(a.format(run=run, tmp=tmp_path) for a in args)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert "Traceback" not in err


def test_cli_output_replaces_a_good_file_whole_or_not_at_all(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    run = write_run(tmp_path / "run", traces=False)
    out = tmp_path / "dash.html"
    out.write_text("the good dashboard")

    def fail_midway(*args: object, **kwargs: object) -> str:
        raise OSError(28, "No space left on device")

    # The write fails after the temp file was opened: the old file stays as it was.
    monkeypatch.setattr(os, "replace", fail_midway)
    assert cli.main(["dashboard", str(run), "-o", str(out)]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert out.read_text() == "the good dashboard"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".dash")] == []
    monkeypatch.undo()
    assert cli.main(["dashboard", str(run), "-o", str(out)]) == 0
    assert out.stat().st_size > 1_000_000


# ----------------------------------------------------------------------------------------------
# Page build: linear in the number of (flagged) rows
# ----------------------------------------------------------------------------------------------
def _flagged_run(path: Path, n: int) -> object:
    store = RunStore(path, create=True)
    store.upsert_rows("llc.csv", [{
        "step": k, "llc_mean": 1.0 + (k % 7), "llc_std": 0.1, "rhat": 1.5, "ess": 300.0,
        "num_chains": 4, "warnings": RHAT_WARNING}
        for k in range(n)])
    return load_run(path)


def _calls(run: object) -> tuple[int, int]:
    """(Python calls, of which into pandas) made by one page build."""
    counts = [0, 0]

    def profile(frame, event, arg):  # noqa: ANN001, ANN202 (sys.setprofile's signature)
        if event == "call":
            counts[0] += 1
            if f"{os.sep}pandas{os.sep}" in frame.f_code.co_filename:
                counts[1] += 1

    sys.setprofile(profile)
    try:
        build_page([run], embed_traces=False)
    finally:
        sys.setprofile(None)
    return counts[0], counts[1]


def test_page_build_is_linear_in_flagged_rows(tmp_path: Path) -> None:
    """Every row is flagged twice (R-hat and the estimator's warning). The work added per row,
    counted in function calls, must not grow with the table, and no row may cost a pandas
    operation of its own (a table scan per flagged point made 200k rows take minutes)."""
    counts = {n: _calls(_flagged_run(tmp_path / str(n), n)) for n in (1000, 2000, 4000)}
    per_row_small = (counts[2000][0] - counts[1000][0]) / 1000
    per_row_large = (counts[4000][0] - counts[2000][0]) / 2000
    assert per_row_large <= 1.1 * per_row_small
    pandas_per_row = (counts[4000][1] - counts[2000][1]) / 2000
    assert pandas_per_row < 20, pandas_per_row


def test_flag_table_lists_each_problem_once(tmp_path: Path) -> None:
    run = _flagged_run(tmp_path / "r", 50)
    page = build_page([run], embed_traces=False)
    flags = page["diagnostics"]["flags"]
    assert len(flags) == 50 and {f["what"] for f in flags} == {"R-hat"}
    assert flags[0]["why"] == RHAT_WARNING


def test_a_poll_of_an_unchanged_page_is_small(serving: DashboardServer) -> None:
    status, body = get(serving, "/api/page?run=good")
    page = json.loads(body)
    status, body = get(serving, f"/api/page?run=good&known={page['signature']}")
    assert status == 200 and json.loads(body) == {"signature": page["signature"],
                                                  "unchanged": True}
    RunStore(serving.root / "good").write_llc_row({"step": 20000, "llc_mean": 9.0,
                                                   "llc_std": 0.5})
    status, body = get(serving, f"/api/page?run=good&known={page['signature']}")
    changed = json.loads(body)
    assert "unchanged" not in changed and changed["runs"][0]["points"] == 6
