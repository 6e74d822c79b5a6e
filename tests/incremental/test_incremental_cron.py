"""A pg_cron job refreshes an incremental view (refresh_job -> refresh() -> its function)."""

from __future__ import annotations

import datetime as dt
import time

import pytest
import sqlalchemy as sa

from sqlalchemy_matview import schedule_refresh, unschedule_refresh

from .conftest import build_dashboard, difference


@pytest.mark.slow
def test_a_pg_cron_job_recomputes_the_dirty_buckets(pg_cron_server):
    db = pg_cron_server.create_database()
    cron_engine = sa.create_engine(pg_cron_server.url("postgres"))
    app = sa.create_engine(pg_cron_server.url(db))
    try:
        with cron_engine.begin() as conn:
            conn.execute(sa.text("CREATE EXTENSION IF NOT EXISTS pg_cron"))
            version = conn.scalar(
                sa.text("SELECT extversion FROM pg_extension WHERE extname = 'pg_cron'")
            )
        major_minor = tuple(map(int, version.split("-")[0].split(".")[:2]))
        every = "1 seconds" if major_minor >= (1, 5) else "* * * * *"
        d = build_dashboard()
        d.metadata.create_all(app)
        with app.begin() as conn:
            conn.execute(
                d.events.insert(),
                [
                    {
                        "created_at": dt.datetime(2026, 3, 2, tzinfo=dt.timezone.utc),
                        "user_id": 1,
                        "kind": "view",
                    }
                ],
            )
        job = schedule_refresh(cron_engine, d.mv_daily, every, database=db, only_if_stale=True)
        try:
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                with app.connect() as conn:
                    if difference(conn, d.mv_daily) == 0:
                        break
                time.sleep(0.5)
            with app.connect() as conn:
                assert difference(conn, d.mv_daily) == 0
            with cron_engine.connect() as conn:
                failed = (
                    conn.execute(
                        sa.text(
                            "SELECT return_message FROM cron.job_run_details"
                            " WHERE jobid = :j AND status = 'failed'"
                        ),
                        {"j": job},
                    )
                    .scalars()
                    .all()
                )
            assert failed == []
        finally:
            unschedule_refresh(cron_engine, d.mv_daily, database=db)
    finally:
        app.dispose()
        cron_engine.dispose()
        pg_cron_server.drop_database(db)
