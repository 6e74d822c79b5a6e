"""Autogenerate writes the replace strategy: per view, for every view, or per configuration."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest
import sqlalchemy as sa
from alembic.autogenerate.api import AutogenContext
from alembic.autogenerate.render import render_op_text
from alembic.migration import MigrationContext
from matview_alembic_helpers import autogenerate, run_code
from matview_swap_helpers import swap_leftovers

import sqlalchemy_matview.alembic
from sqlalchemy_matview import MaterializedView
from sqlalchemy_matview.alembic.comparator import REPLACE_STRATEGY_OPTION
from sqlalchemy_matview.alembic.ops import InvalidReplaceStrategyError, ReplaceMaterializedViewOp
from sqlalchemy_matview.errors import DefinitionError
from sqlalchemy_matview.swap import SwapOptionError


def models(version: int, **strategies: str | None) -> sa.MetaData:
    md = sa.MetaData()
    events = sa.Table(
        "events",
        md,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("kind", sa.Text, nullable=False),
    )
    where = events.c.id > 0 if version == 2 else sa.true()
    for name in ("mv_a", "mv_b"):
        MaterializedView(
            name,
            md,
            sa.select(events.c.kind, sa.func.count().label("n"))
            .where(where)
            .group_by(events.c.kind),
            unique_key="kind",
            replace_strategy=strategies.get(name),
        )
    return md


@pytest.fixture
def default_strategy() -> Iterator[None]:
    yield
    sqlalchemy_matview.alembic.register(replace_strategy="drop_create")


def _strategies(code: str) -> dict[str, str]:
    """The strategy each replace in ``code`` is written with."""
    found = {}
    for call in code.split("op.replace_materialized_view(")[1:]:
        name = call.split("'")[1]
        found[name] = "side_by_side" if "strategy='side_by_side'" in call else "drop_create"
    return found


def test_the_view_chooses_and_the_migration_is_reversible(conn: sa.Connection) -> None:
    models(1).create_all(conn)
    generated = autogenerate(conn, models(2, mv_a="side_by_side"))
    assert _strategies(generated.upgrade) == {"mv_a": "side_by_side", "mv_b": "drop_create"}
    assert _strategies(generated.downgrade) == {"mv_a": "side_by_side", "mv_b": "drop_create"}
    # The option is written right after the name and the definition, where it is read.
    call = generated.upgrade.split("op.replace_materialized_view(")[1]
    assert call.index("strategy='side_by_side'") < call.index("old_definition=")

    run_code(conn, generated.upgrade)
    assert autogenerate(conn, models(2)).empty
    run_code(conn, generated.downgrade)
    assert autogenerate(conn, models(1)).empty
    assert swap_leftovers(conn) == []


def test_register_chooses_for_views_that_do_not(
    conn: sa.Connection, default_strategy: None
) -> None:
    models(1).create_all(conn)
    sqlalchemy_matview.alembic.register(replace_strategy="side_by_side")
    sqlalchemy_matview.alembic.register()  # again, without it: the choice stays
    generated = autogenerate(conn, models(2, mv_b="drop_create"))
    assert _strategies(generated.upgrade) == {"mv_a": "side_by_side", "mv_b": "drop_create"}


def test_the_configuration_chooses_for_plugin_users(
    conn: sa.Connection, default_strategy: None
) -> None:
    models(1).create_all(conn)
    sqlalchemy_matview.alembic.register(replace_strategy="drop_create")
    generated = autogenerate(conn, models(2), **{REPLACE_STRATEGY_OPTION: "side_by_side"})
    assert _strategies(generated.upgrade) == {"mv_a": "side_by_side", "mv_b": "side_by_side"}
    with pytest.raises(DefinitionError, match=rf"{REPLACE_STRATEGY_OPTION}=.*'sideways'"):
        autogenerate(conn, models(2), **{REPLACE_STRATEGY_OPTION: "sideways"})


def test_misuse_is_refused_before_any_sql() -> None:
    with pytest.raises(DefinitionError, match=r"'mv'.*replace_strategy='fast'"):
        MaterializedView(
            "mv",
            sa.MetaData(),
            "SELECT 1",
            columns=[sa.Column("x", sa.Integer)],
            replace_strategy="fast",
        )
    with pytest.raises(DefinitionError, match="register"):
        sqlalchemy_matview.alembic.register(replace_strategy="fast")
    with pytest.raises(InvalidReplaceStrategyError, match=r"'mv'.*strategy='fast'"):
        ReplaceMaterializedViewOp("mv", "SELECT 1", strategy="fast")
    for bad in (0, -1, float("nan"), True, "1s"):
        with pytest.raises(SwapOptionError, match="swap_lock_timeout"):
            ReplaceMaterializedViewOp("mv", "SELECT 1", swap_lock_timeout=bad)  # type: ignore[arg-type]
    for bad_retries in (-1, 1.5, True):
        with pytest.raises(SwapOptionError, match="swap_retries"):
            ReplaceMaterializedViewOp("mv", "SELECT 1", swap_retries=bad_retries)  # type: ignore[arg-type]


def test_swap_options_are_written_when_not_the_defaults() -> None:
    op = ReplaceMaterializedViewOp(
        "mv",
        "SELECT 1 AS one",
        strategy="side_by_side",
        swap_lock_timeout=timedelta(milliseconds=200),
        swap_retries=3,
        old_definition="SELECT 2 AS one",
    )
    context = AutogenContext(
        MigrationContext.configure(dialect_name="postgresql"),
        opts={"alembic_module_prefix": "op."},
    )
    assert render_op_text(context, op) == (
        "op.replace_materialized_view(\n"
        "    'mv',\n"
        "    'SELECT 1 AS one',\n"
        "    strategy='side_by_side',\n"
        "    swap_lock_timeout=0.2,\n"
        "    swap_retries=3,\n"
        "    old_definition='SELECT 2 AS one',\n"
        ")"
    )
    back = op.reverse()
    assert (back.strategy, back.swap_lock_timeout, back.swap_retries) == ("side_by_side", 0.2, 3)
    plain = ReplaceMaterializedViewOp("mv", "SELECT 1 AS one", old_definition="SELECT 2 AS one")
    assert "strategy" not in render_op_text(context, plain)
