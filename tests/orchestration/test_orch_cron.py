"""pg_cron scheduling against the real extension (skips where pg_cron cannot be had)."""

from __future__ import annotations

import time

import pytest
import sqlalchemy as sa

from sqlalchemy_matview import (
    ConcurrentRefreshError,
    MaterializedView,
    schedule_refresh,
    unschedule_refresh,
)
from sqlalchemy_matview.errors import ExtensionNotInstalledError


def test_missing_extension_is_a_clear_error(engine):
    with pytest.raises(ExtensionNotInstalledError, match="CREATE EXTENSION pg_cron"):
        schedule_refresh(engine, "mv", "* * * * *")


def test_concurrently_needs_unique_key_before_any_sql():
    md = sa.MetaData()
    t = sa.Table("t", md, sa.Column("id", sa.Integer, primary_key=True))
    mv = MaterializedView("mv_nokey", md, sa.select(t.c.id))
    with pytest.raises(ConcurrentRefreshError, match="mv_nokey"):
        schedule_refresh(sa.create_engine("postgresql+psycopg://"), mv, "* * * * *")


@pytest.mark.slow
def test_schedule_runs_quoted_refresh_and_unschedule(pg_cron_server):
    db = pg_cron_server.create_database()
    cron_engine = sa.create_engine(pg_cron_server.url("postgres"))
    app = sa.create_engine(pg_cron_server.url(db))
    try:
        with cron_engine.begin() as conn:
            conn.execute(sa.text("CREATE EXTENSION IF NOT EXISTS pg_cron"))
        md = sa.MetaData()
        src = sa.Table("src", md, sa.Column("id", sa.Integer, primary_key=True))
        mv = MaterializedView('Odd "Name"', md, sa.select(src.c.id), unique_key="id")
        md.create_all(app)
        with app.begin() as conn:
            conn.execute(src.insert(), [{"id": 1}, {"id": 2}])
        with cron_engine.connect() as conn:
            version = conn.scalar(
                sa.text("SELECT extversion FROM pg_extension WHERE extname = 'pg_cron'")
            )
        # Second-granularity schedules arrived in pg_cron 1.5; older ones wait for a minute.
        every = (
            "1 seconds"
            if tuple(map(int, version.split("-")[0].split("."))) >= (1, 5)
            else "* * * * *"
        )
        job = schedule_refresh(cron_engine, mv, every, database=db)
        assert isinstance(job, int)
        with cron_engine.connect() as conn:
            command, database = conn.execute(
                sa.text("SELECT command, database FROM cron.job WHERE jobid = :j"), {"j": job}
            ).one()
        assert database == db
        assert 'REFRESH MATERIALIZED VIEW CONCURRENTLY public."Odd ""Name"""' in command
        assert "pg_advisory_xact_lock" in command
        # Rescheduling under the same name replaces the job.
        assert schedule_refresh(cron_engine, mv, every, database=db) == job
        deadline = time.monotonic() + 75
        count = 0
        while time.monotonic() < deadline:
            with app.connect() as conn:
                count = conn.scalar(sa.select(sa.func.count()).select_from(mv.table))
            if count == 2:
                break
            time.sleep(0.3)
        assert count == 2, "the pg_cron job did not refresh the view"
        with cron_engine.connect() as conn:
            failures = (
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
        assert failures == []
        assert unschedule_refresh(cron_engine, mv, database=db) is True
        assert unschedule_refresh(cron_engine, mv, database=db) is False
        named = schedule_refresh(
            cron_engine,
            'Odd "Name"',
            "0 3 * * *",
            job_name="nightly",
            concurrently=False,
            database=db,
        )
        assert unschedule_refresh(cron_engine, "nightly") is True
        assert named != job
    finally:
        app.dispose()
        cron_engine.dispose()
        pg_cron_server.drop_database(db)
