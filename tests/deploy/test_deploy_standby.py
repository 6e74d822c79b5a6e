"""On a streaming hot standby: readers see a refresh once it is replayed; status works."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from sqlalchemy_matview import MaterializedView, refresh_views
from sqlalchemy_matview.cli import main
from sqlalchemy_matview.testing.components import StandbyServer


@pytest.fixture
def replica(standby_server: StandbyServer, pg_url: sa.URL) -> Iterator[sa.Engine]:
    assert pg_url.database is not None
    standby_server.wait_for_replay()  # the test's database exists there too
    engine = sa.create_engine(standby_server.url(pg_url.database))
    try:
        yield engine
    finally:
        engine.dispose()


def _declare() -> tuple[sa.MetaData, sa.Table, MaterializedView]:
    md = sa.MetaData()
    t = sa.Table("t", md, sa.Column("id", sa.Integer, primary_key=True))
    mv = MaterializedView(
        "mv_sum", md, sa.select(sa.func.count().label("n")).select_from(t), track_changes=True
    )
    return md, t, mv


def test_readers_on_the_standby_see_a_refresh_once_replayed(
    engine: sa.Engine, replica: sa.Engine, standby_server: StandbyServer
) -> None:
    md, t, mv = _declare()
    md.create_all(engine)
    with engine.begin() as conn:
        conn.execute(t.insert(), [{"id": i} for i in range(1, 101)])
    # The view must exist on the standby before polling it: only the refresh's lag is measured.
    standby_server.wait_for_replay()
    [result] = refresh_views(engine, mv)
    assert result.status == "refreshed"
    refreshed_at = time.monotonic()
    # Poll the standby as a reader would, until the refreshed rows are there.
    with replica.connect() as conn:
        assert conn.scalar(sa.text("SELECT pg_is_in_recovery()")) is True
        while True:
            count = conn.scalar(sa.select(mv.c.n))
            conn.rollback()
            if count == 100:
                break
            assert time.monotonic() - refreshed_at < 60, "the refresh never reached the standby"
            time.sleep(0.005)
    lag = time.monotonic() - refreshed_at
    print(f"refresh visible on the standby {lag * 1000:.1f} ms after the primary's commit")
    with standby_server.primary._connect() as primary:
        row = primary.execute(
            "SELECT replay_lag FROM pg_stat_replication WHERE application_name = 'walreceiver'"
        ).fetchone()
    print(f"pg_stat_replication.replay_lag: {row[0] if row else None}")


def test_status_works_read_only_on_the_standby(
    engine: sa.Engine, standby_server: StandbyServer, pg_url: sa.URL
) -> None:
    md, t, _ = _declare()
    md.create_all(engine)
    with engine.begin() as conn:
        conn.execute(t.insert(), [{"id": 1}])  # mv_sum is stale now
    standby_server.wait_for_replay()
    assert pg_url.database is not None
    url = standby_server.url(pg_url.database).set(drivername="postgresql")
    result = CliRunner().invoke(
        main, ["status", "--json", "--url", url.render_as_string(hide_password=False)]
    )
    assert result.exit_code == 0, result.output
    [row] = json.loads(result.output)
    assert row["view"] == "public.mv_sum"
    assert row["populated"] is True
    assert row["tracked"] is True and row["stale"] is True


def test_freshness_history_and_check_work_read_only_on_the_standby(
    engine: sa.Engine, replica: sa.Engine, standby_server: StandbyServer, pg_url: sa.URL
) -> None:
    import datetime
    import sys
    import types

    from sqlalchemy_matview import freshness, refresh_history

    md, t, mv = _declare()
    mv.max_staleness = datetime.timedelta(hours=1)
    md.create_all(engine)
    refresh_views(engine, mv)
    with engine.begin() as conn:
        conn.execute(t.insert(), [{"id": 1}])  # stale now, well within the objective
    standby_server.wait_for_replay()

    [report] = freshness(replica, md)
    assert (report.view, report.tracked, report.populated) == ("public.mv_sum", True, True)
    assert report.stale_since is not None and not report.breached
    assert [r.status for r in refresh_history(replica, mv)] == ["refreshed"]

    module = types.ModuleType("standby_models")
    module.metadata = md  # type: ignore[attr-defined]
    sys.modules["standby_models"] = module
    try:
        assert pg_url.database is not None
        url = standby_server.url(pg_url.database).set(drivername="postgresql")
        args = ["--url", url.render_as_string(hide_password=False)]
        checked = CliRunner().invoke(
            main, ["check", *args, "--metadata", "standby_models:metadata"]
        )
        assert (checked.exit_code, checked.output) == (0, "OK: 1 view(s) checked\n")
        status = CliRunner().invoke(
            main, ["status", "--json", *args, "--metadata", "standby_models:metadata"]
        )
        assert status.exit_code == 0, status.output
        [row] = json.loads(status.output)
        assert (row["max_staleness"], row["breached"]) == (3600.0, False)
    finally:
        del sys.modules["standby_models"]
