"""The refresh history: what was refreshed, when, how long it took, and what failed.

Every refresh made through this library where the bookkeeping is installed is recorded in
``<tracking schema>.history``: the refreshes themselves by the database function every
refresh runs (so pg_cron jobs are recorded too), failures and skips for a held lock by the
runner (``refresh_views``, ``refresh_all``, ``refresh_stale`` and the workers), in a
transaction of their own since the failed one rolled back. ``skipped_fresh`` is not recorded:
a worker checks every view on every pass, and the history would fill with them.

Retention is bounded: the newest 100 rows per view, or what the PostgreSQL setting
``sqlalchemy_matview.history_keep`` says (``ALTER DATABASE app SET
sqlalchemy_matview.history_keep = 1000``).
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session

from .. import catalog
from ..bookkeeping import HISTORY_TABLE, tracking_schema
from ..errors import MaterializedViewError
from ..schema import MaterializedView
from .results import RefreshResult

__all__ = ["HistoryError", "RefreshRecord", "record_result", "refresh_history"]

log = logging.getLogger("sqlalchemy_matview")


class HistoryError(MaterializedViewError, ValueError):
    """:func:`refresh_history` was asked for something it cannot answer."""


@dataclass(frozen=True)
class RefreshRecord:
    """One row of the refresh history (see :func:`refresh_history`)."""

    #: ``schema.name`` of the view.
    view: str
    started_at: datetime.datetime
    #: Seconds the refresh took (for refreshes recorded by the database: the ``REFRESH``
    #: itself, without the wait for the lock).
    duration: float | None
    #: ``"refreshed"``, ``"failed"`` or ``"skipped_locked"``.
    status: str
    concurrently: bool | None
    #: The error message of a failure.
    error: str | None
    #: The planner's row estimate for the view when the row was written (``None`` before the
    #: view's first ANALYZE).
    row_estimate: int | None


def _quoted(conn: Connection, schema: str) -> str:
    return str(conn.dialect.identifier_preparer.quote_schema(schema))


def record_result(conn: Connection, result: RefreshResult, *, schema: str | None = None) -> None:
    """Record a failure or a skip for a held lock (the database records refreshes itself).

    Runs in ``conn``'s current transaction; never raises: a history that cannot be written
    (a role without the privilege, say) must not turn a refresh into an error.
    """
    if result.status not in ("failed", "skipped_locked"):
        return
    view_schema, _, view_name = result.view.partition(".")
    started = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(
        seconds=result.duration
    )
    error = None if result.error is None else str(getattr(result.error, "orig", result.error))
    call = sa.text(
        f"SELECT {_quoted(conn, schema or tracking_schema())}.record("
        "CAST(:s AS text), CAST(:n AS text), CAST(:started AS timestamptz),"
        " CAST(:spent AS double precision), CAST(:status AS text), CAST(:conc AS boolean),"
        " CAST(:error AS text))"
    )
    try:
        with conn.begin_nested():
            conn.execute(
                call,
                {
                    "s": view_schema,
                    "n": view_name,
                    "started": started,
                    "spent": result.duration,
                    "status": result.status,
                    "conc": result.concurrently,
                    "error": error[:2000] if error else None,
                },
            )
    except sa.exc.SQLAlchemyError as exc:
        log.warning(
            "could not record the %s of %s in the history: %s",
            result.status,
            result.view,
            exc.__class__.__name__,
        )


def _view_key(conn: Connection, view: MaterializedView | str) -> tuple[str, str]:
    if isinstance(view, MaterializedView):
        schema = view.schema
        name = view.name
    elif isinstance(view, str) and view:
        schema, _, name = view.rpartition(".")
        schema = schema or None
    else:
        raise HistoryError(
            f"refresh_history(view={view!r}): pass a MaterializedView or its name "
            "('schema.name', or 'name' in the current schema)"
        )
    if schema is None:
        schema = catalog.current_schema(conn)
    return schema, name


def _history(
    conn: Connection,
    view: MaterializedView | str | None,
    limit: int,
    metadata: sa.MetaData | None,
) -> list[RefreshRecord]:
    from .tracking import bookkeeping_installed

    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise HistoryError(f"refresh_history(limit={limit!r}): limit must be an integer >= 1")
    schema = tracking_schema(metadata)
    if not bookkeeping_installed(conn, schema):
        return []
    table = f"{_quoted(conn, schema)}.{HISTORY_TABLE}"
    where, params = "", dict[str, object](limit=limit)
    if view is not None:
        view_schema, view_name = _view_key(conn, view)
        where = " WHERE view_schema = :s AND view_name = :n"
        params.update(s=view_schema, n=view_name)
    rows = conn.execute(
        sa.text(
            "SELECT view_schema, view_name, started_at, duration, status, concurrent_refresh,"
            f" error, row_estimate FROM {table}{where} ORDER BY id DESC LIMIT :limit"
        ),
        params,
    )
    return [
        RefreshRecord(
            view=f"{r.view_schema}.{r.view_name}",
            started_at=r.started_at,
            duration=r.duration,
            status=r.status,
            concurrently=r.concurrent_refresh,
            error=r.error,
            row_estimate=r.row_estimate,
        )
        for r in rows
    ]


def refresh_history(
    bind: Engine | Connection | Session,
    view: MaterializedView | str | None = None,
    *,
    limit: int = 50,
    metadata: sa.MetaData | None = None,
) -> list[RefreshRecord]:
    """The newest ``limit`` history rows, newest first: of ``view``, or of every view.

    ``metadata`` names the tracking schema when it is not the default
    (:func:`~sqlalchemy_matview.set_tracking_schema`). Empty when the bookkeeping is not
    installed. Read-only (fine on a hot standby). Async twin:
    :func:`sqlalchemy_matview.asyncio.refresh_history`.

    Example::

        for record in refresh_history(engine, "public.mv_daily", limit=10):
            print(record.started_at, record.status, record.duration, record.error)
    """
    if isinstance(bind, Engine):
        with bind.connect() as conn:
            return _history(conn, view, limit, metadata)
    if isinstance(bind, Session):
        return _history(bind.connection(), view, limit, metadata)
    if isinstance(bind, Connection):
        return _history(bind, view, limit, metadata)
    raise TypeError(
        "refresh_history takes an Engine, a Connection or a Session "
        f"(for async binds use sqlalchemy_matview.asyncio.refresh_history), not {bind!r}"
    )
