"""Definitions as PostgreSQL prints them: SQL text, and temporary probes read back.

PostgreSQL prints a materialized view's query exactly as it prints the same query stored as a
plain view, so a declared definition is created as a temporary view and read back with
``pg_get_viewdef``; equal text then means an equal definition, with no hand-written SQL
normalisation.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import DDLCompiler
from sqlalchemy.sql.ddl import ExecutableDDLElement

from ..ddl import definition_query
from ..query import as_query

log = logging.getLogger(__name__)


def normalize_definition(text: str) -> str:
    """``pg_get_viewdef`` text without its surrounding blanks and final semicolon."""
    return text.strip().rstrip(";").strip()


class _CreateProbeView(ExecutableDDLElement):
    inherit_cache = False

    def __init__(self, name: str, columns: Sequence[str], definition: str) -> None:
        self.name = name
        self.columns = tuple(columns)
        self.definition = as_query(definition)


@compiles(_CreateProbeView, "postgresql")
def _visit_probe(element: _CreateProbeView, compiler: DDLCompiler, **kw: Any) -> str:
    quote = compiler.preparer.quote
    columns = ", ".join(quote(c) for c in element.columns)
    query = definition_query(element.definition, compiler)
    return f"CREATE TEMPORARY VIEW {quote(element.name)} ({columns}) AS {query}"


_PROBE_PREFIX = "sqlalchemy_matview_probe_"

_PROBE_DEFINITIONS = sa.text(
    """
    SELECT c.relname AS name, pg_catalog.pg_get_viewdef(c.oid) AS definition
      FROM pg_catalog.pg_class c
     WHERE c.relnamespace = pg_catalog.pg_my_temp_schema() AND c.relname = ANY (:names)
    """
)


def normalise(conn: Connection, probes: Sequence[tuple[Sequence[str], str]]) -> list[str | None]:
    """PostgreSQL's text of each ``(columns, definition)``; ``None`` where it cannot be created.

    All probes are created in one savepoint that is rolled back. When one fails (say, it reads
    a column that the same migration adds), the probes are retried one savepoint each, so the
    others still compare.
    """
    if not probes:
        return []
    names = [f"{_PROBE_PREFIX}{i}" for i in range(len(probes))]
    statements = [
        _CreateProbeView(name, columns, sql)
        for name, (columns, sql) in zip(names, probes, strict=True)
    ]
    outer = conn.begin_nested()
    try:
        try:
            for statement in statements:
                conn.execute(statement)
            failed: set[str] = set()
        except DBAPIError:
            outer.rollback()
            outer = conn.begin_nested()
            failed = set()
            for name, statement in zip(names, statements, strict=True):
                inner = conn.begin_nested()
                try:
                    conn.execute(statement)
                except DBAPIError as exc:
                    log.info("definition of probe %s cannot be created: %s", name, exc.orig)
                    inner.rollback()
                    failed.add(name)
                else:
                    inner.commit()
        created = [n for n in names if n not in failed]
        rows = conn.execute(_PROBE_DEFINITIONS, {"names": created})
        texts = {str(row[0]): str(row[1]) for row in rows}
    finally:
        outer.rollback()
    return [normalize_definition(texts[n]) if n in texts else None for n in names]
