"""Advisory-lock keys: how several processes agree that only one refreshes a view at a time.

Every refresh made through :func:`~sqlalchemy_matview.refresh_views` (and the worker, and the
jobs of :func:`~sqlalchemy_matview.schedule_refresh`) first takes the transaction-level
advisory lock ``pg_advisory_xact_lock(lock_key(view))``. The key depends only on the view's
schema-qualified name, so every process, machine and library version computes the same one.

Finding a refresh in ``pg_locks``: PostgreSQL shows a ``bigint`` advisory key split in two
unsigned 32-bit halves, the high half in ``classid`` and the low half in ``objid``, with
``objsubid = 1``::

    SELECT l.pid, l.granted, a.query
      FROM pg_locks l JOIN pg_stat_activity a USING (pid)
     WHERE l.locktype = 'advisory' AND l.objsubid = 1
       AND l.classid = (:key >> 32) & 4294967295
       AND l.objid = :key & 4294967295;

:func:`lock_key_parts` computes those two halves in Python.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..errors import MaterializedViewError
from ..schema import MaterializedView, materialized_view_of

__all__ = [
    "DEFAULT_SCHEMA",
    "LockHolder",
    "check_namespace",
    "lock_holders",
    "lock_key",
    "lock_key_parts",
]

#: Schema assumed for a view declared without one (and for bare names).
DEFAULT_SCHEMA = "public"

# Namespacing the hash keeps our keys apart from any other user of advisory locks that
# hashes relation names.
_PREFIX = b"sqlalchemy_matview\x00refresh\x00"


def _qualified(view: object, schema: str | None) -> tuple[str, str]:
    declared = materialized_view_of(view)
    if declared is not None:
        return (declared.schema or schema or DEFAULT_SCHEMA, declared.name)
    if isinstance(view, tuple) and len(view) == 2:
        view_schema, name = view
        return (view_schema or schema or DEFAULT_SCHEMA, str(name))
    if isinstance(view, str) and view:
        return (schema or DEFAULT_SCHEMA, view)
    raise TypeError(
        "lock_key() takes a MaterializedView, its Table, a (schema, name) tuple or a view "
        f"name; got {view!r}"
    )


def check_namespace(namespace: object) -> str | None:
    """Validate a ``lock_namespace=`` option: ``None`` or a non-empty string."""
    if namespace is None or (isinstance(namespace, str) and namespace):
        return namespace
    raise MaterializedViewError(
        f"lock_namespace={namespace!r}: pass a non-empty string (the same one in every "
        "process that refreshes these views), or None for the default keys"
    )


def lock_key(
    view: MaterializedView | tuple[str | None, str] | str,
    *,
    schema: str | None = None,
    namespace: str | None = None,
) -> int:
    """The advisory-lock key guarding refreshes of ``view``: a signed 64-bit integer.

    It is the first 8 bytes (big-endian, signed) of a SHA-256 of the schema-qualified name,
    so it is stable across processes, machines and releases. A view (or bare name)
    without a schema is taken to live in ``public``; pass ``schema=`` for another
    default. Names are never parsed: ``"a.b"`` is a view named ``a.b``.

    >>> lock_key(("public", "mv_daily")) == lock_key("mv_daily")
    True
    >>> -(2**63) <= lock_key("mv_daily") < 2**63
    True

    ``namespace`` salts the key (HMAC-SHA-256 keyed by it): a role that can take advisory
    locks but does not know the namespace cannot compute the key, so it cannot hold a
    view's refreshes off by taking its lock. Every process refreshing the views must pass
    the same ``lock_namespace=`` (``refresh_views``, ``RefreshWorker``, ``schedule_refresh``,
    ``matview refresh --lock-namespace``). Without it the key is the documented default.

    >>> lock_key("mv_daily", namespace="s3cret") != lock_key("mv_daily")
    True

    Use it to hold off refreshes yourself::

        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(lock_key(mv_daily))))
    """
    view_schema, name = _qualified(view, schema)
    message = _PREFIX + view_schema.encode() + b"\x00" + name.encode()
    if check_namespace(namespace) is None:
        digest = hashlib.sha256(message).digest()
    else:
        assert namespace is not None
        digest = hmac.new(namespace.encode(), message, hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def lock_key_parts(
    view: MaterializedView | tuple[str | None, str] | str,
    *,
    schema: str | None = None,
    namespace: str | None = None,
) -> tuple[int, int]:
    """``(classid, objid)``: how ``pg_locks`` shows :func:`lock_key` of ``view``.

    >>> classid, objid = lock_key_parts("mv_daily")
    >>> (classid << 32 | objid) == lock_key("mv_daily") & 0xFFFFFFFFFFFFFFFF
    True
    """
    unsigned = lock_key(view, schema=schema, namespace=namespace) & 0xFFFFFFFFFFFFFFFF
    return (unsigned >> 32, unsigned & 0xFFFFFFFF)


@dataclass(frozen=True)
class LockHolder:
    """A session holding (``granted``) or waiting for an advisory lock, from ``pg_locks``.

    ``pg_stat_activity`` shows ``state``, ``query`` and ``xact_start`` of other roles'
    sessions only to superusers and members of ``pg_read_all_stats``: None otherwise.
    """

    pid: int
    granted: bool
    application_name: str | None
    user: str | None
    client_addr: str | None
    state: str | None
    xact_start: datetime | None
    query: str | None


_HOLDERS = sa.text(
    """
    SELECT l.pid, l.granted, a.application_name, a.usename, a.client_addr::text,
           a.state, a.xact_start, a.query
      FROM pg_catalog.pg_locks AS l
      LEFT JOIN pg_catalog.pg_stat_activity AS a ON a.pid = l.pid
     WHERE l.locktype = 'advisory' AND l.objsubid = 1
       AND l.classid::pg_catalog.int8 = :classid AND l.objid::pg_catalog.int8 = :objid
       AND l.database = (SELECT d.oid FROM pg_catalog.pg_database AS d
                          WHERE d.datname = pg_catalog.current_database())
     ORDER BY l.granted DESC, l.pid
    """
).bindparams(
    sa.bindparam("classid", type_=sa.BigInteger), sa.bindparam("objid", type_=sa.BigInteger)
)


def lock_holders(conn: Connection, key: int) -> list[LockHolder]:
    """The sessions holding, then those waiting for, the advisory lock ``key`` in this database.

    ``key`` is a :func:`lock_key`; both the session-level (``pg_advisory_lock``) and the
    transaction-level form show up here.

    Example::

        for holder in lock_holders(conn, lock_key(mv_daily)):
            print(holder.pid, holder.application_name, holder.granted)
    """
    unsigned = key & 0xFFFFFFFFFFFFFFFF
    rows = conn.execute(_HOLDERS, {"classid": unsigned >> 32, "objid": unsigned & 0xFFFFFFFF})
    return [LockHolder(*row) for row in rows]
