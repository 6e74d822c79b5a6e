"""Everything a refresh run reads before it refreshes, in one statement.

The runner used to ask for each fact on its own (``current_schema()``,
``pg_is_in_recovery()``, the bookkeeping's owners, the materialized views, one refresh
function per incremental view, ``pg_depend``): six and more round trips around a refresh
that may itself take a millisecond. This query returns them all as tagged rows of one
result; the caller still decides everything from them (whether the server is a standby,
whether the bookkeeping can be trusted, which names exist) exactly as before.

Only catalog rows are read, never a relation of the bookkeeping schema: nothing in this
query can run code of whoever owns that schema (the runner reads the bookkeeping tables
afterwards, and only when :func:`~.tracking.judge_inventory` trusts them).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from .. import catalog
from . import incremental, tracking

__all__ = ["Candidate", "PlanReads", "read_plan"]

#: ``(schema or None for the current schema, name, may be incremental)``.
Candidate = tuple[str | None, str, bool]

# The incremental view's refresh function is named from md5('schema.name') of the UTF-8
# bytes, as sqlalchemy_matview.incremental.names_for computes it in Python.
_REFRESH_FUNCTION = (
    "pg_catalog.to_regprocedure(pg_catalog.quote_ident(:schema) || '.' ||"
    " pg_catalog.quote_ident('inc_' || pg_catalog.left(pg_catalog.md5("
    "pg_catalog.convert_to(k.schema || '.' || k.name, 'UTF8')), 12) || '_refresh')"
    " || '(' || :refresh_args || ')')"
)

# Only the candidates' names (an index scan of pg_class; same names in other schemas come
# along and are ignored), unless a cascade needs every materialized view.
_MATVIEWS_OF_CANDIDATES = """
       AND c.relname = ANY (CAST(:cand_names AS pg_catalog.text[]))"""

# A unique index REFRESH ... CONCURRENTLY accepts (plain columns, no WHERE), as in
# catalog.materialized_views; "IN (subquery)" is one hashed scan of pg_index for all views.
_CONCURRENT_INDEX = """c.oid IN (
           SELECT i.indrelid FROM pg_catalog.pg_index i
            WHERE i.indisunique AND i.indisvalid AND i.indimmediate
              AND i.indpred IS NULL AND i.indexprs IS NULL)"""


@functools.cache
def _plan_query(all_matviews: bool, dependencies: bool) -> sa.TextClause:
    """The statement, without the parts the run does not need: a fixed text per variant
    (not a flag in the query), so that a driver that prepares statements (psycopg after 5
    runs) gets a generic plan and stops planning it at every call.

    Tagged rows, columns a..f (text) and flag (boolean):

    - env: a = current_schema() ('pg_catalog' when there is none), flag = in recovery;
    - owned: a = kind, b = name, c = owner, d = marker, flag = trusted (the inventory);
    - matview: a = schema, b = name, c = 'unique' when a unique index allows CONCURRENTLY,
      flag = populated;
    - function: a = schema, b = name of a candidate whose incremental refresh function exists;
    - depends: a, b = the dependent; c, d = the referenced; e, f = their relkinds.
    """
    sql = (
        tracking.INVENTORY_CTES
        + f""",
    env(current) AS (
        SELECT COALESCE(pg_catalog.current_schema()::text, 'pg_catalog')),
    cand(schema, name, maybe_incremental) AS (
        SELECT DISTINCT COALESCE(u.schema, (SELECT env.current FROM env)), u.name, u.inc
          FROM ROWS FROM (pg_catalog.unnest(CAST(:cand_schemas AS pg_catalog.text[])),
                          pg_catalog.unnest(CAST(:cand_names AS pg_catalog.text[])),
                          pg_catalog.unnest(CAST(:cand_incremental AS pg_catalog.bool[])))
               AS u(schema, name, inc)),
    inventory AS ({tracking.INVENTORY_ROWS})
    SELECT 'env'::text AS tag, env.current AS a, NULL::text AS b, NULL::text AS c,
           NULL::text AS d, NULL::text AS e, NULL::text AS f,
           pg_catalog.pg_is_in_recovery() AS flag
      FROM env
    UNION ALL
    SELECT 'owned', i.kind, i.name, i.owner, i.marker, NULL, NULL, i.trusted FROM inventory i
    UNION ALL
    SELECT 'matview', n.nspname::text, c.relname::text,
           CASE WHEN {_CONCURRENT_INDEX} THEN 'unique' END, NULL, NULL, NULL, c.relispopulated
      FROM pg_catalog.pg_class c
      JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
     WHERE c.relkind = 'm'
       AND n.nspname <> ALL (:system_schemas)
       AND n.nspname NOT LIKE 'pg\\_temp\\_%'{"" if all_matviews else _MATVIEWS_OF_CANDIDATES}
    UNION ALL
    SELECT 'function', k.schema, k.name, NULL, NULL, NULL, NULL, NULL
      FROM cand k
     WHERE k.maybe_incremental AND {_REFRESH_FUNCTION} IS NOT NULL
    """
    )
    if dependencies:
        sql += f"""
    UNION ALL
    SELECT 'depends', d.dependent_schema, d.dependent_name, d.referenced_schema,
           d.referenced_name, d.dependent_kind, d.referenced_kind, NULL
      FROM ({catalog.DEPENDENCIES_SQL}) d
    """
    return sa.text(sql)


@dataclass(frozen=True)
class _Owned:
    kind: str
    name: str
    owner: str
    trusted: bool
    marker: str | None


@dataclass
class PlanReads:
    """What :func:`read_plan` found."""

    #: ``current_schema()``, or ``"pg_catalog"`` with an empty ``search_path``.
    current_schema: str
    in_recovery: bool
    #: The bookkeeping verdict (see :func:`~.tracking.bookkeeping_inventory`).
    inventory: tracking.Inventory
    #: ``(schema, name)`` -> ``(populated, has a unique index allowing CONCURRENTLY)``.
    matviews: dict[tuple[str, str], tuple[bool, bool]]
    #: Candidates whose incremental refresh function exists (trust it only with
    #: ``inventory.exists``).
    refresh_functions: set[tuple[str, str]]
    dependencies: list[catalog.Dependency]


def read_plan(
    conn: Connection,
    candidates: Sequence[Candidate],
    bookkeeping: str,
    *,
    all_matviews: bool,
    dependencies: bool,
) -> PlanReads:
    """One statement: the facts a refresh run plans with.

    ``candidates`` are the names the run may refresh; only their materialized views are
    read unless ``all_matviews`` (a cascade needs all of them), and ``pg_depend`` only with
    ``dependencies``.
    """
    rows = conn.execute(
        _plan_query(all_matviews, dependencies),
        {
            "schema": bookkeeping,
            "cand_schemas": [c[0] for c in candidates],
            "cand_names": [c[1] for c in candidates],
            "cand_incremental": [c[2] for c in candidates],
            "refresh_args": incremental.REFRESH_ARGS,
            "system_schemas": list(catalog.SYSTEM_SCHEMAS),
        },
    ).all()
    current, in_recovery = "pg_catalog", False
    owned: list[_Owned] = []
    matviews: dict[tuple[str, str], tuple[bool, bool]] = {}
    functions: set[tuple[str, str]] = set()
    deps: list[catalog.Dependency] = []
    for tag, a, b, c, d, e, f, flag in rows:  # unpacked: hundreds of rows for many views
        if tag == "env":
            current, in_recovery = str(a), bool(flag)
        elif tag == "owned":
            owned.append(_Owned(a, b, c, bool(flag), d))
        elif tag == "matview":
            matviews[(a, b)] = (bool(flag), c is not None)
        elif tag == "function":
            functions.add((a, b))
        else:
            deps.append(catalog.Dependency((a, b), e, (c, d), f))
    return PlanReads(
        current_schema=current,
        in_recovery=in_recovery,
        inventory=tracking.judge_inventory(owned, bookkeeping),
        matviews=matviews,
        refresh_functions=functions,
        dependencies=deps,
    )
