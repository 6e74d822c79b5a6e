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
    MaterializedViewError,
    ReadOnlyMaterializedViewError,
    UnknownViewError,
    UnsupportedDialectError,
    WorkerOptionError,
)
from .orchestration import (
    RefreshResult,
    RefreshWorker,
    lock_key,
    refresh_all,
    refresh_stale,
    refresh_views,
    schedule_refresh,
    unschedule_refresh,
)
from .reflection import reflect_materialized_views
from .schema import (
    MaterializedView,
    materialized_view_of,
    materialized_views,
    unique_key_index_name,
)

__version__ = "0.1.0"

__all__ = [
    "CommentOnMaterializedView",
    "ConcurrentRefreshError",
    "CreateMaterializedView",
    "DefinitionError",
    "DependencyCycleError",
    "DropMaterializedView",
    "ExtensionNotInstalledError",
    "MaterializedView",
    "MaterializedViewError",
    "ReadOnlyMaterializedViewError",
    "RefreshMaterializedView",
    "RefreshResult",
    "RefreshWorker",
    "UnknownViewError",
    "UnsupportedDialectError",
    "WorkerOptionError",
    "__version__",
    "lock_key",
    "materialized_view_of",
    "materialized_views",
    "reflect_materialized_views",
    "refresh",
    "refresh_all",
    "refresh_stale",
    "refresh_views",
    "schedule_refresh",
    "unique_key_index_name",
    "unschedule_refresh",
]
