"""Exceptions raised by sqlalchemy-matview.

Every error raised for misuse derives from :class:`MaterializedViewError`; most also
derive from the built-in exception a caller would expect (``ValueError``,
``TypeError``), so code written against either keeps working.
"""

from __future__ import annotations

from sqlalchemy.exc import CompileError

__all__ = [
    "ConcurrentRefreshError",
    "DefinitionError",
    "DependencyCycleError",
    "ExtensionNotInstalledError",
    "IncrementalRefreshError",
    "MaterializedViewError",
    "ReadOnlyMaterializedViewError",
    "SessionRequiredError",
    "StandbyError",
    "TrackingInstallError",
    "UnknownViewError",
    "UnsupportedDialectError",
    "WorkerOptionError",
]


class MaterializedViewError(Exception):
    """Base class of every error sqlalchemy-matview raises for misuse."""


class DefinitionError(MaterializedViewError, ValueError):
    """A view's declaration is incomplete or inconsistent (untyped column, unknown key...)."""


class ConcurrentRefreshError(MaterializedViewError, ValueError):
    """``REFRESH ... CONCURRENTLY`` was asked for a view that cannot be refreshed that way."""


class ReadOnlyMaterializedViewError(MaterializedViewError, TypeError):
    """An INSERT, UPDATE or DELETE was aimed at a materialized view."""


class UnsupportedDialectError(MaterializedViewError, CompileError):
    """A materialized-view construct was compiled for a database other than PostgreSQL."""


class IncrementalRefreshError(MaterializedViewError, TypeError):
    """``refresh(view)`` (``REFRESH MATERIALIZED VIEW``) was built for an incremental view,
    which is stored as a table: refresh it with ``refresh_views`` / ``refresh_stale``."""


class UnknownViewError(MaterializedViewError, LookupError):
    """A view was named that is neither declared nor present in the database."""


class DependencyCycleError(MaterializedViewError, ValueError):
    """Materialized views were declared that depend on each other in a cycle."""


class ExtensionNotInstalledError(MaterializedViewError, RuntimeError):
    """A PostgreSQL extension the operation needs (such as ``pg_cron``) is missing."""


class WorkerOptionError(MaterializedViewError, ValueError):
    """A :class:`~sqlalchemy_matview.RefreshWorker` option is invalid (checked in ``__init__``)."""


class TrackingInstallError(MaterializedViewError, RuntimeError):
    """Change tracking's bookkeeping exists but is owned by a role the current one does not
    trust (it could run code with the app's privileges); the message names object and owner."""


class StandbyError(MaterializedViewError, RuntimeError):
    """A refresh was asked of a hot standby, which is read-only: refresh on the primary."""


class SessionRequiredError(MaterializedViewError, RuntimeError):
    """A worker would ``LISTEN`` through a pooler that hands out server connections per
    transaction (PgBouncer ``pool_mode = transaction``): pass ``listen_url=``."""
