"""A view's query: the forms it may take, the checks made when it is declared, and its SQL.

A definition is a ``select()`` or any other statement SQLAlchemy builds that returns rows
(``union()``, ``union_all()``, ``intersect()``, ``except_()``, ``text().columns()``...), a
``text()``, or a ``str`` of SQL. A ``str`` is used exactly as written: it has no bind
parameters, so its colons (``::`` casts, ``'a:b'`` literals, ``arr[1:2]`` slices) are SQL's.

The SQL sent to PostgreSQL and written into migrations is compiled with every parameter
rendered as a literal. Literals whose SQL form has no type of its own (dates, times, UUIDs,
native enums, arrays) are cast to their SQLAlchemy type, so that a literal in the select list
gets the column type the ``Table`` declares; JSON and ``bytea`` values, which SQLAlchemy
cannot render, are written as cast strings. Whatever may follow the query -- a ``;``, blanks,
comments -- is cut off, so that ``WITH [NO] DATA`` always lands after it.

>>> import sqlalchemy as sa
>>> from sqlalchemy.dialects import postgresql as pg
>>> events = sa.table("events", sa.column("payload", pg.JSONB))
>>> sql = definition_sql(sa.select(events).where(events.c.payload.contains({"a": 1})))
>>> print(sql)  # doctest: +NORMALIZE_WHITESPACE
SELECT events.payload
FROM events
WHERE events.payload @> CAST('{"a": 1}' AS JSONB)
>>> print(definition_sql("SELECT '{\\"a\\":1}'::jsonb AS j;  -- from psql"))
SELECT '{"a":1}'::jsonb AS j
"""

from __future__ import annotations

import json
from typing import Any, Union

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql.base import PGDialect
from sqlalchemy.exc import CompileError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql import visitors
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import BindParameter, ClauseElement, TextClause
from sqlalchemy.sql.selectable import SelectBase

from . import sqltext
from .errors import DefinitionError

__all__ = [
    "Definition",
    "Query",
    "SQLText",
    "as_query",
    "check_query",
    "definition_sql",
    "query_sql",
]

#: What a view can be defined by: a ``select()`` (or ``union()``...), a ``text()``, or SQL.
Definition = Union[SelectBase, TextClause, str]  # noqa: UP007 (a runtime alias on 3.10)
#: A definition as a declared view holds it (a ``str`` becomes :class:`SQLText`).
Query = Union[SelectBase, TextClause]  # noqa: UP007

# Definitions are rendered without a driver: "%" must stay "%", as a user would write it.
_PG_DIALECT = PGDialect(paramstyle="named")  # type: ignore[no-untyped-call]
# With standard_conforming_strings on (PostgreSQL's default since 9.1) a backslash in a
# literal is an ordinary character; SQLAlchemy 2.0 doubles it until it has connected.
_PG_DIALECT._backslash_escapes = False


class SQLText(TextClause):
    """SQL used exactly as written: a ``text()`` without bind parameters.

    ``sa.text()`` reads ``:name`` as a bind parameter; a view defined by a ``str`` has none,
    so every colon in it is left alone, wherever it stands.

    >>> from sqlalchemy.dialects import postgresql
    >>> print(SQLText("SELECT 'x :y' AS s").compile(dialect=postgresql.dialect()))
    SELECT 'x :y' AS s
    """

    __visit_name__ = "sqlalchemy_matview_sql_text"
    inherit_cache = True

    def __init__(self, text: str) -> None:
        self._bindparams = {}
        self.text = text


@compiles(SQLText)
def _visit_sql_text(element: SQLText, compiler: SQLCompiler, **kw: Any) -> str:
    # Only what every text() gets: "%" doubled for drivers that use "%" for parameters.
    text: str = compiler.post_process_text(element.text)  # type: ignore[no-untyped-call]
    return text


def as_query(definition: Definition) -> Query:
    """``definition`` as a clause: statements and ``text()`` as given, a ``str`` as SQLText."""
    if isinstance(definition, (SelectBase, TextClause)):
        return definition
    if isinstance(definition, str):
        return SQLText(definition)
    hint = ""
    if isinstance(definition, sa.Subquery):
        hint = "; pass the select itself, not its .subquery()"
    raise TypeError(
        "a materialized view's definition must be a select() (or union(), union_all(), "
        f"intersect(), except_()...), a text() or a str of SQL, not {type(definition).__name__}"
        + hint
    )


# -- literals --------------------------------------------------------------------------------

#: Types whose literal SQLAlchemy writes as an untyped string: cast to keep the type.
_CAST_TYPES: tuple[type[Any], ...] = (sa.Date, sa.DateTime, sa.Time, sa.Uuid, sa.ARRAY)


def _typed_literal(bind: BindParameter[Any]) -> ClauseElement | None:
    """A replacement for ``bind`` that renders as a typed literal, or ``None`` to keep it."""
    if bind.expanding or bind.callable is not None:
        return None
    value = bind.value
    type_ = bind.type
    if value is None or isinstance(type_, sa.TypeDecorator):
        return None
    if isinstance(type_, sa.JSON):
        if value is sa.JSON.NULL:
            return None
        return sa.cast(sa.literal(json.dumps(value), sa.Text()), type_)
    if isinstance(type_, sa.LargeBinary):
        return sa.cast(sa.literal("\\x" + bytes(value).hex(), sa.Text()), type_)
    if isinstance(type_, _CAST_TYPES) or (
        isinstance(type_, sa.Enum) and type_.native_enum and type_.name
    ):
        return sa.cast(bind, type_)
    return None


def _with_typed_literals(query: ClauseElement) -> ClauseElement:
    if not any(
        isinstance(e, BindParameter) and _typed_literal(e) is not None
        for e in visitors.iterate(query)
    ):
        return query

    def replace(element: Any) -> Any:
        return _typed_literal(element) if isinstance(element, BindParameter) else None

    replaced: ClauseElement = visitors.replacement_traverse(query, {}, replace)  # type: ignore[call-overload]
    return replaced


def query_sql(dialect: sa.Dialect, query: ClauseElement, schema_translate_map: Any = None) -> str:
    """The SQL of ``query`` for ``dialect``, with literal values.

    What may follow the query in SQL text (``;``, blanks, comments) is cut off. Raises
    :class:`~sqlalchemy_matview.errors.DefinitionError` when a ``;`` separates two
    statements.
    """
    # A fresh compiler for each query: a compiler keeps state (CTEs seen) between statements.
    compiler = dialect.statement_compiler(dialect, None, schema_translate_map=schema_translate_map)
    sql = compiler.process(_with_typed_literals(query), literal_binds=True)
    try:
        return sqltext.statement_body(sql)
    except sqltext.MultipleStatementsError as exc:
        raise DefinitionError(f"a materialized view's query must be one statement: {exc}") from exc


def definition_sql(definition: ClauseElement | str) -> str:
    """The SQL text of a view definition, compiled for PostgreSQL with literal values.

    This is the text that migrations carry and execute::

        >>> import sqlalchemy as sa
        >>> t = sa.table("events", sa.column("kind"))
        >>> definition_sql(sa.select(t.c.kind).where(t.c.kind == "it's"))
        "SELECT events.kind \\nFROM events \\nWHERE events.kind = 'it''s'"
    """
    clause = as_query(definition) if isinstance(definition, str) else definition
    return query_sql(_PG_DIALECT, clause).strip()


# -- checks at declaration -------------------------------------------------------------------


def _unbound_parameters(query: ClauseElement) -> list[BindParameter[Any]]:
    found: dict[str, BindParameter[Any]] = {}
    for element in visitors.iterate(query):
        if isinstance(element, BindParameter) and element.required:
            found.setdefault(element.key, element)
    return list(found.values())


def _unbound_message(label: str, query: ClauseElement, bind: BindParameter[Any]) -> str:
    if not isinstance(query, TextClause):
        return (
            f"{label}: bind parameter {bind.key!r} has no value, and a view's query is stored "
            f"with its values written in; give it one (sa.bindparam({bind.key!r}, value)) or "
            "use sa.literal(value)"
        )
    position = query.text.find(f":{bind.key}")
    where = sqltext.context_at(query.text, position) if position >= 0 else "word"
    inside = {
        "string": " (it is inside a string literal, where text() still reads it)",
        "ident": " (it is inside a quoted identifier, where text() still reads it)",
        "comment": " (it is inside a comment, where text() still reads it)",
    }.get(where, "")
    value = f", or give it a value with .bindparams({bind.key}=...)"
    return (
        f"{label}: text() reads ':{bind.key}' as a bind parameter{inside}, and it has no "
        f"value; pass the SQL as a plain str, whose colons are never parameters, escape the "
        f"colon as '\\:{bind.key}'{value if bind.key.isidentifier() else ''}"
    )


def check_query(query: Query, label: str) -> str:
    """Check ``query`` as a view's definition and return its SQL (see :func:`definition_sql`).

    Raises :class:`~sqlalchemy_matview.errors.DefinitionError`, its message starting with
    ``label``, for a bind parameter without a value, SQL holding several statements or
    nothing, and a query that cannot be compiled for PostgreSQL with literal values.
    """
    unbound = _unbound_parameters(query)
    if unbound:
        raise DefinitionError(_unbound_message(label, query, unbound[0]))
    try:
        sql = definition_sql(query)
    except DefinitionError as exc:
        raise DefinitionError(f"{label}: {exc}") from exc
    except (CompileError, NotImplementedError) as exc:
        raise DefinitionError(
            f"{label}: the query cannot be compiled for PostgreSQL with its values written in "
            f"({exc}); cast the value to a type SQLAlchemy can render, or write that part as "
            "sa.text() / sa.literal_column()"
        ) from exc
    if not sql:
        raise DefinitionError(f"{label}: the definition is empty; give it a SELECT query")
    return sql
