"""The database side of a comparison: indexes, captured views, installed tracking, readers.

Each function runs one query whatever the number of views, with every value a bind parameter.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from .indexes import INDEX_COLUMNS, reflected_index
from .normalise import normalize_definition
from .records import CapturedView, FullKey, Grant, ReflectedIndex

_INDEXES = sa.text(
    f"""
    SELECT n.nspname AS schema, t.relname AS view_name, ic.relname AS name, {INDEX_COLUMNS}
      FROM pg_catalog.pg_index i
      JOIN pg_catalog.pg_class t ON t.oid = i.indrelid
      JOIN pg_catalog.pg_namespace n ON n.oid = t.relnamespace
      JOIN pg_catalog.pg_class ic ON ic.oid = i.indexrelid
      JOIN pg_catalog.pg_am am ON am.oid = ic.relam
     WHERE t.relkind = 'm' AND n.nspname = ANY (:schemas)
     ORDER BY n.nspname, t.relname, ic.relname
    """
)


def reflected_indexes(
    conn: Connection, schemas: Sequence[str], default_schema: str | None
) -> dict[tuple[str | None, str], dict[str, ReflectedIndex]]:
    """The indexes of the materialized views in ``schemas``, by view and index name."""
    found: dict[tuple[str | None, str], dict[str, ReflectedIndex]] = {}
    for row in conn.execute(_INDEXES, {"schemas": list(schemas)}).mappings():
        schema = None if row["schema"] == default_schema else row["schema"]
        index = reflected_index(row, schema, row["view_name"], row["name"])
        found.setdefault((schema, row["view_name"]), {})[index.name] = index
    return found


def tracking_installed(conn: Connection, schema: str | None = None) -> set[tuple[str, str]] | None:
    try:
        from ..orchestration import tracking
    except ImportError:
        return None
    installed = getattr(tracking, "tracking_installed", None)
    if installed is None:
        return None
    return set(installed(conn, schema))


# Pretty-printed index statements name the view as the definitions name their sources:
# unqualified when the search_path finds it, so that a migration written against one schema
# can run against another (schema-per-tenant).
_CAPTURE = sa.text(
    """
    SELECT n.nspname AS schema, c.relname AS name, c.relkind::text AS kind,
           pg_catalog.pg_get_viewdef(c.oid) AS definition, c.relispopulated AS populated,
           pg_catalog.obj_description(c.oid, 'pg_class') AS comment,
           COALESCE(c.reloptions, '{}')::text[] AS options,
           ARRAY(SELECT pg_catalog.pg_get_indexdef(i.indexrelid, 0, true)
                   FROM pg_catalog.pg_index i
                  WHERE i.indrelid = c.oid ORDER BY 1) AS indexes,
           NULLIF(pg_catalog.pg_get_userbyid(c.relowner)::text, current_user::text) AS owner,
           COALESCE(acl.grantees, '{}') AS grantees,
           COALESCE(acl.privileges, '{}') AS privileges,
           COALESCE(acl.grantable, '{}') AS grantable
      FROM pg_catalog.pg_class c
      JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
      JOIN ROWS FROM (pg_catalog.unnest(CAST(:schemas AS text[])),
                      pg_catalog.unnest(CAST(:names AS text[]))) AS w(schema, name)
        ON w.schema = n.nspname AND w.name = c.relname
      LEFT JOIN LATERAL (
            SELECT pg_catalog.array_agg(e.grantee ORDER BY e.grantee, e.privilege) AS grantees,
                   pg_catalog.array_agg(e.privilege ORDER BY e.grantee, e.privilege) AS privileges,
                   pg_catalog.array_agg(e.grantable ORDER BY e.grantee, e.privilege) AS grantable
              FROM (SELECT CASE WHEN a.grantee = 0 THEN 'public'
                                ELSE pg_catalog.pg_get_userbyid(a.grantee)::text END AS grantee,
                           a.privilege_type::text AS privilege,
                           bool_or(a.is_grantable) AS grantable
                      FROM pg_catalog.aclexplode(c.relacl) AS a
                     WHERE a.grantee <> c.relowner
                     GROUP BY 1, 2) AS e
           ) AS acl ON true
     WHERE c.relkind IN ('v', 'm')
    """
)


def capture_views(
    conn: Connection, keys: Sequence[tuple[str, str]]
) -> dict[tuple[str, str], CapturedView]:
    """The views and materialized views named by ``(schema, name)`` keys, in one query.

    Each comes with what re-creating it needs: definition, options, populated state,
    comment, indexes, privileges (``pg_class.relacl``) and owner. Keys that name no view
    are left out of the result.

    Example::

        captured = capture_views(conn, [("public", "mv_daily")])
        print(captured["public", "mv_daily"].indexes)
    """
    if not keys:
        return {}
    rows = conn.execute(
        _CAPTURE, {"schemas": [k[0] for k in keys], "names": [k[1] for k in keys]}
    ).mappings()
    found: dict[tuple[str, str], CapturedView] = {}
    for row in rows:
        item = CapturedView(
            schema=row["schema"],
            name=row["name"],
            kind=row["kind"],
            definition=normalize_definition(row["definition"] or ""),
            populated=bool(row["populated"]),
            comment=row["comment"],
            options=tuple(row["options"]),
            indexes=tuple(row["indexes"]),
            grants=tuple(
                Grant(str(grantee), str(privilege), bool(grantable))
                for grantee, privilege, grantable in zip(
                    row["grantees"], row["privileges"], row["grantable"], strict=True
                )
            ),
            owner=row["owner"],
        )
        found[(item.schema, item.name)] = item
    return found


_COLUMN_READERS = sa.text(
    """
    SELECT DISTINCT vn.nspname AS schema, v.relname AS name
      FROM pg_catalog.pg_depend d
      JOIN pg_catalog.pg_rewrite r ON r.oid = d.objid
      JOIN pg_catalog.pg_class v ON v.oid = r.ev_class
      JOIN pg_catalog.pg_namespace vn ON vn.oid = v.relnamespace
      JOIN pg_catalog.pg_class t ON t.oid = d.refobjid
      JOIN pg_catalog.pg_namespace tn ON tn.oid = t.relnamespace
      JOIN pg_catalog.pg_attribute a ON a.attrelid = t.oid AND a.attnum = d.refobjsubid
      JOIN ROWS FROM (pg_catalog.unnest(CAST(:schemas AS text[])),
                      pg_catalog.unnest(CAST(:tables AS text[])),
                      pg_catalog.unnest(CAST(:columns AS text[])))
           AS w(schema, tab, col)
        ON w.schema = tn.nspname AND w.tab = t.relname AND w.col = a.attname
     WHERE d.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass::pg_catalog.oid
       AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass::pg_catalog.oid
       AND d.refobjsubid > 0
       AND v.relkind = 'm'
    """
)


def column_readers(conn: Connection, columns: Sequence[tuple[str, str, str]]) -> set[FullKey]:
    """Materialized views whose query reads one of the ``(schema, table, column)``."""
    rows = conn.execute(
        _COLUMN_READERS,
        {
            "schemas": [c[0] for c in columns],
            "tables": [c[1] for c in columns],
            "columns": [c[2] for c in columns],
        },
    )
    return {(str(row[0]), str(row[1])) for row in rows}
