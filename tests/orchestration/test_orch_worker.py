"""RefreshWorker: debounce, whitelist, stop, and survival of connection faults."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import pytest
import sqlalchemy as sa

from sqlalchemy_matview import RefreshResult, RefreshWorker
from sqlalchemy_matview.orchestration import tracking

from .conftest import Shop, build_shop, rows, wait_for


def stale(engine) -> set[str]:
    with engine.connect() as conn:
        return {s.qualified_name for s in tracking.view_states(conn).values() if s.stale}


def test_worker_refreshes_after_change(engine, shop: Shop):
    results: list[RefreshResult] = []
    worker = RefreshWorker(engine, shop.metadata, debounce=0.2, on_result=results.append)
    worker.start()
    try:
        assert wait_for(lambda: worker.passes >= 1)  # the catch-up pass on connect
        assert worker.running
        changed = time.monotonic()
        with engine.begin() as conn:
            conn.execute(shop.orders.insert(), [{"customer": 1, "amount": 300}])
        # on_result runs once the pass is over: after both views are visible.
        assert wait_for(
            lambda: ("public.mv_totals", "refreshed") in [(r.view, r.status) for r in results]
        )
        # Not before the debounce: the notification came after `changed`.
        assert time.monotonic() - changed >= 0.2
        assert rows(engine, shop.mv_top) == [(1, 300)]
    finally:
        assert worker.stop(timeout=30)
    assert not worker.running
    assert stale(engine) == set()
    # Its listening connection is closed, not left behind.
    assert wait_for(lambda: _worker_backends(engine) == [])


def test_stop_interrupts_a_long_debounce(engine, shop: Shop):
    """stop() does not wait out the debounce of a pending change (nor run a last pass)."""
    worker = RefreshWorker(engine, shop.metadata, debounce=120, max_delay=120)
    worker.start()
    assert wait_for(lambda: worker.passes >= 1)
    with engine.begin() as conn:
        conn.execute(shop.orders.insert(), [{"customer": 1, "amount": 300}])
    # Well under the 120s debounce: stop() cut the wait short.
    assert worker.stop(timeout=30)
    assert worker.passes == 1
    assert stale(engine) == {"public.mv_totals"}


def test_worker_ignores_unknown_payloads(engine, shop: Shop, caplog):
    caplog.set_level(logging.WARNING, logger="sqlalchemy_matview")
    results: list[tuple[int, str, str]] = []
    worker: RefreshWorker

    def record(r: RefreshResult) -> None:
        results.append((worker.passes, r.view, r.status))

    def logged(payload: str) -> bool:
        return any(repr(payload) in r.getMessage() for r in caplog.records)

    def notify(payload: str) -> None:
        with engine.begin() as conn:
            conn.execute(sa.select(sa.func.pg_notify("sqlalchemy_matview", payload)))

    worker = RefreshWorker(engine, shop.metadata, debounce=0, on_result=record)
    with worker:
        assert wait_for(lambda: worker.passes >= 1)
        notify("public.pg_class")
        assert wait_for(lambda: logged("public.pg_class"))
        # The thread worker reads notifications for up to 0.25s before it decides: the
        # pause lets a pass that a wrongly accepted payload caused happen before the next
        # step looks for it. The test cannot fail because of the pause, only miss a bug.
        time.sleep(0.5)
        notify("x; DROP TABLE orders")
        assert wait_for(lambda: logged("x; DROP TABLE orders"))
        time.sleep(0.5)
        assert [r for r in results if r[0] > 1] == [], "an ignored payload caused a pass"
        assert worker.passes == 1
        # And a real change is still refreshed, by the next pass.
        with engine.begin() as conn:
            conn.execute(shop.orders.insert(), [{"customer": 1, "amount": 300}])
        assert wait_for(lambda: (2, "public.mv_totals", "refreshed") in results)
    assert not logged("public.mv_totals")


def test_debounce_is_bounded_by_max_delay(engine, shop: Shop):
    refreshed_at: list[float] = []
    worker = RefreshWorker(
        engine,
        shop.metadata,
        debounce=3.0,
        max_delay=4.0,
        on_result=lambda r: r.status == "refreshed" and refreshed_at.append(time.monotonic()),
    )
    with worker:
        assert wait_for(lambda: worker.passes >= 1)
        first_write = time.monotonic()
        with engine.begin() as conn:
            conn.execute(shop.orders.insert(), [{"customer": 1, "amount": 1}])
        # Writers notify only when a view turns stale (and while it is being refreshed), so
        # a stream of notifications is sent directly: every 0.1s never leaves 3s of quiet,
        # only max_delay can end the wait. Without it this loop would run into its deadline.
        while not refreshed_at and time.monotonic() - first_write < 60:
            with engine.begin() as conn:
                conn.execute(sa.select(sa.func.pg_notify("sqlalchemy_matview", "public.mv_totals")))
            time.sleep(0.1)
        assert refreshed_at, "max_delay did not force a refresh during continuous notifications"
        # Never before max_delay (measured from before the first write).
        assert refreshed_at[0] - first_write >= 4.0


def test_interval_pass_runs_without_notifications(engine, shop: Shop):
    worker = RefreshWorker(engine, shop.metadata, debounce=0.1, interval=0.3)
    with worker:
        assert wait_for(lambda: worker.passes >= 3)


def test_worker_rejects_async_engine_and_bad_timings(pg_url):
    from sqlalchemy.ext.asyncio import create_async_engine

    aeng = create_async_engine(pg_url.set(drivername="postgresql+psycopg_async"))
    with pytest.raises(TypeError, match="sync Engine"):
        RefreshWorker(aeng, sa.MetaData())  # type: ignore[arg-type]
    eng = sa.create_engine(pg_url)
    with pytest.raises(ValueError, match="debounce"):
        RefreshWorker(eng, build_shop().metadata, debounce=-1)
    eng.dispose()


def _worker_backends(engine) -> list[int]:
    with engine.connect() as conn:
        return list(
            conn.execute(
                sa.text(
                    "SELECT pid FROM pg_stat_activity WHERE application_name ="
                    " 'sqlalchemy_matview worker' AND datname = current_database()"
                )
            ).scalars()
        )


def test_worker_catches_up_after_its_connection_is_terminated(engine, shop: Shop):
    # A debounce longer than the test: only the catch-up pass of the reconnect can refresh.
    worker = RefreshWorker(engine, shop.metadata, debounce=120, max_delay=120, max_backoff=1.0)
    with worker:
        assert wait_for(lambda: worker.passes >= 1 and len(_worker_backends(engine)) == 1)
        [pid] = _worker_backends(engine)
        with engine.begin() as conn:
            conn.execute(shop.orders.insert(), [{"customer": 9, "amount": 999}])
        assert stale(engine) == {"public.mv_totals"}
        with engine.begin() as conn:
            assert conn.scalar(sa.select(sa.func.pg_terminate_backend(pid)))
        assert wait_for(lambda: worker.connections >= 2)
        assert wait_for(lambda: rows(engine, shop.mv_top) == [(9, 999)])
        assert wait_for(lambda: stale(engine) == set())
        assert worker.passes >= 2
        [new_pid] = _worker_backends(engine)
        assert new_pid != pid


@pytest.mark.slow
def test_worker_survives_server_restart():
    from sqlalchemy_matview.testing.launcher import PostgresServer

    with PostgresServer() as server:
        eng = sa.create_engine(server.url(server.create_database()))
        try:
            shop = build_shop()
            shop.metadata.create_all(eng)
            # A long debounce: only the reconnect's catch-up pass can refresh in time.
            worker = RefreshWorker(eng, shop.metadata, debounce=60, max_delay=60, max_backoff=1.0)
            with worker:
                assert wait_for(lambda: worker.passes >= 1)
                with eng.begin() as conn:
                    conn.execute(shop.orders.insert(), [{"customer": 4, "amount": 400}])
                assert stale(eng) == {"public.mv_totals"}
                server.restart()
                assert wait_for(lambda: worker.connections >= 2, timeout=30)
                assert wait_for(lambda: stale(eng) == set(), timeout=30)
                assert rows(eng, shop.mv_top) == [(4, 400)]
        finally:
            eng.dispose()


def test_two_workers_share_the_work(engine, shop: Shop):
    seen: list[tuple[str, str]] = []
    lock = threading.Lock()

    def record(r: RefreshResult) -> None:
        with lock:
            seen.append((r.view, r.status))

    w1 = RefreshWorker(engine, shop.metadata, debounce=0.1, on_result=record)
    w2 = RefreshWorker(engine, shop.metadata, debounce=0.1, on_result=record)
    with w1, w2:
        assert wait_for(lambda: w1.passes >= 1 and w2.passes >= 1)
        with lock:
            seen.clear()
        with engine.begin() as conn:
            conn.execute(shop.orders.insert(), [{"customer": 1, "amount": 101}])
        # Both workers hear the change and both run a pass for it.
        assert wait_for(lambda: w1.passes >= 2 and w2.passes >= 2)
        assert rows(engine, shop.mv_top) == [(1, 101)]
    refreshed = [v for v, s in seen if s == "refreshed"]
    # Each change is refreshed once: the other worker skipped it (locked or already fresh).
    assert sorted(refreshed) == ["public.mv_top", "public.mv_totals"]


def test_a_failing_on_result_is_logged_and_the_worker_goes_on(engine, shop: Shop, caplog):
    caplog.set_level(logging.ERROR, logger="sqlalchemy_matview")
    calls: list[str] = []

    def explode(r: RefreshResult) -> None:
        calls.append(r.view)
        raise RuntimeError("callback bug")

    with RefreshWorker(engine, shop.metadata, debounce=0.1, on_result=explode) as worker:
        # Called for every result of the catch-up pass, though each call raises.
        assert wait_for(lambda: calls == ["public.mv_totals", "public.mv_top"])
        with engine.begin() as conn:
            conn.execute(shop.orders.insert(), [{"customer": 1, "amount": 300}])
        assert wait_for(lambda: rows(engine, shop.mv_top) == [(1, 300)])
        assert worker.running
    assert any(
        "on_result raised for public.mv_totals" in r.getMessage() and r.exc_info
        for r in caplog.records
    )


class _SignalOnReconnect(logging.Handler):
    """Sends SIGINT to this process while it is in the middle of logging a reconnect.

    A signal handler runs between any two bytecodes of the main thread, here inside this
    handler's emit (as it would inside a console write or inside ``Event.wait()``).
    """

    def __init__(self) -> None:
        super().__init__()
        self.depth = 0
        self.deepest = 0
        self.sent = False

    def emit(self, record: logging.LogRecord) -> None:
        self.depth += 1
        self.deepest = max(self.deepest, self.depth)
        try:
            if "reconnecting" in record.getMessage() and not self.sent:
                self.sent = True
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.2)  # the Python-level handler runs in here
        finally:
            self.depth -= 1


def test_sigint_while_logging_stops_run(engine, shop: Shop):
    """SIGINT arriving in the middle of a log write stops run() (it used to be lost).

    The handler used to log and call Event.set(): a log write from inside another log
    write fails in a console stream ("reentrant call"), and Event.set() inside
    Event.wait() deadlocks. Now it only records the signal.
    """
    worker = RefreshWorker(engine, shop.metadata, debounce=0.1, max_backoff=0.2)
    spy = _SignalOnReconnect()
    logger = logging.getLogger("sqlalchemy_matview")
    logger.addHandler(spy)
    level = logger.level
    logger.setLevel(logging.INFO)  # as `matview watch` does

    def kill_listener() -> None:
        assert wait_for(lambda: _worker_backends(engine) != [])
        with engine.connect() as conn:
            conn.execute(
                sa.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid = ANY(:p)"
                ),
                {"p": _worker_backends(engine)},
            )

    killer = threading.Thread(target=kill_listener, daemon=True)
    killer.start()
    fired = threading.Event()

    def watchdog_stop() -> None:  # so that a lost signal fails the test, not hangs it
        fired.set()
        worker.stop()

    watchdog = threading.Timer(60, watchdog_stop)
    watchdog.start()
    try:
        worker.run()
    finally:
        watchdog.cancel()
        logger.removeHandler(spy)
        logger.setLevel(level)
    killer.join(5)
    assert spy.sent
    assert spy.deepest == 1, "the signal handler logged from inside a log write"
    assert not fired.is_set(), "SIGINT was lost: the watchdog stopped the worker"
    assert not worker.running
