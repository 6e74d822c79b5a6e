"""Both refresh workers defend themselves: bad options, forged notifications, stuck locks."""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import time
import tracemalloc
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

import sqlalchemy_matview.asyncio as mv_asyncio
from sqlalchemy_matview import (
    MaterializedView,
    RefreshWorker,
    WorkerOptionError,
    lock_key,
    refresh_views,
)
from sqlalchemy_matview.orchestration.locking import lock_holders
from sqlalchemy_matview.orchestration.runner import RefreshOptionError

from .conftest import Shop, build_shop, rows
from .test_orch_worker import stale, wait_for

WorkerFactory = Callable[..., Any]


@pytest.fixture(params=["thread", "asyncio"])
def make_worker(request: pytest.FixtureRequest, pg_url: sa.URL) -> Iterator[WorkerFactory]:
    """Builds the thread worker or the asyncio one (psycopg) on the test database."""
    if request.param == "thread":
        engine: Any = sa.create_engine(pg_url)
        yield lambda metadata, **kw: RefreshWorker(engine, metadata, **kw)
        engine.dispose()
    else:
        aengine = create_async_engine(
            pg_url.set(drivername="postgresql+psycopg_async"), poolclass=sa.NullPool
        )
        yield lambda metadata, **kw: mv_asyncio.RefreshWorker(aengine, metadata, **kw)


class _Untracked:
    metadata = sa.MetaData()


def _untracked_metadata() -> sa.MetaData:
    md = sa.MetaData()
    t = sa.Table("t", md, sa.Column("id", sa.Integer, primary_key=True))
    MaterializedView("mv", md, sa.select(t.c.id))
    return md


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"lock": "bogus"}, r"lock='bogus': pass 'skip'"),
        ({"debounce": math.inf}, r"debounce=inf\): debounce must be a finite number"),
        ({"debounce": math.nan}, r"debounce=nan\)"),
        ({"debounce": -1}, r"debounce=-1\)"),
        ({"debounce": True}, r"debounce=True\): debounce takes a number of seconds"),
        ({"debounce": "5"}, r"debounce='5'\)"),
        ({"max_delay": math.inf}, r"max_delay=inf\)"),
        ({"max_delay": -0.5}, r"max_delay=-0.5\)"),
        ({"interval": 0}, r"interval=0\): interval must be .* more than 0"),
        ({"interval": math.nan}, r"interval=nan\)"),
        ({"max_backoff": 0}, r"max_backoff=0\)"),
        ({"max_backoff": math.inf}, r"max_backoff=inf\)"),
        ({"on_result": "print"}, r"on_result='print'\): on_result must be a function"),
        ({"channel": ""}, r"channel=''\): channel must be a non-empty string"),
        ({"channel": None}, r"channel=None\)"),
        ({"channel": "c" * 64}, r"64 bytes long; PostgreSQL channel names have at most 63"),
        ({"concurrently": "yes"}, r"concurrently='yes'"),
        ({"lock_timeout": math.inf}, r"lock_timeout=inf: pass a finite number of seconds"),
        ({"statement_timeout": math.nan}, r"statement_timeout=nan"),
        ({"lock_timeout": -1}, r"lock_timeout=-1: a timeout cannot be negative"),
    ],
)
def test_bad_options_are_refused_in_init(
    make_worker: WorkerFactory, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(WorkerOptionError, match=message) as raised:
        make_worker(build_shop().metadata, **options)
    assert isinstance(raised.value, ValueError)
    assert "RefreshWorker" in str(raised.value)


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        (None, r"metadata=NoneType\): metadata must be the sqlalchemy MetaData"),
        (_Untracked, r"\(for a declarative base, pass Base.metadata\)"),
        (sa.MetaData(), r"declares no materialized view with track_changes=True"),
        (_untracked_metadata(), r"declare track_changes=True on the views"),
    ],
)
def test_metadata_must_declare_a_tracked_view(
    make_worker: WorkerFactory, metadata: Any, message: str
) -> None:
    with pytest.raises(WorkerOptionError, match=message):
        make_worker(metadata)


def test_refresh_timeouts_must_be_finite(engine: sa.Engine) -> None:
    # Refused before anything is sent, whatever the view.
    for value in (math.inf, math.nan, -math.inf):
        with pytest.raises(RefreshOptionError, match="lock_timeout"):
            refresh_views(engine, "mv_missing", lock_timeout=value)
        with pytest.raises(RefreshOptionError, match="statement_timeout"):
            refresh_views(engine, "mv_missing", statement_timeout=value)


# -- forged notifications ----------------------------------------------------------------

FLOOD = 20_000
PAYLOAD = 7_000  # characters; PostgreSQL allows up to 8000 bytes


@pytest.fixture
def forger(engine: sa.Engine) -> Iterator[sa.Engine]:
    """An engine logged in as a role that has nothing but CONNECT (from PUBLIC)."""
    role = f"forger_{uuid.uuid4().hex[:8]}"
    with engine.begin() as conn:
        conn.exec_driver_sql(f"CREATE ROLE {role} LOGIN")
    forged = sa.create_engine(engine.url.set(username=role, password=None))
    with forged.connect() as conn:
        assert conn.scalar(sa.text("SELECT current_user")) == role
        assert not conn.scalar(
            sa.text("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
        )
    yield forged
    forged.dispose()
    with engine.begin() as conn:
        conn.exec_driver_sql(f"DROP ROLE {role}")


def _flood(forged: sa.Engine, count: int, tag: str) -> None:
    """``count`` distinct payloads of PAYLOAD characters on the worker's channel."""
    with forged.begin() as conn:
        conn.execute(
            sa.text(
                "SELECT pg_notify('sqlalchemy_matview', :tag || g || repeat('x', :pad)) "
                "FROM generate_series(1, :n) AS g"
            ),
            {"tag": tag, "pad": PAYLOAD, "n": count},
        )


def _notification_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and "notification" in r.getMessage()
    ]


def _measure_flood(
    forged: sa.Engine, ignored: Callable[[], int], caplog: pytest.LogCaptureFixture
) -> None:
    """Send FLOOD forged payloads; assert bounded memory and log lines (the caller's worker
    runs in another thread or task and counts them)."""
    _flood(forged, 100, "warm-up ")  # one-time allocations and the first log lines
    assert wait_for(lambda: ignored() == 100, timeout=60)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        started = time.monotonic()
        _flood(forged, FLOOD, "forged ")
        assert wait_for(lambda: ignored() == 100 + FLOOD, timeout=240), ignored()
        elapsed = time.monotonic() - started
        gc.collect()
        growth = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    print(
        f"{FLOOD} forged payloads of {PAYLOAD} characters in {elapsed:.1f}s: "
        f"memory {growth / 1024:+.1f} kB"
    )
    # Keeping them would take FLOOD * PAYLOAD = 140 MB.
    assert growth < 1_000_000
    lines = _notification_lines(caplog)
    # 3 lines a minute at most (the flood takes seconds here).
    assert len(lines) <= 3 * (1 + int(elapsed // 60)) + 1, lines
    assert all(len(line) < 400 for line in lines), "a payload was logged whole"


def test_a_flood_of_forged_notifications_costs_bounded_memory_and_log(
    engine: sa.Engine, shop: Shop, forger: sa.Engine, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sqlalchemy_matview")
    worker = RefreshWorker(engine, shop.metadata, debounce=0.1)
    with worker:
        assert wait_for(lambda: worker.passes >= 1)
        passes = worker.passes
        _measure_flood(forger, lambda: worker.ignored_notifications, caplog)
        assert worker.passes == passes, "a forged payload caused a pass"
        # The worker still does its job.
        with engine.begin() as conn:
            conn.execute(shop.orders.insert(), [{"customer": 1, "amount": 300}])
        assert wait_for(lambda: rows(engine, shop.mv_top) == [(1, 300)])


def test_the_asyncio_worker_bounds_a_flood_too(
    async_engine: AsyncEngine,
    engine: sa.Engine,
    forger: sa.Engine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="sqlalchemy_matview")
    shop = build_shop()
    shop.metadata.create_all(engine)

    async def main() -> None:
        worker = mv_asyncio.RefreshWorker(async_engine, shop.metadata, debounce=0.1)
        async with worker:
            while worker.passes < 1:
                await asyncio.sleep(0.05)
            # The flood is sent and measured from a thread: the loop keeps serving the worker.
            await asyncio.to_thread(
                _measure_flood, forger, lambda: worker.ignored_notifications, caplog
            )
            assert worker.passes == 1, "a forged payload caused a pass"

    asyncio.run(main())


# -- a lock held elsewhere ----------------------------------------------------------------


@pytest.fixture
def hog(pg_url: sa.URL) -> Iterator[sa.Connection]:
    """A session named 'lock hog' that will hold a view's advisory lock."""
    engine = sa.create_engine(pg_url, connect_args={"application_name": "lock hog"})
    with engine.connect() as conn:
        yield conn
    engine.dispose()


def _listeners(engine: sa.Engine) -> list[int]:
    with engine.connect() as conn:
        return list(
            conn.execute(
                sa.text(
                    "SELECT pid FROM pg_stat_activity WHERE application_name = "
                    "'sqlalchemy_matview worker' AND datname = current_database()"
                )
            ).scalars()
        )


def test_lock_holders_names_the_session(engine: sa.Engine, hog: sa.Connection) -> None:
    key = lock_key(("public", "mv_x"))
    assert lock_holders(hog, key) == []
    pid = hog.scalar(sa.text("SELECT pg_backend_pid()"))
    hog.execute(sa.select(sa.func.pg_advisory_lock(sa.literal(key, sa.BigInteger))))
    with engine.connect() as conn:
        [holder] = lock_holders(conn, key)
        assert (holder.pid, holder.granted, holder.application_name) == (pid, True, "lock hog")
        assert lock_holders(conn, lock_key(("public", "mv_y"))) == []
    hog.execute(sa.select(sa.func.pg_advisory_unlock(sa.literal(key, sa.BigInteger))))
    hog.commit()


def test_a_view_locked_elsewhere_is_named_and_retried_even_after_a_reconnect(
    engine: sa.Engine,
    shop: Shop,
    hog: sa.Connection,
    make_worker: WorkerFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="sqlalchemy_matview")
    key = sa.literal(lock_key(shop.mv_totals), sa.BigInteger)
    hog_pid = hog.scalar(sa.text("SELECT pg_backend_pid()"))
    hog.execute(sa.select(sa.func.pg_advisory_lock(key)))  # session-level: outlives commit
    hog.commit()
    with engine.begin() as conn:
        conn.execute(shop.orders.insert(), [{"customer": 2, "amount": 200}])
    results: list[tuple[int, str, str]] = []
    worker = make_worker(
        shop.metadata,
        debounce=0.1,
        max_delay=1.0,
        max_backoff=0.5,
        on_result=lambda r: results.append((worker.connections, r.view, r.status)),
    )

    def warned() -> list[str]:
        return [
            r.getMessage()
            for r in caplog.records
            if r.levelno == logging.WARNING and "public.mv_totals skipped for" in r.getMessage()
        ]

    def run_scenario() -> None:
        # Locked at the very first pass, and still locked at the retries that follow.
        assert wait_for(lambda: (1, "public.mv_totals", "skipped_locked") in results)
        assert wait_for(lambda: len(warned()) >= 1)
        [line, *_] = warned()
        assert f"pid {hog_pid} (application_name 'lock hog'" in line, line
        # Lose the listening connection while the lock is still held: the catch-up pass of
        # the reconnect finds the view locked too, and must retry it once it is released.
        [listener] = _listeners(engine)
        with engine.begin() as conn:
            conn.execute(sa.select(sa.func.pg_terminate_backend(listener)))
        assert wait_for(lambda: (2, "public.mv_totals", "skipped_locked") in results)
        hog.execute(sa.select(sa.func.pg_advisory_unlock(key)))
        hog.commit()
        assert wait_for(lambda: (2, "public.mv_totals", "refreshed") in results)
        assert stale(engine) == set()
        assert rows(engine, shop.mv_top) == [(2, 200)]

    if isinstance(worker, RefreshWorker):
        with worker:
            run_scenario()
    else:

        async def main() -> None:
            async with worker:
                await asyncio.to_thread(run_scenario)

        asyncio.run(main())
