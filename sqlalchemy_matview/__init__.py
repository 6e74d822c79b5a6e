"""PostgreSQL materialized views as first-class SQLAlchemy and Alembic objects.

>>> import sqlalchemy as sa
>>> from sqlalchemy_matview import MaterializedView, refresh
>>> md = sa.MetaData()
>>> t = sa.Table("t", md, sa.Column("id", sa.Integer, primary_key=True))
>>> mv = MaterializedView("mv", md, sa.select(t.c.id), unique_key="id")
>>> from sqlalchemy.dialects import postgresql
>>> print(refresh(mv).compile(dialect=postgresql.dialect()))
REFRESH MATERIALIZED VIEW CONCURRENTLY mv
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .bookkeeping import set_tracking_schema, tracking_schema
from .ddl import (
    CommentOnMaterializedView,
    CreateMaterializedView,
    DropMaterializedView,
    RefreshMaterializedView,
    refresh,
)
from .errors import (
    ConcurrentRefreshError,
    DefinitionError,
    DependencyCycleError,
    ExtensionNotInstalledError,
    IncrementalRefreshError,
    MaterializedViewError,
    ReadOnlyMaterializedViewError,
    SessionRequiredError,
    StandbyError,
    TrackingInstallError,
    UnknownViewError,
    UnsupportedDialectError,
    WorkerOptionError,
)
from .incremental import Incremental
from .reflection import reflect_materialized_views
from .schema import (
    MaterializedView,
    materialized_view_of,
    materialized_views,
    unique_key_index_name,
)

if TYPE_CHECKING:
    from .orchestration import (
        Freshness,
        RefreshRecord,
        RefreshResult,
        RefreshWorker,
        TrackingProblem,
        check_tracking,
        freshness,
        lock_key,
        refresh_all,
        refresh_history,
        refresh_stale,
        refresh_views,
        schedule_refresh,
        unschedule_refresh,
    )

__version__ = "0.1.0"

# The orchestration layer is loaded on first use of one of its names, so that importing a
# declaration module (``sqlalchemy_matview.schema``) never imports it.
_ORCHESTRATION = frozenset(
    {
        "Freshness",
        "RefreshRecord",
        "RefreshResult",
        "RefreshWorker",
        "TrackingProblem",
        "check_tracking",
        "freshness",
        "lock_key",
        "refresh_all",
        "refresh_history",
        "refresh_stale",
        "refresh_views",
        "schedule_refresh",
        "unschedule_refresh",
    }
)


def __getattr__(name: str) -> Any:
    if name in _ORCHESTRATION:
        value = getattr(importlib.import_module(".orchestration", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CommentOnMaterializedView",
    "ConcurrentRefreshError",
    "CreateMaterializedView",
    "DefinitionError",
    "DependencyCycleError",
    "DropMaterializedView",
    "ExtensionNotInstalledError",
    "Freshness",
    "Incremental",
    "IncrementalRefreshError",
    "MaterializedView",
    "MaterializedViewError",
    "ReadOnlyMaterializedViewError",
    "RefreshMaterializedView",
    "RefreshRecord",
    "RefreshResult",
    "RefreshWorker",
    "SessionRequiredError",
    "StandbyError",
    "TrackingInstallError",
    "TrackingProblem",
    "UnknownViewError",
    "UnsupportedDialectError",
    "WorkerOptionError",
    "__version__",
    "check_tracking",
    "freshness",
    "lock_key",
    "materialized_view_of",
    "materialized_views",
    "reflect_materialized_views",
    "refresh",
    "refresh_all",
    "refresh_history",
    "refresh_stale",
    "refresh_views",
    "schedule_refresh",
    "set_tracking_schema",
    "tracking_schema",
    "unique_key_index_name",
    "unschedule_refresh",
]
