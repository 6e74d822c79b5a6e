"""Indexes of views as PostgreSQL prints them: read, compared and rebuilt exactly.

An index is compared by its *shape*: ``pg_get_indexdef`` without the index's and the view's
names (``UNIQUE USING btree (spent DESC) INCLUDE (n) WITH (fillfactor='70') WHERE (n > 0)``).
A declared index is turned into the same text by creating it, inside the comparison's
rolled-back savepoint, on an empty temporary table with the view's columns
(:mod:`.normalise`); so ordering, ``NULLS FIRST/LAST``, operator classes, collations, the
access method, ``INCLUDE``, storage parameters, the predicate and expressions are all
compared as the server understands them, without hand-written normalisation.

An index the database has is also split into its parts (:class:`.ReflectedIndex`), so that
the operation re-creating it (the downgrade of a drop) writes it exactly as it was.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.sql.ddl import CreateIndex
from sqlalchemy.sql.elements import ColumnClause

from .. import sqltext
from ..ddl import index_on
from ..query import _PG_DIALECT
from .records import ReflectedIndex

#: Columns of a query over ``pg_index i``, ``pg_class ic`` (the index), ``pg_class t`` (its
#: table), ``pg_namespace n`` (the table's schema) and ``pg_am am``: the statement, where its
#: key list starts (1-based), the statement pretty-printed, and each key column's name as is
#: and quoted (``NULL`` for an expression). ``pg_get_indexdef`` always names the table with
#: its schema, ``pg_temp`` for the session's temporary schema.
INDEX_COLUMNS = """
       i.indisunique AS "unique", am.amname AS method,
       pg_catalog.pg_get_indexdef(i.indexrelid) AS definition,
       pg_catalog.pg_get_indexdef(i.indexrelid, 0, true) AS statement,
       length('CREATE ' || CASE WHEN i.indisunique THEN 'UNIQUE ' ELSE '' END || 'INDEX '
              || pg_catalog.quote_ident(ic.relname) || ' ON '
              || CASE WHEN t.relnamespace = pg_catalog.pg_my_temp_schema() THEN 'pg_temp'
                      ELSE pg_catalog.quote_ident(n.nspname) END
              || '.' || pg_catalog.quote_ident(t.relname)
              || ' USING ' || pg_catalog.quote_ident(am.amname) || ' ') + 1 AS list_at,
       pg_catalog.pg_get_expr(i.indpred, i.indrelid) AS "where",
       ARRAY(SELECT a.attname::text
               FROM generate_series(1, i.indnkeyatts) AS k
               LEFT JOIN pg_catalog.pg_attribute a
                 ON a.attrelid = i.indrelid AND a.attnum = i.indkey[k - 1]
                AND i.indkey[k - 1] <> 0
              ORDER BY k) AS columns,
       ARRAY(SELECT pg_catalog.quote_ident(a.attname)
               FROM generate_series(1, i.indnkeyatts) AS k
               LEFT JOIN pg_catalog.pg_attribute a
                 ON a.attrelid = i.indrelid AND a.attnum = i.indkey[k - 1]
                AND i.indkey[k - 1] <> 0
              ORDER BY k) AS quoted
"""


def _unquote(identifier: str) -> str:
    if identifier.startswith('"') and identifier.endswith('"'):
        return identifier[1:-1].replace('""', '"')
    return identifier


def _option(item: str) -> tuple[str, str]:
    key, _, value = item.partition("=")
    if value.startswith("'") and value.endswith("'"):
        value = value[1:-1].replace("''", "'")
    return key.strip(), value


def _key_list_at(definition: str, method: str, list_at: int) -> int:
    """Where the key list of ``definition`` opens (0-based)."""
    if definition[list_at - 1 : list_at] == "(":
        return list_at - 1
    # Not where the catalog's names say (a server printing names otherwise): look for it.
    return definition.index(f" USING {method} (") + len(f" USING {method} ")


def shape_of(unique: bool, method: str, definition: str, list_at: int) -> str:
    """``definition`` without the names in front of its key list, uniqueness kept."""
    start = _key_list_at(definition, method, list_at)
    return ("UNIQUE " if unique else "") + f"USING {method} " + definition[start:]


def declared_shape(index: sa.Index) -> str | None:
    """The shape of ``index`` as SQLAlchemy writes its ``CREATE INDEX``.

    Where it equals the shape PostgreSQL prints for an index of the same name, the two are
    the same index (PostgreSQL's text recreates exactly the index it describes), so that
    index needs no probe; anything PostgreSQL writes differently (a cast, a storage
    parameter's quotes) is left to the probe. ``None`` when it cannot be compiled.
    """
    try:
        sql = str(CreateIndex(index).compile(dialect=_PG_DIALECT))
    except (sa.exc.CompileError, sa.exc.ArgumentError):
        return None
    start = next(
        (t.start for t in sqltext.tokens(sql) if t.kind == "punct" and t.text == "("), None
    )
    if start is None:
        return None
    method = str(index.dialect_options["postgresql"]["using"] or "btree").lower()
    return ("UNIQUE " if index.unique else "") + f"USING {method} " + sql[start:]


def reflected_index(
    row: Mapping[Any, Any], schema: str | None, view_name: str, name: str
) -> ReflectedIndex:
    """An index read with :data:`INDEX_COLUMNS`, split into its parts."""
    definition: str = row["definition"]
    list_at: int = row["list_at"]
    items, end = sqltext.top_level_items(
        definition, _key_list_at(definition, row["method"], list_at)
    )
    elements: list[str] = []
    is_column: list[bool] = []
    # A key column printed as its quoted name alone has no COLLATE, operator class or order.
    for item, column, quoted in zip(items, row["columns"], row["quoted"], strict=True):
        plain = column is not None and item == quoted
        elements.append(column if plain else item)
        is_column.append(plain)
    rest = definition[end:]
    include: list[str] = []
    options: list[tuple[str, str]] = []
    nulls_not_distinct = False
    if rest.startswith(" INCLUDE ("):
        names, stop = sqltext.top_level_items(rest, len(" INCLUDE "))
        include = [_unquote(n) for n in names]
        rest = rest[stop:]
    if rest.startswith(" NULLS NOT DISTINCT"):
        nulls_not_distinct = True
        rest = rest[len(" NULLS NOT DISTINCT") :]
    if rest.startswith(" WITH ("):
        items, stop = sqltext.top_level_items(rest, len(" WITH "))
        options = [_option(i) for i in items]
    return ReflectedIndex(
        name=name,
        schema=schema,
        view_name=view_name,
        unique=bool(row["unique"]),
        elements=tuple(elements),
        is_column=tuple(is_column),
        definition=definition,
        method=row["method"],
        where=row["where"],
        include=tuple(include),
        options=tuple(options),
        nulls_not_distinct=nulls_not_distinct,
        shape=shape_of(bool(row["unique"]), row["method"], definition, list_at),
        statement=row["statement"],
    )


def probe_index(index: sa.Index, name: str, table_name: str) -> sa.Index:
    """A copy of the declared ``index`` named ``name`` on ``pg_temp.<table_name>``.

    The temporary table has the view's columns; ``CONCURRENTLY`` (not allowed in a
    transaction) and the tablespace (not part of the printed definition) are left out.
    """
    probe = index_on(index, name, table_name, "pg_temp")
    probe.dialect_options["postgresql"]["concurrently"] = False
    probe.dialect_options["postgresql"]["tablespace"] = None
    return probe


def renderable_index(index: sa.Index) -> sa.Index:
    """``index`` as a migration should write it.

    Columns stay columns (written by name); every other key element becomes the SQL that
    ``CREATE INDEX`` gives it -- parenthesised where needed, with its ordering and operator
    class -- so that every Alembic version writes a valid ``op.create_index`` (some write an
    expression without the parentheses PostgreSQL requires). ``INCLUDE`` columns are named.
    """
    source = index.table
    assert source is not None
    bare = sa.Table(
        source.name,
        sa.MetaData(),
        *(sa.Column(c.name, c.type, key=c.key) for c in source.c),
        schema=source.schema,
    )
    compiler = _PG_DIALECT.statement_compiler(_PG_DIALECT, None)
    kwargs = dict(index.kwargs)
    ops = dict(kwargs.pop("postgresql_ops", None) or {})
    elements: list[Any] = []
    for expression in index.expressions:
        expression = cast(Any, expression)
        if isinstance(expression, sa.Column) and expression.table is source:
            elements.append(bare.c[expression.key])
            continue
        grouped = expression if isinstance(expression, ColumnClause) else expression.self_group()
        sql = compiler.process(grouped, include_table=False, literal_binds=True)
        key = getattr(expression, "key", None)
        if key in ops:
            sql += " " + ops.pop(key)
        elements.append(sa.literal_column(sql))
    if ops:
        kwargs["postgresql_ops"] = ops
    include = kwargs.get("postgresql_include")
    if include:
        kwargs["postgresql_include"] = [c.key if isinstance(c, sa.Column) else c for c in include]
    return sa.Index(index.name, *elements, unique=bool(index.unique), _table=bare, **kwargs)
