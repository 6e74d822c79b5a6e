"""Async twins of the refresh and scheduling functions, for ``sqlalchemy.ext.asyncio``.

Same signatures as their sync namesakes, taking an ``AsyncEngine``, ``AsyncConnection`` or
``AsyncSession``; the work runs through ``run_sync`` on the same code, so behaviour
(ordering, locks, tracking, results) is identical.

Example::

    from sqlalchemy.ext.asyncio import create_async_engine
    from sqlalchemy_matview.asyncio import refresh_views

    engine = create_async_engine("postgresql+asyncpg://...")
    results = await refresh_views(engine, mv_daily, cascade=True)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, TypeAlias, TypeVar

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

from .orchestration import cron, history, objectives, runner, tracking
from .orchestration.async_worker import RefreshWorker
from .orchestration.objectives import Freshness
from .orchestration.results import RefreshResult
from .orchestration.runner import LockMode, Timeout, ViewRef
from .schema import MaterializedView

__all__ = [
    "RefreshWorker",
    "check_tracking",
    "freshness",
    "refresh_all",
    "refresh_history",
    "refresh_stale",
    "refresh_views",
    "schedule_refresh",
    "unschedule_refresh",
]

AsyncBind: TypeAlias = AsyncEngine | AsyncConnection | AsyncSession
T = TypeVar("T")


async def _run(bind: AsyncBind, fn: Callable[[Any], T], *, per_view_commit: bool) -> T:
    if isinstance(bind, AsyncEngine):
        async with bind.connect() as conn:
            if per_view_commit:
                # Engine semantics: the run owns the connection and commits view by view.
                return await conn.run_sync(lambda c: fn(runner.OwnedConnection(c)))
            async with conn.begin():
                return await conn.run_sync(fn)
    if isinstance(bind, (AsyncConnection, AsyncSession)):
        return await bind.run_sync(fn)
    raise TypeError(
        "sqlalchemy_matview.asyncio functions take an AsyncEngine, AsyncConnection or "
        f"AsyncSession; got {type(bind).__name__} (use sqlalchemy_matview for sync binds)"
    )


async def refresh_views(
    bind: AsyncBind,
    *views: ViewRef,
    cascade: bool = False,
    concurrently: bool | Literal["auto"] = "auto",
    lock: LockMode = "skip",
    lock_timeout: Timeout = None,
    statement_timeout: Timeout = None,
    lock_namespace: str | None = None,
) -> list[RefreshResult]:
    """Async :func:`sqlalchemy_matview.refresh_views`.

    Example::

        results = await refresh_views(async_engine, mv_daily)
    """
    opts = runner.run_options(
        cascade, concurrently, lock, lock_timeout, statement_timeout, lock_namespace
    )
    return await _run(
        bind, lambda target: runner.run_views(target, views, opts), per_view_commit=True
    )


async def refresh_all(
    bind: AsyncBind,
    metadata: sa.MetaData,
    *,
    cascade: bool = False,
    concurrently: bool | Literal["auto"] = "auto",
    lock: LockMode = "skip",
    lock_timeout: Timeout = None,
    statement_timeout: Timeout = None,
    lock_namespace: str | None = None,
) -> list[RefreshResult]:
    """Async :func:`sqlalchemy_matview.refresh_all`.

    Example::

        results = await refresh_all(async_engine, metadata)
    """
    opts = runner.run_options(
        cascade, concurrently, lock, lock_timeout, statement_timeout, lock_namespace
    )
    return await _run_metadata(bind, metadata, opts, stale_only=False)


async def refresh_stale(
    bind: AsyncBind,
    metadata: sa.MetaData,
    *,
    cascade: bool = False,
    concurrently: bool | Literal["auto"] = "auto",
    lock: LockMode = "skip",
    lock_timeout: Timeout = None,
    statement_timeout: Timeout = None,
    lock_namespace: str | None = None,
    _should_stop: Callable[[], bool] | None = None,
) -> list[RefreshResult]:
    """Async :func:`sqlalchemy_matview.refresh_stale`.

    Example::

        results = await refresh_stale(async_engine, metadata)
    """
    opts = runner.run_options(
        cascade, concurrently, lock, lock_timeout, statement_timeout, lock_namespace
    )
    return await _run_metadata(bind, metadata, opts, stale_only=True, should_stop=_should_stop)


async def _run_metadata(
    bind: AsyncBind,
    metadata: sa.MetaData,
    opts: runner.RunOptions,
    *,
    stale_only: bool,
    should_stop: Callable[[], bool] | None = None,
) -> list[RefreshResult]:
    return await _run(
        bind,
        lambda target: runner.run_metadata(
            target, metadata, opts, stale_only=stale_only, should_stop=should_stop
        ),
        per_view_commit=True,
    )


async def schedule_refresh(
    bind: AsyncBind,
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
    """Async :func:`sqlalchemy_matview.schedule_refresh`.

    Example::

        job_id = await schedule_refresh(async_engine, mv_daily, "*/10 * * * *")
    """
    return await _run(
        bind,
        lambda target: cron.schedule_refresh(
            target,
            view,
            schedule,
            concurrently=concurrently,
            job_name=job_name,
            schema=schema,
            database=database,
            only_if_stale=only_if_stale,
            lock_namespace=lock_namespace,
        ),
        per_view_commit=False,
    )


async def unschedule_refresh(
    bind: AsyncBind,
    view_or_job_name: MaterializedView | sa.Table | str,
    *,
    schema: str | None = None,
    database: str | None = None,
) -> bool:
    """Async :func:`sqlalchemy_matview.unschedule_refresh`.

    Example::

        await unschedule_refresh(async_engine, mv_daily)
    """
    return await _run(
        bind,
        lambda target: cron.unschedule_refresh(
            target, view_or_job_name, schema=schema, database=database
        ),
        per_view_commit=False,
    )


async def check_tracking(bind: AsyncBind, metadata: sa.MetaData) -> list[tracking.TrackingProblem]:
    """Async :func:`sqlalchemy_matview.check_tracking`.

    Example::

        problems = await check_tracking(async_engine, metadata)
    """
    return await _run(
        bind, lambda conn: tracking.check_tracking(conn, metadata), per_view_commit=False
    )


async def freshness(bind: AsyncBind, metadata: sa.MetaData) -> list[Freshness]:
    """Async :func:`sqlalchemy_matview.freshness`.

    Example::

        late = [f.view for f in await freshness(async_engine, metadata) if f.breached]
    """
    return await _run(
        bind, lambda conn: objectives.freshness(conn, metadata), per_view_commit=False
    )


async def refresh_history(
    bind: AsyncBind,
    view: MaterializedView | str | None = None,
    *,
    limit: int = 50,
    metadata: sa.MetaData | None = None,
) -> list[history.RefreshRecord]:
    """Async :func:`sqlalchemy_matview.refresh_history`.

    Example::

        failures = [r for r in await refresh_history(async_engine, limit=20) if r.error]
    """
    return await _run(
        bind,
        lambda conn: history.refresh_history(conn, view, limit=limit, metadata=metadata),
        per_view_commit=False,
    )
