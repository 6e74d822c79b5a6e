"""The refresh workers behind PgBouncer and next to a standby, and their own connection.

- the listening connection comes from the engine's own connect factory (``connect_args``);
- through a transaction-pooled PgBouncer the worker refuses to start unless ``listen_url=``
  names a direct connection, and then it listens there while refreshing through the pool;
- on a hot standby every refreshing call raises ``StandbyError`` before refreshing.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import Session

import sqlalchemy_matview.asyncio as mv_asyncio
from sqlalchemy_matview import (
    MaterializedView,
    RefreshResult,
    RefreshWorker,
    SessionRequiredError,
    StandbyError,
    refresh,
    refresh_all,
    refresh_stale,
    refresh_views,
)
from sqlalchemy_matview.cli import main
from sqlalchemy_matview.testing.components import PgBouncer, StandbyServer


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def _model(schema: str | None = None) -> tuple[sa.MetaData, sa.Table, MaterializedView]:
    md = sa.MetaData(schema=schema)
    events = sa.Table(
        "events",
        md,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
    )
    counts = MaterializedView(
        "mv_counts",
        md,
        sa.select(events.c.kind, sa.func.count().label("n")).group_by(events.c.kind),
        unique_key="kind",
        track_changes=True,
    )
    return md, events, counts


def _counts(engine: sa.Engine, view: MaterializedView) -> dict[str, int]:
    with engine.connect() as conn:
        return {kind: n for kind, n in conn.execute(sa.select(view.c.kind, view.c.n))}


def _drive(worker: Any, body: Callable[[], None]) -> None:
    """Run ``body`` (sync) while ``worker``, thread or asyncio, runs."""
    if isinstance(worker, RefreshWorker):
        with worker:
            body()
        return

    async def main_() -> None:
        async with worker:
            await asyncio.to_thread(body)

    asyncio.run(main_())


KINDS = ["thread", "asyncio"]


def _worker(kind: str, url: sa.URL, metadata: sa.MetaData, **kw: Any) -> Any:
    """A worker of ``kind`` whose engine is made from ``url`` with ``connect_args``."""
    connect_args = kw.pop("connect_args", {})
    if kind == "thread":
        engine = sa.create_engine(url, connect_args=connect_args)
        return RefreshWorker(engine, metadata, **kw)
    aengine = create_async_engine(
        url.set(drivername="postgresql+psycopg_async"),
        connect_args=connect_args,
        poolclass=sa.NullPool,
    )
    return mv_asyncio.RefreshWorker(aengine, metadata, **kw)


# -- the engine's own connect factory ------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_the_listener_is_made_like_the_engines_connections(
    engine: sa.Engine, pg_url: sa.URL, kind: str
) -> None:
    # The views are declared without a schema and live in "app", which only the
    # connect_args put on the search_path: a listener made from the bare URL would resolve
    # them to public.mv_counts and ignore every notification ("app.mv_counts").
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE SCHEMA app"))
    md, events, counts = _model()
    options = {"options": "-c search_path=app"}
    app = sa.create_engine(pg_url, connect_args=options)
    md.create_all(app)
    results: list[RefreshResult] = []
    worker = _worker(kind, pg_url, md, connect_args=options, debounce=0.1, on_result=results.append)

    def body() -> None:
        assert wait_for(lambda: worker.passes >= 1)
        with app.begin() as conn:
            conn.execute(events.insert(), [{"id": 1, "kind": "a"}])
        assert wait_for(
            lambda: ("app.mv_counts", "refreshed") in [(r.view, r.status) for r in results]
        )
        assert worker.ignored_notifications == 0
        with engine.connect() as conn:
            # Its own application_name, since connect_args did not set one.
            assert (
                conn.scalar(
                    sa.text(
                        "SELECT count(*) FROM pg_stat_activity WHERE application_name = "
                        "'sqlalchemy_matview worker' AND datname = current_database()"
                    )
                )
                == 1
            )

    _drive(worker, body)
    assert _counts(app, counts) == {"a": 1}
    app.dispose()


# -- PgBouncer in transaction pooling mode ---------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_a_transaction_pooled_url_is_refused_at_start(
    engine: sa.Engine, pgbouncer_url: sa.URL, kind: str
) -> None:
    md, _, _ = _model()
    md.create_all(engine)
    worker = _worker(kind, pgbouncer_url, md, connect_args=dict(PgBouncer.CONNECT_ARGS))
    message = r"transaction \(or statement\) pooling mode.*pass listen_url="
    if kind == "thread":
        with pytest.raises(SessionRequiredError, match=message):
            worker.start()
        assert not worker.running
        with pytest.raises(SessionRequiredError, match=message):
            worker.run()
    else:

        async def main_() -> None:
            with pytest.raises(SessionRequiredError, match=message):
                await worker.start()
            assert not worker.running
            with pytest.raises(SessionRequiredError, match=message):
                await worker.run()

        asyncio.run(main_())


@pytest.mark.parametrize("kind", KINDS)
def test_listen_url_listens_directly_and_refreshes_through_the_pool(
    engine: sa.Engine, pg_url: sa.URL, pgbouncer_url: sa.URL, kind: str
) -> None:
    md, events, counts = _model()
    md.create_all(engine)
    results: list[RefreshResult] = []
    worker = _worker(
        kind,
        pgbouncer_url,
        md,
        connect_args=dict(PgBouncer.CONNECT_ARGS),
        listen_url=pg_url.render_as_string(hide_password=False),
        debounce=0.1,
        on_result=results.append,
    )

    def body() -> None:
        assert wait_for(lambda: worker.passes >= 1)
        for n in range(1, 4):
            with engine.begin() as conn:
                conn.execute(events.insert(), [{"id": n, "kind": "a"}])
            expected = {"a": n}
            assert wait_for(lambda: _counts(engine, counts) == expected), n  # noqa: B023

    _drive(worker, body)
    assert {r.status for r in results} <= {"refreshed", "skipped_fresh"}


MODELS = """
import sqlalchemy as sa
from sqlalchemy_matview import MaterializedView

metadata = sa.MetaData()
events = sa.Table(
    "events", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("kind", sa.String(16), nullable=False),
)
mv_counts = MaterializedView(
    "mv_counts", metadata,
    sa.select(events.c.kind, sa.func.count().label("n")).group_by(events.c.kind),
    unique_key="kind",
    track_changes=True,
)
"""


@pytest.fixture
def models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A models module for ``matview watch --metadata``; returns its import name."""
    name = f"deploy_models_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(MODELS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_watch_refuses_a_pooled_url_before_watching(
    engine: sa.Engine, pgbouncer_url: sa.URL, models: str
) -> None:
    name = models
    url = pgbouncer_url.set(drivername="postgresql").render_as_string(hide_password=False)
    result = CliRunner().invoke(main, ["watch", "--url", url, "--metadata", f"{name}:metadata"])
    assert result.exit_code == 1, result.output
    assert "Watching" not in result.output
    assert "pass listen_url=" in result.output
    assert "Traceback" not in result.output


def _lines(stream: IO[str], sink: queue.Queue[str]) -> None:
    for line in stream:
        sink.put(line)


def _wait_line(lines: queue.Queue[str], text: str, seen: list[str]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            continue
        seen.append(line)
        if text in line:
            return
    pytest.fail(f"no {text!r} in: {''.join(seen)}")


def test_watch_with_listen_url_and_lock_namespace(
    engine: sa.Engine,
    pg_url: sa.URL,
    pgbouncer_url: sa.URL,
    models: str,
) -> None:
    name = models
    module = importlib.import_module(name)
    module.metadata.create_all(engine)
    direct = pg_url.set(drivername="postgresql").render_as_string(hide_password=False)
    pooled = pgbouncer_url.set(drivername="postgresql").render_as_string(hide_password=False)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), *sys.path])}
    env["COLUMNS"] = "400"
    command = [sys.executable, "-m", "sqlalchemy_matview.cli", "watch", "--url", pooled]
    command += ["--listen-url", direct, "--lock-namespace", "blue", "--debounce", "0.1"]
    command += ["--metadata", f"{name}:metadata"]
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    lines: queue.Queue[str] = queue.Queue()
    assert proc.stdout is not None
    threading.Thread(target=_lines, args=(proc.stdout, lines), daemon=True).start()
    seen: list[str] = []
    try:
        _wait_line(lines, "Ctrl-C to stop", seen)
        with engine.begin() as conn:
            conn.execute(module.events.insert(), [{"id": 1, "kind": "a"}])
        _wait_line(lines, "refreshed", seen)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0, "".join(seen)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- a hot standby --------------------------------------------------------------------------


@pytest.fixture
def replica(standby_server: StandbyServer, pg_url: sa.URL) -> Iterator[sa.Engine]:
    assert pg_url.database is not None
    standby_server.wait_for_replay()
    engine = sa.create_engine(standby_server.url(pg_url.database))
    try:
        yield engine
    finally:
        engine.dispose()


@pytest.fixture
def replicated(
    engine: sa.Engine, replica: sa.Engine, standby_server: StandbyServer
) -> tuple[sa.MetaData, MaterializedView]:
    md, events, counts = _model()
    md.create_all(engine)
    with engine.begin() as conn:
        conn.execute(events.insert(), [{"id": 1, "kind": "a"}])  # stale now
    standby_server.wait_for_replay()
    return md, counts


STANDBY = r"hot standby .*refresh on the primary"


def test_every_refresh_is_refused_on_a_standby(
    replica: sa.Engine, replicated: tuple[sa.MetaData, MaterializedView]
) -> None:
    md, counts = replicated
    with pytest.raises(StandbyError, match=STANDBY):
        refresh_views(replica, counts)
    with pytest.raises(StandbyError, match=STANDBY):
        refresh_all(replica, md)
    with pytest.raises(StandbyError, match=STANDBY):
        refresh_stale(replica, md)
    with replica.connect() as conn, pytest.raises(StandbyError, match=STANDBY):
        refresh_views(conn, counts)
    with Session(replica) as session, pytest.raises(StandbyError, match=r"refresh\('mv_counts'\)"):
        session.execute(refresh(counts, concurrently=False))
    with Session(replica) as session, pytest.raises(StandbyError, match=STANDBY):
        refresh_views(session, counts)
    # Nothing was refreshed: the view is still as the primary left it.
    assert _counts(replica, counts) == {}


@pytest.mark.parametrize("driver", ["postgresql+asyncpg", "postgresql+psycopg_async"])
def test_async_refreshes_are_refused_on_a_standby(
    replica: sa.Engine, replicated: tuple[sa.MetaData, MaterializedView], driver: str
) -> None:
    md, counts = replicated
    aengine = create_async_engine(replica.url.set(drivername=driver), poolclass=sa.NullPool)

    async def main_() -> None:
        with pytest.raises(StandbyError, match=STANDBY):
            await mv_asyncio.refresh_views(aengine, counts)
        with pytest.raises(StandbyError, match=STANDBY):
            await mv_asyncio.refresh_stale(aengine, md)
        async with aengine.connect() as conn:
            with pytest.raises(StandbyError, match=r"refresh\('mv_counts'\)"):
                await conn.execute(refresh(counts, concurrently=False))
        with pytest.raises(StandbyError, match=STANDBY):
            await mv_asyncio.RefreshWorker(aengine, md).start()

    asyncio.run(main_())


def test_the_worker_refuses_to_start_on_a_standby(
    replica: sa.Engine, replicated: tuple[sa.MetaData, MaterializedView]
) -> None:
    md, _ = replicated
    worker = RefreshWorker(replica, md)
    with pytest.raises(StandbyError, match=STANDBY):
        worker.start()
    assert not worker.running


def test_the_cli_refuses_to_refresh_on_a_standby_and_shows_status(
    replica: sa.Engine,
    replicated: tuple[sa.MetaData, MaterializedView],
) -> None:
    url = replica.url.set(drivername="postgresql").render_as_string(hide_password=False)
    runner = CliRunner()
    for args in (["refresh", "mv_counts"], ["refresh", "--all"]):
        result = runner.invoke(main, [*args, "--url", url])
        assert result.exit_code == 1, result.output
        assert "hot standby" in result.output and "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) == 1, result.output
    result = runner.invoke(main, ["status", "--url", url, "--json"])
    assert result.exit_code == 0, result.output
    assert '"public.mv_counts"' in result.output


def test_watch_refuses_a_standby_before_watching(
    replica: sa.Engine, replicated: tuple[sa.MetaData, MaterializedView], models: str
) -> None:
    url = replica.url.set(drivername="postgresql").render_as_string(hide_password=False)
    result = CliRunner().invoke(main, ["watch", "--url", url, "--metadata", f"{models}:metadata"])
    assert result.exit_code == 1, result.output
    assert "Watching" not in result.output and "Traceback" not in result.output
    assert "hot standby" in result.output


class _Switch:
    """A TCP forwarder whose target can be switched: a failover, as the client sees it."""

    def __init__(self, port: int) -> None:
        import socket

        self.target = port
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(16)
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket

        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: Any, sink: Any) -> None:
        import socket

        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            # shutdown() first: close() alone sends nothing while the other direction's
            # thread is blocked in recv() on the same socket.
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    s.close()

    def close(self) -> None:
        self.server.close()


def test_a_worker_that_reconnects_to_a_standby_stops_with_standby_error(
    engine: sa.Engine,
    pg_url: sa.URL,
    standby_server: StandbyServer,
    replicated: tuple[sa.MetaData, MaterializedView],
    caplog: pytest.LogCaptureFixture,
) -> None:
    md, _ = replicated
    assert pg_url.port is not None
    switch = _Switch(pg_url.port)
    via = sa.create_engine(pg_url.set(host="127.0.0.1", port=switch.port), poolclass=sa.NullPool)
    worker = RefreshWorker(via, md, debounce=0.1, max_backoff=0.5)
    try:
        with worker:
            assert wait_for(lambda: worker.passes >= 1)
            # "Failover": new connections reach the standby; the listener's dies.
            switch.target = standby_server.port
            with engine.begin() as conn:
                conn.execute(
                    sa.text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE "
                        "application_name = 'sqlalchemy_matview worker' "
                        "AND datname = current_database()"
                    )
                )
            assert wait_for(lambda: not worker.running)
        assert isinstance(worker.error, StandbyError)
        assert any(
            r.levelname == "ERROR" and "hot standby" in r.getMessage() for r in caplog.records
        )
    finally:
        switch.close()
        via.dispose()
