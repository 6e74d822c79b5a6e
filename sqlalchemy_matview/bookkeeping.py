"""Names of the library's own database objects (change tracking's bookkeeping).

Declaration layer: this module only names things; creating them is
:mod:`sqlalchemy_matview.orchestration.tracking`'s job. The Alembic filters and the
comparison use :func:`is_bookkeeping_table` so that migrations never propose adding or
dropping these tables.

Everything lives in one schema of its own, created by the library: :data:`DEFAULT_SCHEMA`
(``sqlalchemy_matview``) unless :func:`set_tracking_schema` names another one for a
``MetaData``.

>>> import sqlalchemy as sa
>>> md = sa.MetaData()
>>> tracking_schema(md)
'sqlalchemy_matview'
>>> set_tracking_schema(md, "mv_admin")
>>> tracking_schema(md)
'mv_admin'
>>> is_bookkeeping_table("mv_admin", "changes", tracking_schema="mv_admin")
True
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa

__all__ = [
    "CHANGES_TABLE",
    "CHANNEL",
    "DEFAULT_HISTORY_KEEP",
    "DEFAULT_SCHEMA",
    "HISTORY_KEEP_SETTING",
    "HISTORY_TABLE",
    "LEGACY_SCHEMA",
    "LEGACY_TABLES",
    "LEGACY_TRIGGER",
    "TRIGGER_NAMES",
    "TRIGGER_PARTITION",
    "TRIGGER_ROW",
    "TRIGGER_STATEMENT",
    "TRIGGER_TRUNCATE",
    "VIEWS_TABLE",
    "is_bookkeeping_table",
    "set_tracking_schema",
    "tracking_hooks",
    "tracking_schema",
]

#: Schema holding the bookkeeping tables and functions unless configured otherwise.
DEFAULT_SCHEMA = "sqlalchemy_matview"
#: One row per view known to the library: tracking, sources, barrier key, last refresh.
VIEWS_TABLE = "views"
#: The change log: one row per (view, writing transaction) not yet covered by a refresh.
CHANGES_TABLE = "changes"
#: The refresh history: one row per refresh (or failure, or skip for a held lock), the last
#: :data:`DEFAULT_HISTORY_KEEP` per view (the setting :data:`HISTORY_KEEP_SETTING` changes it).
HISTORY_TABLE = "history"
#: A PostgreSQL setting: how many history rows to keep per view (``ALTER DATABASE ... SET``).
HISTORY_KEEP_SETTING = "sqlalchemy_matview.history_keep"
DEFAULT_HISTORY_KEEP = 100
#: The ``NOTIFY`` channel; the payload is the view's ``schema.name``.
CHANNEL = "sqlalchemy_matview"

#: Statement-level ``INSERT OR UPDATE OR DELETE`` trigger (fires in ``origin``/``local``).
TRIGGER_STATEMENT = "sqlalchemy_matview_stmt"
#: Row-level ``BEFORE`` twin, ``ENABLE REPLICA``: fires for rows applied by logical replication
#: (``session_replication_role = replica``), which fires no statement trigger.
TRIGGER_ROW = "sqlalchemy_matview_row"
#: Statement-level ``TRUNCATE`` trigger, ``ENABLE ALWAYS``.
TRIGGER_TRUNCATE = "sqlalchemy_matview_truncate"
#: Row-level ``BEFORE`` trigger of a partitioned table, ``ENABLE ALWAYS``: PostgreSQL clones it to
#: every partition, including partitions attached or created later.
TRIGGER_PARTITION = "sqlalchemy_matview_part"
TRIGGER_NAMES = (TRIGGER_STATEMENT, TRIGGER_ROW, TRIGGER_TRUNCATE, TRIGGER_PARTITION)

#: Where release 0.1.0 kept its bookkeeping (moved by ``create_all`` and an Alembic op).
LEGACY_SCHEMA = "public"
LEGACY_TABLES = frozenset({"sqlalchemy_matview_state", "sqlalchemy_matview_changes"})
LEGACY_TRIGGER = "sqlalchemy_matview_track"

_INFO_KEY = "sqlalchemy_matview_tracking_schema"


def set_tracking_schema(metadata: sa.MetaData, schema: str) -> None:
    """Keep the bookkeeping of ``metadata``'s tracked views in ``schema``.

    Every process working on the same database must use the same schema (the CLI reads
    it from the ``MetaData`` it loads).
    """
    if not isinstance(schema, str) or not schema or schema in ("public", "pg_catalog"):
        raise ValueError(
            f"tracking schema {schema!r}: name a schema of its own for the bookkeeping "
            f"(default {DEFAULT_SCHEMA!r}), not public or pg_catalog"
        )
    metadata.info[_INFO_KEY] = schema


def tracking_schema(metadata: sa.MetaData | None = None) -> str:
    """The bookkeeping schema of ``metadata`` (:data:`DEFAULT_SCHEMA` unless set)."""
    if metadata is None:
        return DEFAULT_SCHEMA
    return str(metadata.info.get(_INFO_KEY, DEFAULT_SCHEMA))


def is_bookkeeping_table(
    schema: str | None, name: str, *, tracking_schema: str | None = None
) -> bool:
    """True for a table of the library's bookkeeping, which migrations never compare.

    Everything in the tracking schema, and the tables 0.1.0 kept in ``public``.

    >>> is_bookkeeping_table("public", "sqlalchemy_matview_state")
    True
    >>> is_bookkeeping_table("public", "orders")
    False
    """
    own = tracking_schema or DEFAULT_SCHEMA
    return schema == own or (schema == LEGACY_SCHEMA and name in LEGACY_TABLES)


# -- the seam between declarations and orchestration ---------------------------------------

#: ``(after_create, before_drop)`` set by :mod:`sqlalchemy_matview.orchestration.tracking`.
_HOOKS: list[tuple[Callable[..., Any], Callable[..., Any]]] = []


def register_tracking_hooks(
    after_create: Callable[..., Any], before_drop: Callable[..., Any]
) -> None:
    """Called once by the orchestration layer when it is imported."""
    if not _HOOKS:
        _HOOKS.append((after_create, before_drop))


def tracking_hooks() -> tuple[Callable[..., Any], Callable[..., Any]]:
    """What ``create_all`` / ``drop_all`` run for a ``track_changes=True`` view.

    The declaration layer never imports the orchestration layer; when a tracked view is
    created and nothing imported the orchestration yet (``import sqlalchemy_matview``
    does), it is loaded here by name, like a plugin.
    """
    if not _HOOKS:
        importlib.import_module("sqlalchemy_matview.orchestration.tracking")
    return _HOOKS[0]
