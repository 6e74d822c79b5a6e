"""Building :class:`MaterializedView` objects from an existing database."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from .errors import UnknownViewError

if TYPE_CHECKING:
    from .schema import MaterializedView

__all__ = ["reflect_materialized_views"]


def _plain_unique(index: Any) -> bool:
    names = index.get("column_names") or []
    return bool(
        index.get("unique")
        and names
        and all(n is not None for n in names)
        and not index.get("expressions")
        and not (index.get("dialect_options") or {}).get("postgresql_where")
    )


def reflect_view(
    cls: type[MaterializedView],
    name: str,
    metadata: sa.MetaData,
    bind: Engine | Connection,
    *,
    schema: str | None = None,
) -> MaterializedView:
    inspector = sa.inspect(bind)
    if name not in inspector.get_materialized_view_names(schema=schema):
        where = f" in schema {schema!r}" if schema else ""
        known = sorted(inspector.get_materialized_view_names(schema=schema))
        raise UnknownViewError(
            f"there is no materialized view {name!r}{where}; the materialized views there are "
            f"{known}"
        )
    columns = [
        sa.Column(c["name"], c["type"], nullable=c.get("nullable", True), comment=c.get("comment"))
        for c in inspector.get_columns(name, schema=schema)
    ]
    indexes = inspector.get_indexes(name, schema=schema)
    unique = sorted(
        (i for i in indexes if _plain_unique(i)),
        key=lambda i: (len(i["column_names"]), i["name"] or ""),
    )
    unique_key = [str(n) for n in unique[0]["column_names"]] if unique else None
    definition = inspector.get_view_definition(name, schema=schema)
    comment = inspector.get_table_comment(name, schema=schema).get("text")
    view = cls(
        name,
        metadata,
        definition.strip().rstrip(";"),
        schema=schema,
        columns=columns,
        unique_key=unique_key,
        managed=False,
        comment=comment,
    )
    # The reflected indexes replace the deterministic unique_key one: the database's names
    # are the truth, and only plain-column indexes can be expressed as Index objects here.
    for index in list(view.table.indexes):
        view.table.indexes.discard(index)
    for reflected in indexes:
        names = [n for n in reflected.get("column_names") or [] if n is not None]
        if not names or len(names) != len(reflected["column_names"]):
            continue
        predicate = (reflected.get("dialect_options") or {}).get("postgresql_where")
        kwargs: dict[str, Any] = {"unique": bool(reflected.get("unique"))}
        if predicate is not None:
            kwargs["postgresql_where"] = sa.text(str(predicate))
        sa.Index(str(reflected["name"]), *(view.table.c[n] for n in names), **kwargs)
    populated = bind_scalar(
        bind,
        sa.text(
            "SELECT ispopulated FROM pg_catalog.pg_matviews "
            "WHERE matviewname = :name AND schemaname = COALESCE(:schema, current_schema())"
        ),
        {"name": name, "schema": schema},
    )
    view.with_data = bool(populated)
    return view


def bind_scalar(bind: Engine | Connection, statement: Any, params: dict[str, Any]) -> Any:
    """Run a one-value query on an ``Engine`` (own connection) or a ``Connection``."""
    if isinstance(bind, Engine):
        with bind.connect() as conn:
            return conn.execute(statement, params).scalar()
    return bind.execute(statement, params).scalar()


def reflect_materialized_views(
    bind: Engine | Connection, metadata: sa.MetaData, *, schema: str | None = None
) -> list[MaterializedView]:
    """Every materialized view in ``schema`` (default: the search path's first), reflected
    as ``managed=False`` views on ``metadata``; views already declared there are returned
    as declared.

    >>> views = reflect_materialized_views(engine, metadata)  # doctest: +SKIP
    """
    from .schema import MaterializedView, materialized_views

    declared = {(v.schema, v.name): v for v in materialized_views(metadata)}
    names = sa.inspect(bind).get_materialized_view_names(schema=schema)
    result = []
    for name in names:
        existing = declared.get((schema if schema is not None else metadata.schema, name))
        result.append(existing or MaterializedView.reflect(name, metadata, bind, schema=schema))
    return result
