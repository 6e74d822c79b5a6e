"""What the database says: materialized views, their dependencies and indexes, from the catalog.

Each function runs a fixed number of queries whatever the number of views (callers such as
Alembic's comparator and ``refresh_views(cascade=True)`` depend on that), with every value
passed as a bind parameter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection

__all__ = [
    "Dependency",
    "MaterializedViewInfo",
    "QualifiedName",
    "dependencies",
    "installed_incremental",
    "installed_incremental_kinds",
    "materialized_views",
]

#: ``(schema, name)`` of a relation, as stored in the catalog (unquoted).
QualifiedName = tuple[str, str]

_SYSTEM_SCHEMAS = ("pg_catalog", "information_schema", "pg_toast")


@dataclass(frozen=True)
class MaterializedViewInfo:
    """One materialized view as the catalog describes it."""

    schema: str
    name: str
    #: ``pg_get_viewdef`` text (PostgreSQL's normalised form of the query), or ``None`` when
    #: not asked for.
    definition: str | None
    populated: bool
    comment: str | None
    #: Name of a unique index that allows ``REFRESH ... CONCURRENTLY``, if any.
    concurrent_index: str | None
    #: True when the view belongs to an extension (never to be touched by migrations).
    extension_owned: bool
    #: ``pg_class.reltuples``: the planner's row estimate (-1 or 0 before ANALYZE).
    row_estimate: int
    #: Pages of the view, its indexes and TOAST times the block size, from ``pg_class``
    #: statistics (as of the last VACUUM, ANALYZE or index build).
    size_bytes: int

    @property
    def qualified_name(self) -> QualifiedName:
        return (self.schema, self.name)


# Only catalog rows and statistics are read, except for pg_get_viewdef (asked for separately):
# functions such as pg_total_relation_size lock each view, and would wait behind a plain
# REFRESH holding ACCESS EXCLUSIVE on it.
_MATVIEWS = """
    SELECT n.nspname AS schema, c.relname AS name,
           {definition} AS definition,
           c.relispopulated AS populated,
           pg_catalog.obj_description(c.oid, 'pg_class') AS comment,
           (SELECT ic.relname
              FROM pg_catalog.pg_index i
              JOIN pg_catalog.pg_class ic ON ic.oid = i.indexrelid
             WHERE i.indrelid = c.oid AND i.indisunique AND i.indisvalid AND i.indimmediate
               AND i.indpred IS NULL AND i.indexprs IS NULL
             ORDER BY i.indnatts, ic.relname
             LIMIT 1) AS concurrent_index,
           EXISTS (SELECT 1 FROM pg_catalog.pg_depend d
                    WHERE d.classid = 'pg_catalog.pg_class'::pg_catalog.regclass::pg_catalog.oid
                      AND d.objid = c.oid
                      AND d.deptype = 'e') AS extension_owned,
           c.reltuples::bigint AS row_estimate,
           ((c.relpages::bigint
             + COALESCE((SELECT sum(ic.relpages) FROM pg_catalog.pg_index i
                          JOIN pg_catalog.pg_class ic ON ic.oid = i.indexrelid
                         WHERE i.indrelid = c.oid), 0)
             + COALESCE((SELECT t.relpages FROM pg_catalog.pg_class t
                          WHERE t.oid = c.reltoastrelid), 0))
            * current_setting('block_size')::bigint)::bigint AS size_bytes
      FROM pg_catalog.pg_class c
      JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
     WHERE c.relkind = 'm'
       AND n.nspname <> ALL (:system_schemas)
       AND n.nspname NOT LIKE 'pg\\_temp\\_%'
       AND (CAST(:all_schemas AS boolean) OR n.nspname = ANY (:schemas))
     ORDER BY n.nspname, c.relname
    """
_MATVIEWS_WITH_DEFINITIONS = sa.text(
    _MATVIEWS.format(definition="pg_catalog.pg_get_viewdef(c.oid)")
)
_MATVIEWS_WITHOUT_DEFINITIONS = sa.text(_MATVIEWS.format(definition="NULL::text"))


def _schema_params(schemas: Sequence[str] | None) -> dict[str, object]:
    return {
        "system_schemas": list(_SYSTEM_SCHEMAS),
        "all_schemas": schemas is None,
        "schemas": list(schemas or []),
    }


def materialized_views(
    conn: Connection, schemas: Sequence[str] | None = None, *, definitions: bool = True
) -> list[MaterializedViewInfo]:
    """Every materialized view in ``schemas`` (default: all non-system schemas), in one query.

    ``definitions=False`` leaves out the views' SQL: ``pg_get_viewdef`` locks each view, so
    without it the query never waits behind a running plain ``REFRESH`` (monitoring and
    refresh planning use that).
    """
    query = _MATVIEWS_WITH_DEFINITIONS if definitions else _MATVIEWS_WITHOUT_DEFINITIONS
    rows = conn.execute(query, _schema_params(schemas)).mappings()
    return [MaterializedViewInfo(**row) for row in rows]


@dataclass(frozen=True)
class Dependency:
    """``dependent`` (a view or materialized view) reads from ``referenced``."""

    dependent: QualifiedName
    #: ``pg_class.relkind`` of the dependent: ``'v'`` (view) or ``'m'`` (materialized view).
    dependent_kind: str
    referenced: QualifiedName
    #: ``pg_class.relkind`` of the referenced relation (``'r'``, ``'p'``, ``'v'``, ``'m'``, ...).
    referenced_kind: str


# A view's query is stored as a rewrite rule; what the rule reads is recorded in pg_depend
# against the rule, so the rule's ev_class is the dependent view. (DEPENDENCIES_SQL is also
# composed into the refresh plan's single query.)
DEPENDENCIES_SQL = """
    SELECT DISTINCT dn.nspname AS dependent_schema, dc.relname AS dependent_name,
           dc.relkind::text AS dependent_kind,
           rn.nspname AS referenced_schema, rc.relname AS referenced_name,
           rc.relkind::text AS referenced_kind
      FROM pg_catalog.pg_depend d
      JOIN pg_catalog.pg_rewrite r ON r.oid = d.objid
      JOIN pg_catalog.pg_class dc ON dc.oid = r.ev_class
      JOIN pg_catalog.pg_namespace dn ON dn.oid = dc.relnamespace
      JOIN pg_catalog.pg_class rc ON rc.oid = d.refobjid
      JOIN pg_catalog.pg_namespace rn ON rn.oid = rc.relnamespace
     WHERE d.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass::pg_catalog.oid
       AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass::pg_catalog.oid
       AND d.deptype = 'n'
       AND dc.relkind IN ('v', 'm')
       AND d.refobjid <> r.ev_class
       AND rn.nspname <> ALL (:system_schemas)
    """
_DEPENDENCIES = sa.text(DEPENDENCIES_SQL)
SYSTEM_SCHEMAS = _SYSTEM_SCHEMAS


def dependencies(conn: Connection) -> list[Dependency]:
    """Every "view reads relation" edge among user relations, in one query."""
    rows = conn.execute(_DEPENDENCIES, {"system_schemas": list(_SYSTEM_SCHEMAS)})
    return [
        Dependency(
            dependent=(row.dependent_schema, row.dependent_name),
            dependent_kind=row.dependent_kind,
            referenced=(row.referenced_schema, row.referenced_name),
            referenced_kind=row.referenced_kind,
        )
        for row in rows
    ]


def current_schema(conn: Connection) -> str:
    """The schema unqualified names resolve to (``current_schema()``).

    With an empty ``search_path`` there is none: unqualified names then resolve only in
    ``pg_catalog``, which is what this returns, so that lookups report the views missing
    instead of looking in a schema called ``"None"``.
    """
    current = conn.execute(sa.text("SELECT pg_catalog.current_schema()")).scalar_one()
    return "pg_catalog" if current is None else str(current)


_INSTALLED = sa.text(
    """
    SELECT n.nspname::text AS schema, c.relname::text AS name, c.relkind::text AS kind
      FROM pg_catalog.pg_class c
      JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
     WHERE c.relkind OPERATOR(pg_catalog.=) ANY (ARRAY['r', 'p', 'v']::pg_catalog."char"[])
       AND (CAST(:schemas AS pg_catalog.text[]) IS NULL
            OR n.nspname OPERATOR(pg_catalog.=) ANY (CAST(:schemas AS pg_catalog.text[])))
       AND EXISTS (
           SELECT 1 FROM pg_catalog.pg_proc p
            WHERE p.pronamespace OPERATOR(pg_catalog.=) (SELECT b.oid FROM pg_catalog.pg_namespace b
                                                  WHERE b.nspname OPERATOR(pg_catalog.=) :bk)
              AND p.proname OPERATOR(pg_catalog.=) ('inc_' OPERATOR(pg_catalog.||)
                  pg_catalog.left(pg_catalog.md5(n.nspname OPERATOR(pg_catalog.||) '.'
                  OPERATOR(pg_catalog.||) c.relname), 12) OPERATOR(pg_catalog.||) '_refresh'))
     ORDER BY 1, 2
    """
)


def installed_incremental(
    conn: Connection, bookkeeping: str, schemas: Sequence[str] | None = None
) -> list[QualifiedName]:
    """``(schema, name)`` of every incremental view in ``schemas`` (default: all): every
    table with a refresh function named after it in the ``bookkeeping`` schema
    (``inc_`` and the first 12 hex digits of ``md5('schema.name')``, see
    :func:`sqlalchemy_matview.incremental.names_for`). One query."""
    return [name for name, _ in installed_incremental_kinds(conn, bookkeeping, schemas)]


def installed_incremental_kinds(
    conn: Connection, bookkeeping: str, schemas: Sequence[str] | None = None
) -> list[tuple[QualifiedName, bool]]:
    """As :func:`installed_incremental`, each with whether it is a realtime view (its name
    is a plain view, its rows are stored in ``<name>__stored``). One query."""
    given = None if schemas is None else list(schemas)
    rows = conn.execute(_INSTALLED, {"schemas": given, "bk": bookkeeping})
    return [((str(r.schema), str(r.name)), r.kind == "v") for r in rows]
