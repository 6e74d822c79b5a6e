"""The exact code autogenerate writes for every operation, with every option.

A migration file is code that users keep and re-read: the rendering of each operation is
a contract, pinned here letter for letter, and the rendered code must rebuild the same
operation when it runs.
"""

from __future__ import annotations

from typing import Any

import pytest
from alembic.autogenerate.api import AutogenContext
from alembic.autogenerate.render import render_op_text
from alembic.migration import MigrationContext

from sqlalchemy_matview.alembic.ops import (
    CreateMaterializedViewOp,
    CreatePlainViewOp,
    DisableChangeTrackingOp,
    DropMaterializedViewOp,
    DropPlainViewOp,
    EnableChangeTrackingOp,
    InstallChangeTrackingOp,
    RefreshMaterializedViewOp,
    ReplaceMaterializedViewOp,
    SetMaterializedViewCommentOp,
    UninstallChangeTrackingOp,
)
from sqlalchemy_matview.alembic.render import IMPORT

OPS_BY_DIRECTIVE: dict[str, type] = {
    "create_materialized_view": CreateMaterializedViewOp,
    "drop_materialized_view": DropMaterializedViewOp,
    "replace_materialized_view": ReplaceMaterializedViewOp,
    "refresh_materialized_view": RefreshMaterializedViewOp,
    "set_materialized_view_comment": SetMaterializedViewCommentOp,
    "enable_change_tracking": EnableChangeTrackingOp,
    "disable_change_tracking": DisableChangeTrackingOp,
    "install_change_tracking": InstallChangeTrackingOp,
    "uninstall_change_tracking": UninstallChangeTrackingOp,
    "create_plain_view": CreatePlainViewOp,
    "drop_plain_view": DropPlainViewOp,
}


def render(op: object) -> tuple[str, set[str]]:
    migration_context = MigrationContext.configure(dialect_name="postgresql")
    context = AutogenContext(migration_context, opts={"alembic_module_prefix": "op."})
    return render_op_text(context, op), context.imports


class _Rebuild:
    """Stands in for ``op`` while rendered code runs: each directive builds its operation."""

    def __init__(self) -> None:
        self.built: list[Any] = []

    def __getattr__(self, directive: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> None:
            self.built.append(OPS_BY_DIRECTIVE[directive](*args, **kwargs))

        return call


CASES = [
    pytest.param(
        CreateMaterializedViewOp(
            "mv_daily",
            "SELECT day, count(*) AS n\nFROM events GROUP BY day",
            schema="rep",
            with_data=False,
            comment="per day",
            columns=["day", "n"],
            indexes=["CREATE UNIQUE INDEX ix ON rep.mv_daily USING btree (day)"],
            grants=[("app_reader", "SELECT"), ("Report Reader", "SELECT", True)],
            owner="reporting",
        ),
        """\
op.create_materialized_view(
    'mv_daily',
    (
        'SELECT day, count(*) AS n\\n'
        'FROM events GROUP BY day'
    ),
    schema='rep',
    with_data=False,
    comment='per day',
    columns=['day', 'n'],
    indexes=[
        'CREATE UNIQUE INDEX ix ON rep.mv_daily USING btree (day)',
    ],
    grants=[
        ('app_reader', 'SELECT'),
        ('Report Reader', 'SELECT', True),
    ],
    owner='reporting',
)""",
        id="create-full",
    ),
    pytest.param(
        DropMaterializedViewOp(
            "mv_daily",
            schema="rep",
            if_exists=True,
            cascade=True,
            definition="SELECT 1 AS one",
            with_data=False,
            comment="c",
            columns=["one"],
            indexes=["CREATE INDEX ix ON rep.mv_daily USING btree (one)"],
            grants=[("public", "SELECT")],
            owner="o",
        ),
        """\
op.drop_materialized_view(
    'mv_daily',
    schema='rep',
    if_exists=True,
    cascade=True,
    definition='SELECT 1 AS one',
    with_data=False,
    comment='c',
    columns=['one'],
    indexes=[
        'CREATE INDEX ix ON rep.mv_daily USING btree (one)',
    ],
    grants=[('public', 'SELECT')],
    owner='o',
)""",
        id="drop-full",
    ),
    pytest.param(
        ReplaceMaterializedViewOp(
            "mv_daily",
            "SELECT 2 AS two",
            schema="rep",
            with_data=False,
            old_definition="SELECT 1 AS one",
            columns=["two"],
        ),
        """\
op.replace_materialized_view(
    'mv_daily',
    'SELECT 2 AS two',
    schema='rep',
    with_data=False,
    old_definition='SELECT 1 AS one',
    columns=['two'],
)""",
        id="replace-full",
    ),
    pytest.param(
        RefreshMaterializedViewOp("mv_daily", schema="rep", concurrently=True, with_data=False),
        "op.refresh_materialized_view("
        "'mv_daily', schema='rep', concurrently=True, with_data=False)",
        id="refresh-full",
    ),
    pytest.param(
        SetMaterializedViewCommentOp("mv_daily", "new", schema="rep", existing_comment="old"),
        "op.set_materialized_view_comment('mv_daily', 'new', schema='rep', existing_comment='old')",
        id="comment-full",
    ),
    pytest.param(
        EnableChangeTrackingOp("mv_daily", [("rep", "events"), (None, "users")], schema="rep"),
        "op.enable_change_tracking('mv_daily', [('rep', 'events'), (None, 'users')], schema='rep')",
        id="enable-tracking",
    ),
    pytest.param(
        DisableChangeTrackingOp("mv_daily", schema="rep", sources=[("rep", "events")]),
        "op.disable_change_tracking('mv_daily', schema='rep', sources=[('rep', 'events')])",
        id="disable-tracking",
    ),
    pytest.param(InstallChangeTrackingOp(), "op.install_change_tracking()", id="install-tracking"),
    pytest.param(
        InstallChangeTrackingOp(schema="mv admin"),
        "op.install_change_tracking(schema='mv admin')",
        id="install-tracking-schema",
    ),
    pytest.param(
        UninstallChangeTrackingOp(), "op.uninstall_change_tracking()", id="uninstall-tracking"
    ),
    pytest.param(
        CreatePlainViewOp(
            "v_daily",
            "SELECT * FROM rep.mv_daily",
            schema="rep",
            comment="c",
            options=["security_barrier=true"],
            grants=[("app_reader", "SELECT")],
            owner="o",
        ),
        """\
op.create_plain_view(
    'v_daily',
    'SELECT * FROM rep.mv_daily',
    schema='rep',
    comment='c',
    options=['security_barrier=true'],
    grants=[('app_reader', 'SELECT')],
    owner='o',
)""",
        id="create-plain-full",
    ),
    pytest.param(
        DropPlainViewOp(
            "v_daily",
            schema="rep",
            definition="SELECT * FROM rep.mv_daily",
            comment="c",
            options=["security_barrier=true"],
            grants=[("app_reader", "SELECT")],
            owner="o",
        ),
        """\
op.drop_plain_view(
    'v_daily',
    schema='rep',
    definition='SELECT * FROM rep.mv_daily',
    comment='c',
    options=['security_barrier=true'],
    grants=[('app_reader', 'SELECT')],
    owner='o',
)""",
        id="drop-plain-full",
    ),
    pytest.param(
        CreateMaterializedViewOp("mv", "SELECT 1"),
        "op.create_materialized_view('mv', 'SELECT 1')",
        id="create-minimal",
    ),
    pytest.param(
        DropMaterializedViewOp("mv"),
        "op.drop_materialized_view('mv')",
        id="drop-minimal",
    ),
    pytest.param(
        CreatePlainViewOp("v", "SELECT 1"),
        "op.create_plain_view('v', 'SELECT 1')",
        id="create-plain-minimal",
    ),
    pytest.param(
        DropPlainViewOp("v"),
        "op.drop_plain_view('v')",
        id="drop-plain-minimal",
    ),
]


@pytest.mark.parametrize(("op", "expected"), CASES)
def test_rendered_text(op: object, expected: str) -> None:
    text, imports = render(op)
    assert text == expected
    assert imports == {IMPORT}


@pytest.mark.parametrize(("op", "expected"), CASES)
def test_rendered_code_rebuilds_the_operation(op: object, expected: str) -> None:
    recorder = _Rebuild()
    exec(compile(expected, "<migration>", "exec"), {"op": recorder})
    [rebuilt] = recorder.built
    assert type(rebuilt) is type(op)
    assert vars(rebuilt) == vars(op)
    assert render(rebuilt)[0] == expected


def test_every_directive_is_pinned() -> None:
    pinned = {type(p.values[0]) for p in CASES}
    assert pinned == set(OPS_BY_DIRECTIVE.values())
