"""Real ``matview`` processes: the demo end to end, and ``watch`` until SIGTERM."""

from __future__ import annotations

import importlib
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa


def _matview() -> list[str]:
    script = shutil.which("matview", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "sqlalchemy_matview.cli"]


def test_demo_runs_end_to_end_against_a_server(pg_server: object, pg_url: sa.URL) -> None:
    url = pg_url.set(drivername="postgresql").render_as_string(hide_password=False)
    proc = subprocess.run(
        [*_matview(), "demo", "--url", url, "--rows", "200000"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    for number in range(1, 10):
        assert f"Step {number}/9 · " in out
    assert "Loaded 200,000 events" in out
    assert "op.create_materialized_view(" in out  # the generated migration is printed
    assert "faster." in out
    assert "stale since" in out
    assert "public.mv_dashboard  refreshed (concurrently)" in out
    assert "1 dirty bucket" in out
    assert "public.mv_dashboard_inc  refreshed (incremental, 1 bucket recomputed)" in out
    assert "Materialized views" in out  # matview status closes the story
    assert "Traceback" not in proc.stderr
    # The scratch database is gone.
    engine = sa.create_engine(pg_url)
    try:
        with engine.connect() as conn:
            left = conn.scalar(
                sa.text("SELECT count(*) FROM pg_database WHERE datname LIKE 'matview_demo_%'")
            )
        assert left == 0
    finally:
        engine.dispose()


def test_demo_starts_its_own_server_without_url() -> None:
    proc = subprocess.run(
        [*_matview(), "demo", "--rows", "20000"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Starting a throwaway PostgreSQL" in proc.stdout
    assert "its data directory is removed at the end" in proc.stdout
    assert "Loaded 20,000 events" in proc.stdout
    assert "Step 9/9 · " in proc.stdout
    assert "Traceback" not in proc.stderr


def _reader(stream: object, lines: queue.Queue[str]) -> None:
    for line in iter(stream.readline, ""):  # type: ignore[attr-defined]
        lines.put(line)


def _wait_for(lines: queue.Queue[str], needle: str, seen: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.1)
        except queue.Empty:
            continue
        seen.append(line)
        if needle in line:
            return
    pytest.fail(f"{needle!r} not printed within {timeout}s; output so far:\n{''.join(seen)}")


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_watch_refreshes_on_change_until_signalled(
    engine: sa.Engine,
    url_text: str,
    models_module: Callable[..., str],
    stop_signal: signal.Signals,
) -> None:
    name = models_module()
    models = importlib.import_module(name)
    models.metadata.create_all(engine)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), *sys.path])}
    proc = subprocess.Popen(
        [
            *_matview(),
            "watch",
            "--url",
            url_text,
            "--metadata",
            f"{name}:metadata",
            "--debounce",
            "0.2",
            "--max-delay",
            "2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_reader, args=(proc.stdout, lines), daemon=True).start()
    seen: list[str] = []
    try:
        _wait_for(lines, "Ctrl-C to stop", seen, timeout=30)
        with engine.begin() as conn:
            conn.execute(models.events.insert(), [{"id": 10, "kind": "x"}])
        _wait_for(lines, "public.mv_counts  refreshed", seen, timeout=30)
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT kind, n FROM mv_counts")).all() == [("x", 1)]
        proc.send_signal(stop_signal)
        assert proc.wait(timeout=30) == 0, "".join(seen)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    rest = "".join(seen) + "".join(
        iter(lambda: lines.get_nowait() if not lines.empty() else "", "")
    )
    assert "Traceback" not in rest
    assert "Stopped." in rest


def test_watch_serves_metrics_while_refreshing(
    engine: sa.Engine,
    url_text: str,
    models_module: Callable[..., str],
) -> None:
    name = models_module()
    models = importlib.import_module(name)
    models.metadata.create_all(engine)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), *sys.path])}
    command = [*_matview(), "watch", "--url", url_text, "--metadata", f"{name}:metadata"]
    command += ["--debounce", "0.1", "--metrics-port", "0", "--metrics-addr", "127.0.0.1"]
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_reader, args=(proc.stdout, lines), daemon=True).start()
    seen: list[str] = []
    try:
        _wait_for(lines, "Metrics on http://127.0.0.1:", seen, timeout=30)
        endpoint = seen[-1].split("Metrics on ", 1)[1].strip()
        _wait_for(lines, "Ctrl-C to stop", seen, timeout=30)
        with engine.begin() as conn:
            conn.execute(models.events.insert(), [{"id": 11, "kind": "y"}])
        _wait_for(lines, "public.mv_counts  refreshed", seen, timeout=30)
        with urllib.request.urlopen(endpoint, timeout=10) as response:
            text = response.read().decode()
        assert 'matview_refreshes_total{status="refreshed",view="public.mv_counts"} 1.0' in text
        assert 'matview_staleness_seconds{view="public.mv_counts"} 0.0' in text
        assert "matview_scrape_error 0.0" in text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, "".join(seen)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
