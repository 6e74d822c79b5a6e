"""``matview status``: the table and ``--json``, from the catalog and the tracking state."""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable

import sqlalchemy as sa
from click.testing import CliRunner

from sqlalchemy_matview.cli import main


def _status(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["status", *args], catch_exceptions=False)
    return result.exit_code, result.output


def test_status_empty_database(url_text: str) -> None:
    code, out = _status("--url", url_text)
    assert code == 0
    assert "No materialized views." in out
    code, out = _status("--url", url_text, "--json")
    assert (code, json.loads(out)) == (0, [])


def test_status_json_reports_catalog_facts(engine: sa.Engine, url_text: str) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE SCHEMA reports"))
        conn.execute(sa.text("CREATE TABLE t AS SELECT g AS id FROM generate_series(1, 500) g"))
        conn.execute(sa.text("CREATE VIEW v AS SELECT id FROM t WHERE id > 10"))
        conn.execute(sa.text('CREATE MATERIALIZED VIEW reports."Big View" AS SELECT id FROM v'))
        conn.execute(sa.text('CREATE UNIQUE INDEX big_id ON reports."Big View" (id)'))
        conn.execute(sa.text("CREATE MATERIALIZED VIEW empty_mv AS SELECT 1 AS x WITH NO DATA"))
        conn.execute(sa.text('ANALYZE reports."Big View"'))
    code, out = _status("--url", url_text, "--json")
    assert code == 0, out
    rows = {row["view"]: row for row in json.loads(out)}
    assert set(rows) == {"public.empty_mv", "reports.Big View"}
    big = rows["reports.Big View"]
    assert big["populated"] is True
    assert big["row_estimate"] == 490
    assert big["size_bytes"] > 0
    assert big["concurrent_capable"] is True and big["concurrent_index"] == "big_id"
    assert big["depends_on"] == ["public.v"]
    assert big["declared"] is None  # no --metadata given
    empty = rows["public.empty_mv"]
    assert empty["populated"] is False
    assert empty["concurrent_capable"] is False
    assert empty["depends_on"] == []

    code, out = _status("--url", url_text, "--schema", "reports", "--json")
    assert [row["view"] for row in json.loads(out)] == ["reports.Big View"]


def test_status_table_lists_views(engine: sa.Engine, url_text: str) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE MATERIALIZED VIEW mv_one AS SELECT 1 AS one"))
    code, out = _status("--url", url_text)
    assert code == 0
    assert "public.mv_one" in out
    assert "populated" in out and "concurrent" in out


def test_status_with_metadata_shows_declared_missing_and_tracking(
    engine: sa.Engine, url_text: str, models_module: Callable[..., str]
) -> None:
    name = models_module()
    models = importlib.import_module(name)
    models.events.create(engine)
    models.mv_counts.create(engine)  # mv_total stays missing
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE MATERIALIZED VIEW stray AS SELECT 1 AS x"))
        conn.execute(models.events.insert(), [{"id": 1, "kind": "a"}])

    code, out = _status("--url", url_text, "--metadata", f"{name}:metadata", "--json")
    assert code == 0, out
    rows = {row["view"]: row for row in json.loads(out)}
    assert rows["public.mv_counts"]["declared"] == "managed"
    assert rows["public.mv_counts"]["tracked"] is True
    assert rows["public.mv_counts"]["stale"] is True
    assert rows["public.mv_counts"]["stale_since"] is not None
    assert rows["public.mv_total"]["exists"] is False
    assert rows["public.mv_total"]["declared"] == "managed"
    assert rows["public.stray"]["declared"] == "undeclared"
    assert rows["public.stray"]["tracked"] is False

    code, out = _status("--url", url_text, "--metadata", f"{name}:metadata")
    assert code == 0, out
    assert "missing" in out and "undeclared" in out and "ago" in out


def test_status_does_not_wait_behind_a_plain_refresh(engine: sa.Engine, url_text: str) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE MATERIALIZED VIEW mv_busy AS SELECT 1 AS one"))
    with engine.connect() as refresher:
        # ACCESS EXCLUSIVE on mv_busy until rollback: anything that locks the view would hang.
        refresher.execute(sa.text("REFRESH MATERIALIZED VIEW mv_busy"))
        runner = CliRunner(env={"PGOPTIONS": "-c lock_timeout=2s"})
        result = runner.invoke(main, ["status", "--url", url_text, "--json"])
        refresher.rollback()
    assert result.exit_code == 0, result.output
    assert [row["view"] for row in json.loads(result.output)] == ["public.mv_busy"]


def test_status_shows_pending_changes_and_broken_tracking_and_check_fails(
    engine: sa.Engine, url_text: str, models_module: Callable[..., str]
) -> None:
    name = models_module()
    models = importlib.import_module(name)
    models.metadata.create_all(engine)
    args = ("--url", url_text, "--metadata", f"{name}:metadata")
    assert _status(*args, "--check")[0] == 0
    for i in range(3):  # three writing transactions
        with engine.begin() as conn:
            conn.execute(models.events.insert(), [{"id": i, "kind": "a"}])
    code, out = _status(*args, "--json", "--check")
    assert code == 0, out
    rows = {row["view"]: row for row in json.loads(out)}
    assert rows["public.mv_counts"]["pending_changes"] == 1  # marks, not transactions
    assert rows["public.mv_counts"]["tracking_problems"] == []
    code, out = _status(*args)
    assert "1 pending" in out

    with engine.begin() as conn:
        conn.execute(sa.text("DROP TRIGGER sqlalchemy_matview_stmt ON events"))
    code, out = _status(*args)
    assert code == 0  # without --check it only reports
    assert "tracking broken" in out
    assert "error: change tracking of public.mv_counts: trigger sqlalchemy_matview_stmt" in out
    code, out = _status(*args, "--check")
    assert code == 1
    assert "Error: change tracking broken: public.mv_counts" in out
    models.metadata.create_all(engine)  # repairs it
    assert _status(*args, "--check")[0] == 0
