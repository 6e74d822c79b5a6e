"""Definitions as PostgreSQL prints them: SQL text, and temporary probes read back.

PostgreSQL prints a materialized view's query exactly as it prints the same query stored as a
plain view, so a declared definition is created as a temporary view and read back with
``pg_get_viewdef``; equal text then means an equal definition, with no hand-written SQL
normalisation.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import DDLCompiler
from sqlalchemy.sql.ddl import CreateIndex, ExecutableDDLElement

from ..ddl import definition_query
from ..query import as_query
from ..sqltext import dollar_tag as _dollar_tag
from .indexes import INDEX_COLUMNS, probe_index, shape_of

log = logging.getLogger(__name__)


def normalize_definition(text: str) -> str:
    """``pg_get_viewdef`` text without its surrounding blanks and final semicolon."""
    return text.strip().rstrip(";").strip()


@dataclass(frozen=True)
class Probe:
    """A declared view to compare with the database, and its indexes the database also has."""

    #: The view's column names (written out, as a SQL definition's are).
    columns: tuple[str, ...]
    #: The declared definition as SQL (:func:`~sqlalchemy_matview.query.definition_sql`).
    sql: str
    #: ``(schema, name)`` of the existing view: its columns carry the index probes when the
    #: declared definition cannot be created.
    existing: tuple[str, str]
    #: Declared indexes to turn into PostgreSQL's text.
    indexes: tuple[sa.Index, ...] = ()


@dataclass(frozen=True)
class Normalised:
    """What PostgreSQL makes of a :class:`Probe`; ``None`` where it could not be created."""

    definition: str | None
    #: The shape (see :mod:`.indexes`) of each probed index, by the declared index's name.
    index_shapes: dict[str, str | None] = field(default_factory=dict)


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


class _CreateProbeTable(ExecutableDDLElement):
    """``CREATE TEMPORARY TABLE name (LIKE source)``: an empty table to index."""

    inherit_cache = False

    def __init__(self, name: str, like: sa.TableClause) -> None:
        self.name = name
        self.like = like


@compiles(_CreateProbeTable, "postgresql")
def _visit_probe_table(element: _CreateProbeTable, compiler: DDLCompiler, **kw: Any) -> str:
    like = compiler.preparer.format_table(element.like)
    return f"CREATE TEMPORARY TABLE {compiler.preparer.quote(element.name)} (LIKE {like})"


class _Block(ExecutableDDLElement):
    """Several statements sent as one: a ``DO`` block that executes each in turn."""

    inherit_cache = False

    def __init__(self, statements: Sequence[ExecutableDDLElement]) -> None:
        self.statements = tuple(statements)


@compiles(_Block, "postgresql")
def _visit_block(element: _Block, compiler: DDLCompiler, **kw: Any) -> str:
    # Each statement becomes a dollar-quoted string, so nothing in it is read by PL/pgSQL.
    texts = [compiler.process(statement) for statement in element.statements]
    tag = _dollar_tag(texts, "q")
    body = "".join(f"EXECUTE {tag}{text}{tag};\n" for text in texts)
    outer = _dollar_tag([body], "do")
    return f"DO {outer}\nBEGIN\n{body}END\n{outer}"


_PROBE_PREFIX = "sqlalchemy_matview_probe_"

_PROBES_READ_BACK = sa.text(
    f"""
    SELECT c.relname AS name, pg_catalog.pg_get_viewdef(c.oid) AS definition,
           NULL AS "unique", NULL AS method, NULL AS list_at
      FROM pg_catalog.pg_class c
     WHERE c.relnamespace = pg_catalog.pg_my_temp_schema() AND c.relname = ANY (:views)
    UNION ALL
    SELECT ic.relname, d.definition, d."unique", d.method, d.list_at
      FROM pg_catalog.pg_index i
      JOIN pg_catalog.pg_class t ON t.oid = i.indrelid
      JOIN pg_catalog.pg_namespace n ON n.oid = t.relnamespace
      JOIN pg_catalog.pg_class ic ON ic.oid = i.indexrelid
      JOIN pg_catalog.pg_am am ON am.oid = ic.relam
      CROSS JOIN LATERAL (SELECT {INDEX_COLUMNS}) AS d
     WHERE ic.relnamespace = pg_catalog.pg_my_temp_schema() AND ic.relname = ANY (:indexes)
    """
)


def _statements(
    probes: Sequence[Probe], created: Callable[[int], bool]
) -> Iterator[tuple[str, ExecutableDDLElement]]:
    """``(name, statement)`` of every probe; ``created(i)``: did view probe ``i`` exist?"""
    for i, probe in enumerate(probes):
        view = f"{_PROBE_PREFIX}{i}"
        yield view, _CreateProbeView(view, probe.columns, probe.sql)
        if not probe.indexes:
            continue
        table = f"{_PROBE_PREFIX}t{i}"
        source = (
            sa.table(view, schema="pg_temp")
            if created(i)
            else sa.table(probe.existing[1], schema=probe.existing[0])
        )
        yield table, _CreateProbeTable(table, source)
        for j, index in enumerate(probe.indexes):
            name = f"{_PROBE_PREFIX}{i}_{j}"
            yield name, CreateIndex(probe_index(index, name, table))


def normalise(conn: Connection, probes: Sequence[Probe]) -> list[Normalised]:
    """PostgreSQL's text of each probe's definition and indexes.

    Everything is created in one savepoint that is always rolled back, sent as a single
    statement, and read back in one query: four round trips whatever the number of views.
    When a probe fails (say, a definition reads a column that the same migration adds), they
    are created again one savepoint each, so that the others still compare; an index probe
    then rests on the existing view's columns.
    """
    if not probes:
        return []
    outer = conn.begin_nested()
    try:
        try:
            statements = list(_statements(probes, lambda i: True))
            conn.execute(_Block([s for _, s in statements]))
            failed: set[str] = set()
        except DBAPIError:
            outer.rollback()
            outer = conn.begin_nested()
            failed = set()

            def created(i: int) -> bool:
                return f"{_PROBE_PREFIX}{i}" not in failed

            for name, statement in _statements(probes, created):
                inner = conn.begin_nested()
                try:
                    conn.execute(statement)
                except DBAPIError as exc:
                    log.info("probe %s cannot be created: %s", name, exc.orig)
                    inner.rollback()
                    failed.add(name)
                else:
                    inner.commit()
        views = [f"{_PROBE_PREFIX}{i}" for i in range(len(probes))]
        indexes = [
            f"{_PROBE_PREFIX}{i}_{j}" for i, p in enumerate(probes) for j in range(len(p.indexes))
        ]
        rows = conn.execute(_PROBES_READ_BACK, {"views": views, "indexes": indexes}).mappings()
        texts: dict[str, str] = {}
        for row in rows:
            if row["method"] is None:
                texts[row["name"]] = normalize_definition(row["definition"])
            else:
                texts[row["name"]] = shape_of(
                    bool(row["unique"]), row["method"], row["definition"], row["list_at"]
                )
    finally:
        outer.rollback()
    return [
        Normalised(
            texts.get(f"{_PROBE_PREFIX}{i}"),
            {
                str(index.name): texts.get(f"{_PROBE_PREFIX}{i}_{j}")
                for j, index in enumerate(probe.indexes)
            },
        )
        for i, probe in enumerate(probes)
    ]
