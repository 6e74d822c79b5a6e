"""Scheduling refreshes inside PostgreSQL with the ``pg_cron`` extension.

A job's command calls the same database function every refresh of this library runs
(:func:`~sqlalchemy_matview.orchestration.tracking.refresh_call`), through a procedure that
records a failure in the refresh history before raising it again::

    CALL sqlalchemy_matview.refresh_job('public', 'mv_daily', <lock_key>, true, 'skip', false)

It takes the view's transaction-level advisory lock and does nothing when another refresher
holds it, so a cron refresh never overlaps one made by
:func:`~sqlalchemy_matview.refresh_views` or a :class:`~sqlalchemy_matview.RefreshWorker`;
then it refreshes, clears the staleness marks the refresh covered, records the refresh in
the state table (``matview status`` shows it) and marks the views reading it stale.
:func:`schedule_refresh` installs the function in the view's database when it is missing.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql.base import PGDialect
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session

from ..bookkeeping import tracking_schema
from ..ddl import refresh
from ..errors import ExtensionNotInstalledError
from ..schema import MaterializedView, materialized_view_of
from . import tracking
from .locking import DEFAULT_SCHEMA, check_namespace

__all__ = ["job_name_for", "refresh_command", "schedule_refresh", "unschedule_refresh"]

# The command is stored as data and run by pg_cron, not by our driver: compile it with a
# paramstyle that leaves '%' in identifiers alone.
_COMMAND_DIALECT = PGDialect(paramstyle="named")  # type: ignore[no-untyped-call]


@contextmanager
def _conn(bind: Engine | Connection | Session) -> Iterator[Connection]:
    if isinstance(bind, Engine):
        with bind.begin() as conn:
            yield conn
    elif isinstance(bind, Connection):
        yield bind
    elif isinstance(bind, Session):
        yield bind.connection()
    else:
        raise TypeError(
            f"pg_cron functions take an Engine, a Connection or a Session, not "
            f"{type(bind).__name__} (use sqlalchemy_matview.asyncio for async binds)"
        )


def _qname(view: MaterializedView | sa.Table | str, schema: str | None) -> tuple[str, str]:
    declared = materialized_view_of(view)
    if declared is not None:
        return (declared.schema or schema or DEFAULT_SCHEMA, declared.name)
    if isinstance(view, str) and view:
        return (schema or DEFAULT_SCHEMA, view)
    raise TypeError(f"expected a MaterializedView, its Table or a view name, got {view!r}")


def job_name_for(
    view: MaterializedView | sa.Table | str,
    *,
    schema: str | None = None,
    database: str | None = None,
) -> str:
    """The job name :func:`schedule_refresh` uses by default.

    >>> job_name_for("mv_daily")
    'sqlalchemy_matview refresh public.mv_daily'
    """
    view_schema, name = _qname(view, schema)
    where = f" in {database}" if database else ""
    return f"sqlalchemy_matview refresh {view_schema}.{name}{where}"


def refresh_command(
    view: MaterializedView | sa.Table | str,
    *,
    schema: str | None = None,
    concurrently: bool = True,
    only_if_stale: bool = False,
    lock_namespace: str | None = None,
) -> str:
    """The SQL a job runs: one call of the refresh function with the view's schema and
    name as quoted literals (identifiers are quoted inside it, with ``format('%I')``).
    For example ``refresh_command("Daily Stats", concurrently=False)`` is::

        CALL sqlalchemy_matview.refresh_job('public', 'Daily Stats', <lock_key>,
                                            false, 'skip', false)
    """
    view_schema, name = _qname(view, schema)
    declared = materialized_view_of(view)
    # Checks the unique key, before any SQL (an incremental view needs none: its job runs the
    # view's own refresh function).
    if declared is not None and declared.incremental is None:
        refresh(declared, concurrently=concurrently)
    call = tracking.refresh_job_call(
        view_schema,
        name,
        concurrently=concurrently,
        lock="skip",
        only_if_stale=only_if_stale,
        lock_namespace=check_namespace(lock_namespace),
        tracking_schema_name=_bookkeeping_schema(view),
    )
    compiled = call.compile(dialect=_COMMAND_DIALECT, compile_kwargs={"literal_binds": True})
    return f"CALL {compiled}"


def _bookkeeping_schema(view: MaterializedView | sa.Table | str) -> str:
    declared = materialized_view_of(view)
    return tracking_schema(declared.metadata if declared is not None else None)


def _ensure_refresh_function(conn: Connection, database: str | None, schema: str) -> None:
    """Install the bookkeeping (and the refresh function) in the database holding the view.

    With ``database`` naming another database than ``conn``'s, a short-lived connection
    is made there with ``conn``'s URL (a sync driver for an async engine).
    """
    current = conn.execute(sa.text("SELECT current_database()")).scalar_one()
    if database is None or database == current:
        tracking.ensure_bookkeeping(conn, schema)
        return
    url = conn.engine.url.set(database=database)
    if conn.dialect.is_async:
        url = url.set(drivername="postgresql+psycopg")
    other = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with other.begin() as target:
            tracking.ensure_bookkeeping(target, schema)
    except sa.exc.DBAPIError as exc:
        raise tracking.TrackingError(
            f"cannot install the refresh function in database {database!r} ({exc.orig}); "
            "run sqlalchemy_matview.orchestration.tracking.ensure_bookkeeping() there "
            "(or metadata.create_all() with a track_changes view), then schedule again"
        ) from exc
    finally:
        other.dispose()


def _require_pg_cron(conn: Connection) -> tuple[int, ...]:
    row = conn.execute(
        sa.text(
            "SELECT extversion, current_database() FROM pg_catalog.pg_extension"
            " WHERE extname = 'pg_cron'"
        )
    ).first()
    if row is None:
        database = conn.execute(sa.text("SELECT current_database()")).scalar()
        raise ExtensionNotInstalledError(
            f"pg_cron is not installed in database {database!r}: add pg_cron to "
            "shared_preload_libraries, then run CREATE EXTENSION pg_cron in the database "
            "named by cron.database_name, and connect there to schedule refreshes"
        )
    # extversion looks like "1.4-1" (Debian) or "1.6": the leading numbers are what count.
    return tuple(int(p) for p in re.findall(r"\d+", str(row[0]))[:2])


def schedule_refresh(
    bind: Engine | Connection | Session,
    view: MaterializedView | sa.Table | str,
    schedule: str,
    *,
    concurrently: bool = True,
    job_name: str | None = None,
    schema: str | None = None,
    database: str | None = None,
    only_if_stale: bool = False,
    lock_namespace: str | None = None,
) -> int:
    """Schedule a ``pg_cron`` job refreshing ``view``; returns the job id.

    ``bind`` connects to the database where pg_cron is installed (``cron.database_name``).
    ``database`` names the database holding the view when it is another one (pg_cron
    1.4+). ``schedule`` is a cron expression (``"*/5 * * * *"``) or pg_cron's
    ``"30 seconds"`` form. Scheduling again under the same ``job_name`` replaces the
    job. Raises :class:`~sqlalchemy_matview.errors.ExtensionNotInstalledError` when
    pg_cron is missing.

    The job refreshes like :func:`~sqlalchemy_matview.refresh_views` does: it skips a
    run while another process holds the view's advisory lock, clears the view's
    staleness marks, records the refresh (``view_states``, ``matview status``) and marks
    the views reading it stale. The bookkeeping tables and the refresh function are
    installed in the view's database if missing (a connection is made there with the
    bind's URL when ``database`` is another one).

    ``only_if_stale=True`` makes each run a cheap no-op unless the view is marked stale, by
    its own change tracking (``track_changes=True``) or by the refresh of a view it reads:
    a safety net that recomputes only when something changed. A view with neither is then
    never refreshed by the job.

    ``lock_namespace`` salts the view's advisory-lock key (see
    :func:`~sqlalchemy_matview.lock_key`): pass the one your workers use. The job's
    command stores the key as a literal, so it is readable in ``cron.job`` by whoever can
    read that table.

    Example::

        job_id = schedule_refresh(engine, mv_daily, "*/10 * * * *")
        unschedule_refresh(engine, mv_daily)
    """
    if not isinstance(schedule, str) or not schedule.strip():
        raise ValueError(
            f"schedule must be a cron expression such as '*/5 * * * *', got {schedule!r}"
        )
    command = refresh_command(
        view,
        schema=schema,
        concurrently=concurrently,
        only_if_stale=only_if_stale,
        lock_namespace=lock_namespace,
    )
    name = job_name or job_name_for(view, schema=schema, database=database)
    with _conn(bind) as conn:
        version = _require_pg_cron(conn)
        if database is not None and version < (1, 4):
            raise ExtensionNotInstalledError(
                f"pg_cron {'.'.join(map(str, version))} cannot schedule into another "
                "database (cron.schedule_in_database needs 1.4+); upgrade pg_cron or "
                "install it in the view's database"
            )
        _ensure_refresh_function(conn, database, _bookkeeping_schema(view))
        params = {"name": name, "schedule": schedule, "command": command}
        if database is not None:
            job = conn.execute(
                sa.text("SELECT cron.schedule_in_database(:name, :schedule, :command, :database)"),
                {**params, "database": database},
            ).scalar_one()
        else:
            job = conn.execute(
                sa.text("SELECT cron.schedule(:name, :schedule, :command)"), params
            ).scalar_one()
    return int(job)


def unschedule_refresh(
    bind: Engine | Connection | Session,
    view_or_job_name: MaterializedView | sa.Table | str,
    *,
    schema: str | None = None,
    database: str | None = None,
) -> bool:
    """Remove the job of a view (default job name) or the job named ``view_or_job_name``.

    Returns False when there was no such job.

    Example::

        unschedule_refresh(engine, mv_daily)
        unschedule_refresh(engine, "nightly dashboard refresh")
    """
    if isinstance(view_or_job_name, str):
        candidates = [
            view_or_job_name,
            job_name_for(view_or_job_name, schema=schema, database=database),
        ]
    else:
        candidates = [job_name_for(view_or_job_name, schema=schema, database=database)]
    with _conn(bind) as conn:
        _require_pg_cron(conn)
        for name in candidates:
            exists = conn.execute(
                sa.text("SELECT EXISTS (SELECT 1 FROM cron.job WHERE jobname = :name)"),
                {"name": name},
            ).scalar()
            if exists:
                conn.execute(sa.text("SELECT cron.unschedule(:name)"), {"name": name})
                return True
    return False
