"""pg_cron scheduling against the real extension (skips where pg_cron cannot be had)."""

from __future__ import annotations

import time
import uuid

import pytest
import sqlalchemy as sa

from sqlalchemy_matview import (
    ConcurrentRefreshError,
    MaterializedView,
    lock_key,
    refresh_stale,
    refresh_views,
    schedule_refresh,
    unschedule_refresh,
)
from sqlalchemy_matview.errors import ExtensionNotInstalledError
from sqlalchemy_matview.orchestration import tracking
from sqlalchemy_matview.orchestration.cron import job_name_for, refresh_command

from .conftest import Shop, rows


@pytest.fixture
def cron_db(pg_cron_server):
    """(engine on pg_cron's database, engine on a fresh app database, its name)."""
    db = pg_cron_server.create_database()
    cron_engine = sa.create_engine(pg_cron_server.url("postgres"))
    app = sa.create_engine(pg_cron_server.url(db))
    try:
        with cron_engine.begin() as conn:
            conn.execute(sa.text("CREATE EXTENSION IF NOT EXISTS pg_cron"))
        yield cron_engine, app, db
    finally:
        app.dispose()
        cron_engine.dispose()
        pg_cron_server.drop_database(db)


def _states(engine):
    with engine.connect() as conn:
        return tracking.view_states(conn)


def test_missing_extension_is_a_clear_error(engine):
    with pytest.raises(ExtensionNotInstalledError, match="CREATE EXTENSION pg_cron"):
        schedule_refresh(engine, "mv", "* * * * *")


def test_concurrently_needs_unique_key_before_any_sql():
    md = sa.MetaData()
    t = sa.Table("t", md, sa.Column("id", sa.Integer, primary_key=True))
    mv = MaterializedView("mv_nokey", md, sa.select(t.c.id))
    with pytest.raises(ConcurrentRefreshError, match="mv_nokey"):
        schedule_refresh(sa.create_engine("postgresql+psycopg://"), mv, "* * * * *")


def test_job_command_refreshes_and_records_like_refresh_views(engine, shop: Shop):
    """The job's SQL, run here by hand, does what refresh_views does for one view."""
    command = refresh_command(shop.mv_totals)
    with engine.begin() as conn:
        conn.execute(shop.orders.insert(), [{"customer": 1, "amount": 150}])
    with engine.connect() as holder:
        holder.execute(sa.select(sa.func.pg_advisory_xact_lock(lock_key(shop.mv_totals))))
        with engine.begin() as conn:
            assert conn.exec_driver_sql(command).scalar() == "skipped_locked"
        holder.rollback()
    assert rows(engine, shop.mv_totals) == []
    assert _states(engine)[("public", "mv_totals")].stale
    with engine.begin() as conn:
        assert conn.exec_driver_sql(command).scalar() == "refreshed"
    assert rows(engine, shop.mv_totals) == [(1, 150)]
    states = _states(engine)
    totals, top = states[("public", "mv_totals")], states[("public", "mv_top")]
    assert not totals.stale and totals.refresh_count == 1
    assert totals.last_concurrently is True and totals.last_duration is not None
    assert totals.last_refreshed_at is not None
    assert top.stale  # the refresh marked the view reading it stale, as refresh_views does
    # So refresh_stale has only the dependent left to do.
    assert {r.view: r.status for r in refresh_stale(engine, shop.metadata)} == {
        "public.mv_totals": "skipped_fresh",
        "public.mv_top": "refreshed",
    }
    # And refresh_views records the same way, through the same function.
    [again] = refresh_views(engine, shop.mv_totals, concurrently=False)
    assert again.status == "refreshed"
    totals = _states(engine)[("public", "mv_totals")]
    assert totals.refresh_count == 2 and totals.last_concurrently is False


def test_job_command_quotes_names_as_literals():
    command = refresh_command('it\'s "odd"', schema="S c", concurrently=False)
    assert command.startswith("CALL sqlalchemy_matview.refresh_job(")
    assert "'S c', 'it''s \"odd\"', " in command
    key = lock_key(("S c", 'it\'s "odd"'))
    assert f"{key}, false, 'skip', false)" in command


def test_schedule_installs_the_refresh_function(cron_db):
    cron_engine, app, db = cron_db
    with app.begin() as conn:
        conn.execute(sa.text("CREATE TABLE t (id int PRIMARY KEY)"))
        conn.execute(sa.text("CREATE MATERIALIZED VIEW mv_plain AS SELECT id FROM t"))
        assert not tracking.state_tables_exist(conn)
    job = schedule_refresh(cron_engine, "mv_plain", "0 3 * * *", concurrently=False, database=db)
    with app.connect() as conn:
        assert tracking.state_tables_exist(conn)
    assert unschedule_refresh(cron_engine, "mv_plain", database=db) is True
    assert isinstance(job, int)


def _every(cron_engine: sa.Engine) -> str:
    """The most frequent schedule this pg_cron allows."""
    with cron_engine.connect() as conn:
        version = conn.scalar(
            sa.text("SELECT extversion FROM pg_extension WHERE extname = 'pg_cron'")
        )
    # Second-granularity schedules arrived in pg_cron 1.5; older ones wait for a minute.
    major_minor = tuple(map(int, version.split("-")[0].split(".")[:2]))
    return "1 seconds" if major_minor >= (1, 5) else "* * * * *"


def _job(cron_engine: sa.Engine, job: int) -> tuple[str, str, str]:
    with cron_engine.connect() as conn:
        row = conn.execute(
            sa.text("SELECT command, database, jobname FROM cron.job WHERE jobid = :j"),
            {"j": job},
        ).one()
    return row.command, row.database, row.jobname


def _failures(cron_engine: sa.Engine, job: int) -> list[str]:
    with cron_engine.connect() as conn:
        return list(
            conn.execute(
                sa.text(
                    "SELECT return_message FROM cron.job_run_details"
                    " WHERE jobid = :j AND status = 'failed'"
                ),
                {"j": job},
            ).scalars()
        )


def _wait_for_count(engine: sa.Engine, table: sa.Table, expected: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    count = -1
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            count = conn.scalar(sa.select(sa.func.count()).select_from(table))
        if count == expected:
            break
        time.sleep(0.3)
    return count


@pytest.mark.slow
def test_scheduled_jobs_run_in_the_same_and_in_another_database(cron_db):
    """Both ways of scheduling, waited for until pg_cron has run each job.

    ``schedule_refresh(bind, view, ...)`` with the view in pg_cron's own database (the
    documented default, ``cron.schedule``), and with ``database=`` naming another one
    (``cron.schedule_in_database``). Both jobs are scheduled first so that one minute
    boundary serves both on a pg_cron without second schedules.
    """
    cron_engine, app, db = cron_db
    every = _every(cron_engine)

    # In another database, with names that need quoting.
    md = sa.MetaData()
    src = sa.Table("src", md, sa.Column("id", sa.Integer, primary_key=True))
    mv = MaterializedView(
        'Odd "Name"', md, sa.select(src.c.id), unique_key="id", track_changes=True
    )
    MaterializedView("mv_reader", md, sa.select(mv.c.id))
    md.create_all(app)
    with app.begin() as conn:
        conn.execute(src.insert(), [{"id": 1}, {"id": 2}])
    assert _states(app)[("public", 'Odd "Name"')].stale

    # In pg_cron's own database, in a schema of the test's own (the database is shared).
    schema = f"cron_same_{uuid.uuid4().hex[:8]}"
    with cron_engine.begin() as conn:
        conn.execute(sa.schema.CreateSchema(schema))
    local_md = sa.MetaData(schema=schema)
    local_src = sa.Table("src", local_md, sa.Column("id", sa.Integer, primary_key=True))
    local_mv = MaterializedView(
        "mv_local", local_md, sa.select(local_src.c.id), unique_key="id", schema=schema
    )
    local_md.create_all(cron_engine)
    with cron_engine.begin() as conn:
        conn.execute(local_src.insert(), [{"id": 1}, {"id": 2}, {"id": 3}])
    try:
        job = schedule_refresh(cron_engine, mv, every, database=db)
        local_job = schedule_refresh(cron_engine, local_mv, every)
        assert isinstance(job, int) and isinstance(local_job, int) and job != local_job

        command, database, name = _job(cron_engine, job)
        assert database == db
        # cron.job.jobname is a `name`: PostgreSQL keeps its first 63 bytes.
        assert name == job_name_for(mv, database=db)[:63]
        assert command == refresh_command(mv)
        assert command.startswith("CALL sqlalchemy_matview.refresh_job('public', 'Odd \"Name\"', ")
        assert f"{lock_key(mv)}, true, 'skip', false)" in command
        local_command, local_database, local_name = _job(cron_engine, local_job)
        assert local_database == "postgres"  # the bind's own database
        assert local_name == f"sqlalchemy_matview refresh {schema}.mv_local"
        assert local_command == refresh_command(local_mv)
        # Rescheduling under the same name replaces the job.
        assert schedule_refresh(cron_engine, mv, every, database=db) == job

        assert _wait_for_count(cron_engine, local_mv.table, 3, timeout=90) == 3, (
            f"the job in pg_cron's own database did not refresh the view: "
            f"{_failures(cron_engine, local_job)}"
        )
        assert _wait_for_count(app, mv.table, 2, timeout=90) == 2, (
            f"the job in another database did not refresh the view: {_failures(cron_engine, job)}"
        )
        assert _failures(cron_engine, job) == []
        assert _failures(cron_engine, local_job) == []
        # The job recorded itself and cleared the marks, as refresh_views would have.
        local_state = _states(cron_engine)[(schema, "mv_local")]
        assert local_state.refresh_count >= 1 and local_state.last_concurrently is True
        states = _states(app)
        state = states[("public", 'Odd "Name"')]
        assert not state.stale and state.refresh_count >= 1
        assert state.last_refreshed_at is not None and state.last_duration is not None
        assert state.last_concurrently is True
        assert states[("public", "mv_reader")].stale
        assert [r.status for r in refresh_stale(app, md)] == ["skipped_fresh", "refreshed"]
    finally:
        unschedule_refresh(cron_engine, local_mv)
        local_md.drop_all(cron_engine)
        with cron_engine.begin() as conn:
            conn.execute(sa.schema.DropSchema(schema, cascade=True))
    assert unschedule_refresh(cron_engine, mv, database=db) is True
    assert unschedule_refresh(cron_engine, mv, database=db) is False
    assert unschedule_refresh(cron_engine, local_mv) is False
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


def test_only_if_stale_job_command_skips_a_fresh_view(engine, shop: Shop):
    command = refresh_command(shop.mv_totals, only_if_stale=True)
    assert ", true, 'skip', true)" in command  # concurrently, lock mode, only_if_stale
    refresh_views(engine, shop.mv_totals)  # fresh now
    with engine.begin() as conn:
        assert conn.exec_driver_sql(command).scalar() == "skipped_fresh"
    with engine.begin() as conn:
        conn.execute(shop.orders.insert(), [{"customer": 2, "amount": 40}])
    with engine.begin() as conn:
        assert conn.exec_driver_sql(command).scalar() == "refreshed"
    assert rows(engine, shop.mv_totals) == [(2, 40)]
    with engine.begin() as conn:
        assert conn.exec_driver_sql(command).scalar() == "skipped_fresh"


def test_schedule_refuses_bad_arguments_before_any_sql():
    unreachable = sa.create_engine("postgresql+psycopg://nobody@127.0.0.1:1/none")
    with pytest.raises(ValueError, match="cron expression"):
        schedule_refresh(unreachable, "mv_daily", "  ")
    with pytest.raises(TypeError, match="MaterializedView, its Table or a view name"):
        schedule_refresh(unreachable, 42, "* * * * *")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Engine, a Connection or a Session"):
        schedule_refresh(object(), "mv_daily", "* * * * *")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Engine, a Connection or a Session"):
        unschedule_refresh(object(), "mv_daily")  # type: ignore[arg-type]


def test_schedule_through_a_connection_and_a_session(cron_db):
    from sqlalchemy.orm import Session

    cron_engine, app, db = cron_db
    with app.begin() as conn:
        conn.execute(sa.text("CREATE TABLE t (id int PRIMARY KEY)"))
        conn.execute(sa.text("CREATE MATERIALIZED VIEW mv_plain AS SELECT id FROM t"))
    with cron_engine.connect() as conn:
        job = schedule_refresh(conn, "mv_plain", "0 3 * * *", concurrently=False, database=db)
        conn.commit()
    with Session(cron_engine) as session:
        assert unschedule_refresh(session, "mv_plain", database=db) is True
        session.commit()
    with cron_engine.connect() as conn:
        assert (
            conn.scalar(sa.text("SELECT count(*) FROM cron.job WHERE jobid = :j"), {"j": job}) == 0
        )
    # database= naming the bind's own database is the same as leaving it out.
    with cron_engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE IF NOT EXISTS cron_own (id int PRIMARY KEY)"))
        conn.execute(
            sa.text("CREATE MATERIALIZED VIEW IF NOT EXISTS mv_cron_own AS SELECT id FROM cron_own")
        )
    try:
        own = schedule_refresh(
            cron_engine, "mv_cron_own", "0 4 * * *", concurrently=False, database="postgres"
        )
        assert _job(cron_engine, own)[1] == "postgres"
        assert unschedule_refresh(cron_engine, "mv_cron_own", database="postgres") is True
    finally:
        with cron_engine.begin() as conn:
            conn.execute(sa.text("DROP MATERIALIZED VIEW IF EXISTS mv_cron_own"))
            conn.execute(sa.text("DROP TABLE IF EXISTS cron_own"))


def test_schedule_into_a_database_that_does_not_exist(cron_db):
    cron_engine, _, _ = cron_db
    with pytest.raises(tracking.TrackingError, match="no_such_db"):
        schedule_refresh(cron_engine, "mv_daily", "0 3 * * *", database="no_such_db")
    with cron_engine.connect() as conn:
        names = conn.execute(sa.text("SELECT jobname FROM cron.job")).scalars().all()
    assert not any("no_such_db" in n for n in names)  # nothing was scheduled
