"""How autogenerate writes the materialized-view operations into a migration script.

Arguments are written with ``repr()``, so any value round-trips. SQL is written as adjacent
string literals, one per line of the query (long lines are cut at spaces), which Python joins
back into exactly the original text: the migration reads like SQL and stays byte-for-byte
faithful, quotes and backslashes included.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from alembic.autogenerate import renderers
from sqlalchemy.sql.elements import ClauseElement

from ..compare import Grant, definition_sql
from ..swap import DEFAULT_SWAP_LOCK_TIMEOUT, DEFAULT_SWAP_RETRIES
from .ops import (
    CreateIncrementalViewOp,
    CreateMaterializedViewOp,
    CreatePlainViewOp,
    DependentView,
    DisableChangeTrackingOp,
    DropIncrementalViewOp,
    DropMaterializedViewOp,
    DropPlainViewOp,
    EnableChangeTrackingOp,
    InstallChangeTrackingOp,
    RefreshMaterializedViewOp,
    ReplaceMaterializedViewOp,
    SetMaterializedViewCommentOp,
    UninstallChangeTrackingOp,
)

if TYPE_CHECKING:
    from alembic.autogenerate.api import AutogenContext

__all__ = ["render_sql"]

#: The line generated migrations need so that ``op.*_materialized_view`` exists.
IMPORT = "import sqlalchemy_matview.alembic.ops  # noqa: F401"
#: The line a migration needs when it names :class:`~.ops.DependentView` records.
DEPENDENT_VIEW_IMPORT = "from sqlalchemy_matview.alembic.ops import DependentView"

_WIDTH = 72
_MISSING = object()


def _chunks(sql: str) -> list[str]:
    pieces: list[str] = []
    for line in sql.splitlines(keepends=True):
        while len(line) > _WIDTH:
            cut = line.rfind(" ", 0, _WIDTH)
            if cut <= 0:
                cut = line.find(" ", _WIDTH)
            if cut <= 0:
                break
            pieces.append(line[: cut + 1])
            line = line[cut + 1 :]
        if line:
            pieces.append(line)
    return pieces or [""]


def render_sql(sql: str, indent: str = "    ") -> str:
    """SQL as Python source: one literal, or adjacent literals in parentheses.

    >>> print(render_sql("SELECT 1"))
    'SELECT 1'
    >>> print(render_sql("SELECT a\\nFROM t"))
    (
        'SELECT a\\n'
        'FROM t'
    )
    """
    pieces = _chunks(sql)
    if len(pieces) == 1:
        return repr(pieces[0])
    body = "\n".join(f"{indent}{piece!r}" for piece in pieces)
    return f"(\n{body}\n)"


def _definition(value: Any) -> str:
    return definition_sql(value) if isinstance(value, ClauseElement) else str(value)


def _arguments(positional: Sequence[str], keywords: Sequence[tuple[str, Any, Any]]) -> list[str]:
    """Arguments as source: keywords whose value equals their default are left out; a name
    starting with ``*`` takes a value that is source already."""
    args = list(positional)
    for key, value, default in keywords:
        if default is _MISSING or value != default:
            args.append(f"{key}={value!r}" if not key.startswith("*") else f"{key[1:]}={value}")
    return args


def _layout(callee: str, args: Sequence[str]) -> str:
    """``callee(...)`` on one line when short, else one argument per line."""
    if sum(len(a) for a in args) < 60 and not any("\n" in a for a in args):
        return f"{callee}({', '.join(args)})"
    body = "".join(f"    {_indent_tail(a)},\n" for a in args)
    return f"{callee}(\n{body})"


def _call(
    autogen_context: AutogenContext,
    name: str,
    positional: Sequence[str],
    keywords: Sequence[tuple[str, Any, Any]],
) -> str:
    """``op.<name>(...)``."""
    autogen_context.imports.add(IMPORT)
    prefix = autogen_context.opts.get("alembic_module_prefix", "op.")
    return _layout(f"{prefix}{name}", _arguments(positional, keywords))


def _indent_tail(text: str) -> str:
    return text.replace("\n", "\n    ")


def _statements(statements: Sequence[str] | None) -> str | None:
    """A list of SQL statements, one item per line."""
    if statements is None:
        return None
    items = "".join(f"    {_indent_tail(render_sql(sql))},\n" for sql in statements)
    return f"[\n{items}]" if items else "[]"


def _grants(grants: Sequence[Grant | tuple[Any, ...]] | None) -> str | None:
    """``[('role', 'SELECT'), ('role', 'SELECT', True)]``: the grant option only when given."""
    if grants is None:
        return None
    items = [
        repr((g.grantee, g.privilege, True) if g.grantable else (g.grantee, g.privilege))
        for g in (Grant(*grant) for grant in grants)
    ]
    inline = "[" + ", ".join(items) + "]"
    if len(inline) <= 60:
        return inline
    return "[\n" + "".join(f"    {item},\n" for item in items) + "]"


def _sources(
    sources: Sequence[tuple[str | None, str]] | None,
) -> list[tuple[str | None, str]] | None:
    return None if sources is None else [(s, t) for s, t in sources]


@renderers.dispatch_for(CreateMaterializedViewOp)
def _render_create(autogen_context: AutogenContext, op: CreateMaterializedViewOp) -> str:
    return _call(
        autogen_context,
        "create_materialized_view",
        [repr(op.name), render_sql(_definition(op.definition))],
        [
            ("schema", op.schema, None),
            ("with_data", op.with_data, True),
            ("comment", op.comment, None),
            ("columns", list(op.columns) if op.columns is not None else None, None),
            ("*indexes", _statements(op.indexes), None),
            ("*grants", _grants(op.grants), None),
            ("owner", op.owner, None),
        ],
    )


@renderers.dispatch_for(DropMaterializedViewOp)
def _render_drop(autogen_context: AutogenContext, op: DropMaterializedViewOp) -> str:
    definition = None if op.definition is None else render_sql(_definition(op.definition))
    return _call(
        autogen_context,
        "drop_materialized_view",
        [repr(op.name)],
        [
            ("schema", op.schema, None),
            ("if_exists", op.if_exists, False),
            ("cascade", op.cascade, False),
            ("*definition", definition, None),
            ("with_data", op.with_data, True),
            ("comment", op.comment, None),
            ("columns", list(op.columns) if op.columns is not None else None, None),
            ("*indexes", _statements(op.indexes), None),
            ("*grants", _grants(op.grants), None),
            ("owner", op.owner, None),
        ],
    )


@renderers.dispatch_for(CreatePlainViewOp)
def _render_create_plain(autogen_context: AutogenContext, op: CreatePlainViewOp) -> str:
    return _call(
        autogen_context,
        "create_plain_view",
        [repr(op.name), render_sql(_definition(op.definition))],
        [
            ("schema", op.schema, None),
            ("comment", op.comment, None),
            ("options", list(op.options) if op.options else None, None),
            ("*grants", _grants(op.grants), None),
            ("owner", op.owner, None),
        ],
    )


@renderers.dispatch_for(DropPlainViewOp)
def _render_drop_plain(autogen_context: AutogenContext, op: DropPlainViewOp) -> str:
    definition = None if op.definition is None else render_sql(_definition(op.definition))
    return _call(
        autogen_context,
        "drop_plain_view",
        [repr(op.name)],
        [
            ("schema", op.schema, None),
            ("*definition", definition, None),
            ("comment", op.comment, None),
            ("options", list(op.options) if op.options else None, None),
            ("*grants", _grants(op.grants), None),
            ("owner", op.owner, None),
        ],
    )


def _dependents(
    autogen_context: AutogenContext, views: Sequence[DependentView] | None
) -> str | None:
    """``[DependentView(...), ...]``, one record per line."""
    if views is None:
        return None
    if not views:
        return "[]"
    autogen_context.imports.add(DEPENDENT_VIEW_IMPORT)
    items = []
    for view in views:
        args = _arguments(
            [repr(view.name), render_sql(view.definition)],
            [
                ("schema", view.schema, None),
                ("materialized", view.materialized, False),
                ("with_data", view.with_data, True),
                ("comment", view.comment, None),
                ("options", list(view.options), []),
                ("*indexes", _statements(view.indexes), "[]"),
                ("*grants", _grants(view.grants), "[]"),
                ("owner", view.owner, None),
            ],
        )
        items.append(_layout("DependentView", args))
    return "[\n" + "".join(f"    {_indent_tail(item)},\n" for item in items) + "]"


@renderers.dispatch_for(ReplaceMaterializedViewOp)
def _render_replace(autogen_context: AutogenContext, op: ReplaceMaterializedViewOp) -> str:
    old = None if op.old_definition is None else render_sql(_definition(op.old_definition))
    return _call(
        autogen_context,
        "replace_materialized_view",
        [repr(op.name), render_sql(_definition(op.definition))],
        [
            ("schema", op.schema, None),
            ("strategy", op.strategy, "drop_create"),
            ("swap_lock_timeout", op.swap_lock_timeout, DEFAULT_SWAP_LOCK_TIMEOUT),
            ("swap_retries", op.swap_retries, DEFAULT_SWAP_RETRIES),
            ("tracking_schema", op.tracking_schema, None),
            ("with_data", op.with_data, True),
            ("*old_definition", old, None),
            ("columns", list(op.columns) if op.columns is not None else None, None),
            ("*indexes", _statements(op.indexes), None),
            ("comment", op.comment, None),
            ("*grants", _grants(op.grants), None),
            ("owner", op.owner, None),
            ("*dependents", _dependents(autogen_context, op.dependents), None),
        ],
    )


@renderers.dispatch_for(RefreshMaterializedViewOp)
def _render_refresh(autogen_context: AutogenContext, op: RefreshMaterializedViewOp) -> str:
    return _call(
        autogen_context,
        "refresh_materialized_view",
        [repr(op.name)],
        [
            ("schema", op.schema, None),
            ("concurrently", op.concurrently, False),
            ("with_data", op.with_data, True),
        ],
    )


@renderers.dispatch_for(SetMaterializedViewCommentOp)
def _render_comment(autogen_context: AutogenContext, op: SetMaterializedViewCommentOp) -> str:
    return _call(
        autogen_context,
        "set_materialized_view_comment",
        [repr(op.name), repr(op.comment)],
        [("schema", op.schema, None), ("existing_comment", op.existing_comment, None)],
    )


@renderers.dispatch_for(EnableChangeTrackingOp)
def _render_enable(autogen_context: AutogenContext, op: EnableChangeTrackingOp) -> str:
    return _call(
        autogen_context,
        "enable_change_tracking",
        [repr(op.name), repr(_sources(op.sources))],
        [("schema", op.schema, None), ("tracking_schema", op.tracking_schema, None)],
    )


@renderers.dispatch_for(DisableChangeTrackingOp)
def _render_disable(autogen_context: AutogenContext, op: DisableChangeTrackingOp) -> str:
    return _call(
        autogen_context,
        "disable_change_tracking",
        [repr(op.name)],
        [
            ("schema", op.schema, None),
            ("sources", _sources(op.sources), None),
            ("tracking_schema", op.tracking_schema, None),
        ],
    )


@renderers.dispatch_for(InstallChangeTrackingOp)
def _render_install(autogen_context: AutogenContext, op: InstallChangeTrackingOp) -> str:
    return _call(autogen_context, "install_change_tracking", [], [("schema", op.schema, None)])


@renderers.dispatch_for(UninstallChangeTrackingOp)
def _render_uninstall(autogen_context: AutogenContext, op: UninstallChangeTrackingOp) -> str:
    return _call(autogen_context, "uninstall_change_tracking", [], [("schema", op.schema, None)])


@renderers.dispatch_for(CreateIncrementalViewOp)
def _render_create_incremental(autogen_context: AutogenContext, op: CreateIncrementalViewOp) -> str:
    return _call(
        autogen_context,
        "create_incremental_view",
        [repr(op.name), _statements(op.statements) or "[]"],
        [("schema", op.schema, None), ("*drop_statements", _statements(op.drop_statements), None)],
    )


@renderers.dispatch_for(DropIncrementalViewOp)
def _render_drop_incremental(autogen_context: AutogenContext, op: DropIncrementalViewOp) -> str:
    return _call(
        autogen_context,
        "drop_incremental_view",
        [repr(op.name), _statements(op.statements) or "[]"],
        [
            ("schema", op.schema, None),
            ("*create_statements", _statements(op.create_statements), None),
        ],
    )
