"""matview check: one line per problem and exit 1 (breach, unpopulated, broken tracking)."""

from __future__ import annotations

import importlib
import textwrap
from collections.abc import Callable

import sqlalchemy as sa
from click.testing import CliRunner

from sqlalchemy_matview.cli import main

MODELS = textwrap.dedent(
    """\
    import datetime

    import sqlalchemy as sa
    from sqlalchemy_matview import MaterializedView

    metadata = sa.MetaData()
    events = sa.Table("events", metadata, sa.Column("id", sa.Integer, primary_key=True))
    mv_count = MaterializedView(
        "mv_count", metadata, sa.select(sa.func.count().label("n")).select_from(events),
        track_changes=True, max_staleness=datetime.timedelta(milliseconds=1),
    )
    mv_later = MaterializedView(
        "mv_later", metadata, sa.select(events.c.id), with_data=False,
    )
    """
)


def check(url_text: str, name: str) -> tuple[int, list[str]]:
    result = CliRunner().invoke(
        main, ["check", "--url", url_text, "--metadata", f"{name}:metadata"]
    )
    return result.exit_code, result.output.splitlines()


def test_check_reports_each_problem_then_passes(
    engine: sa.Engine, url_text: str, models_module: Callable[..., str]
) -> None:
    name = models_module(MODELS)
    models = importlib.import_module(name)
    models.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(models.events.insert(), [{"id": 1}])
        conn.execute(sa.text("ALTER TABLE events DISABLE TRIGGER USER"))

    code, lines = check(url_text, name)
    assert code == 1, lines
    assert any(line.startswith("public.mv_later: not populated") for line in lines), lines
    assert any(
        line.startswith("public.mv_count: ") and "old, objective 0s" in line for line in lines
    ), lines
    assert any(line.startswith("public.mv_count: change tracking broken") for line in lines)
    status = CliRunner(env={"COLUMNS": "300"}).invoke(
        main, ["status", "--url", url_text, "--metadata", f"{name}:metadata"]
    )
    assert "BREACHED (0s)" in status.output, status.output

    with engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE events ENABLE TRIGGER USER"))
    models.metadata.create_all(engine)  # repairs the tracking
    from sqlalchemy_matview import refresh_views

    refresh_views(engine, models.mv_count, models.mv_later)
    code, lines = check(url_text, name)
    assert (code, lines) == (0, ["OK: 2 view(s) checked"])


def test_check_needs_metadata(url_text: str) -> None:
    result = CliRunner().invoke(main, ["check", "--url", url_text])
    assert result.exit_code == 2
    assert "--metadata" in result.output


FAILING = textwrap.dedent(
    """\
    import sqlalchemy as sa
    from sqlalchemy_matview import MaterializedView

    metadata = sa.MetaData()
    divisors = sa.Table("divisors", metadata, sa.Column("d", sa.Integer))
    mv_ratio = MaterializedView(
        "mv_ratio", metadata, sa.select((sa.literal(1) / divisors.c.d).label("r")),
        track_changes=True,
    )
    """
)


def test_history_and_check_show_a_failed_refresh(
    engine: sa.Engine, url_text: str, models_module: Callable[..., str]
) -> None:
    import json

    from sqlalchemy_matview import refresh_views

    name = models_module(FAILING)
    models = importlib.import_module(name)
    models.metadata.create_all(engine)
    refresh_views(engine, models.mv_ratio)
    with engine.begin() as conn:
        conn.execute(models.divisors.insert(), [{"d": 0}])
    (result,) = refresh_views(engine, models.mv_ratio)
    assert result.status == "failed"

    runner = CliRunner(env={"COLUMNS": "200"})
    shown = runner.invoke(main, ["history", "--url", url_text, "mv_ratio"])
    assert shown.exit_code == 0, shown.output
    lines = [line for line in shown.output.splitlines() if "public.mv_ratio" in line]
    assert len(lines) == 2
    assert "failed" in lines[0] and "division by zero" in lines[0]
    assert "refreshed" in lines[1]

    as_json = runner.invoke(main, ["history", "--url", url_text, "--json", "--limit", "1"])
    (record,) = json.loads(as_json.output)
    assert (record["view"], record["status"]) == ("public.mv_ratio", "failed")

    code, lines = check(url_text, name)
    assert code == 1
    assert any(
        line.startswith("public.mv_ratio: last refresh failed at ") and "division by zero" in line
        for line in lines
    ), lines


def test_history_without_bookkeeping(url_text: str) -> None:
    result = CliRunner().invoke(main, ["history", "--url", url_text])
    assert result.exit_code == 0
    assert "No refreshes recorded." in result.output
