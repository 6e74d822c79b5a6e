"""Bad input gets one line and exit status 2; long names stay whole; reconnects log one line."""

from __future__ import annotations

import importlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from sqlalchemy_matview.cli import InputError, connect_url, main


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.output


def _only_line(out: str) -> str:
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1, out
    assert lines[0].startswith("Error: ")
    return lines[0]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-1", "soon"])
@pytest.mark.parametrize(
    ("command", "flag"),
    [
        (["refresh", "--all"], "--lock-timeout"),
        (["refresh", "--all"], "--statement-timeout"),
        (["watch", "--metadata", "m:md"], "--debounce"),
        (["watch", "--metadata", "m:md"], "--max-delay"),
        (["watch", "--metadata", "m:md"], "--interval"),
    ],
)
def test_durations_must_be_finite_and_not_negative(
    command: list[str], flag: str, value: str
) -> None:
    # Checked before anything connects: the URL points nowhere.
    code, out = _run(*command, "--url", "postgresql://u@127.0.0.1:1/db", f"{flag}={value}")
    assert code == 2
    line = _only_line(out)
    assert f"'{flag}'" in line and repr(value) in line
    assert "_" not in flag  # the flag, not the Python parameter, is named


def test_zero_and_fractions_are_durations(url_text: str) -> None:
    code, out = _run("refresh", "--all", "--url", url_text, "--lock-timeout", "0")
    assert code == 0, out
    code, out = _run("refresh", "--all", "--url", url_text, "--statement-timeout", "2.5")
    assert code == 0, out


@pytest.mark.parametrize("driver", ["psycopg2", "pg8000", "nosuchdriver"])
def test_url_with_a_driver_that_is_not_installed(driver: str) -> None:
    pytest.importorskip("psycopg")
    if driver != "nosuchdriver":
        try:
            importlib.import_module(driver)
        except ImportError:
            pass
        else:
            pytest.skip(f"{driver} is installed here")
    url = f"postgresql+{driver}://u:secret@127.0.0.1:1/db"
    with pytest.raises(InputError, match=f"driver '{driver}', which is not installed"):
        connect_url(url)
    code, out = _run("status", "--url", url)
    assert code == 2
    line = _only_line(out)
    assert driver in line and "secret" not in line


def test_views_and_all_cannot_be_combined(url_text: str) -> None:
    code, out = _run("refresh", "mv_a", "--all", "--url", url_text)
    assert code == 2
    assert "VIEW names and --all cannot be combined" in out
    code, out = _run("refresh", "mv_a", "--stale", "--all", "--url", url_text)
    assert code == 2
    assert "VIEW names and --all and --stale cannot be combined" in out


def test_status_keeps_long_names_whole(engine: sa.Engine, url_text: str) -> None:
    schema = "s" * 30 + "_reporting_schema_long"  # 52 and 63 bytes: long, not truncated
    view = "v" * 40 + "_daily_totals_by_region"
    with engine.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
        conn.execute(sa.text(f'CREATE MATERIALIZED VIEW "{schema}"."{view}" AS SELECT 1 AS x'))
    code, out = _run("status", "--url", url_text)
    assert code == 0, out
    assert "…" not in out
    # The view column is the first cell of each row: its pieces, joined, give the name.
    cells = [line.split("│")[1].strip() for line in out.splitlines() if line.count("│") > 2]
    assert f"{schema}.{view}" in "".join(cells)


def _lines(stream: object, into: queue.Queue[str]) -> None:
    for line in iter(stream.readline, ""):  # type: ignore[attr-defined]
        into.put(line)


def _wait_for(lines: queue.Queue[str], needle: str, seen: list[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            seen.append(lines.get(timeout=0.1))
        except queue.Empty:
            continue
        if needle in seen[-1]:
            return
    pytest.fail(f"{needle!r} not printed within {timeout}s:\n{''.join(seen)}")


def _terminate_listener(engine: sa.Engine, timeout: float = 60) -> None:
    """Kill the worker's listening connection, once there is one."""
    deadline = time.monotonic() + timeout
    with engine.connect() as conn:
        while time.monotonic() < deadline:
            killed = conn.scalar(
                sa.text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                    " AND application_name = 'sqlalchemy_matview worker'"
                )
            )
            if killed:
                return
            conn.rollback()  # pg_stat_activity is a snapshot per transaction
            time.sleep(0.05)
        activity = conn.execute(
            sa.text("SELECT datname, application_name, query FROM pg_stat_activity")
        ).all()
    pytest.fail(f"the worker never listened: {activity}")


@pytest.mark.parametrize("verbose", [False, True], ids=["quiet", "verbose"])
def test_watch_logs_one_line_per_reconnect(
    engine: sa.Engine, url_text: str, models_module: Callable[..., str], verbose: bool
) -> None:
    name = models_module()
    models = importlib.import_module(name)
    models.metadata.create_all(engine)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), *sys.path])}
    env["COLUMNS"] = "400"  # one log record, one line
    command = [sys.executable, "-m", "sqlalchemy_matview.cli", "watch", "--url", url_text]
    command += ["--metadata", f"{name}:metadata", *(["-v"] if verbose else [])]
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_lines, args=(proc.stdout, lines), daemon=True).start()
    seen: list[str] = []
    try:
        _wait_for(lines, "Ctrl-C to stop", seen)
        for _ in range(2):
            # The worker's listening connection dies under it: it logs and reconnects.
            _terminate_listener(engine)
            _wait_for(lines, "reconnecting", seen)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0, "".join(seen)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    while not lines.empty():
        seen.append(lines.get_nowait())
    out = "".join(seen)
    warnings = [line for line in seen if "reconnecting" in line]
    assert len(warnings) >= 2, out
    if verbose:
        assert "Traceback" in out
    else:
        assert "Traceback" not in out, out
        # The cause is on the warning's own line.
        assert all("terminat" in line or "connection" in line.lower() for line in warnings), out
