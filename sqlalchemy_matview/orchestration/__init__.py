"""Refresh orchestration: ordering, locking, change tracking, the worker and pg_cron.

Named ``orchestration`` rather than ``refresh`` so that it never shadows the
:func:`sqlalchemy_matview.refresh` function.
"""

from __future__ import annotations

from .cron import schedule_refresh, unschedule_refresh
from .history import RefreshRecord, refresh_history
from .locking import LockHolder, lock_holders, lock_key, lock_key_parts
from .objectives import Freshness, freshness
from .results import RefreshResult
from .runner import refresh_all, refresh_stale, refresh_views
from .tracking import TrackingProblem, ViewState, check_tracking, view_states
from .worker import RefreshWorker

__all__ = [
    "Freshness",
    "LockHolder",
    "RefreshRecord",
    "RefreshResult",
    "RefreshWorker",
    "TrackingProblem",
    "ViewState",
    "check_tracking",
    "freshness",
    "lock_holders",
    "lock_key",
    "lock_key_parts",
    "refresh_all",
    "refresh_history",
    "refresh_stale",
    "refresh_views",
    "schedule_refresh",
    "unschedule_refresh",
    "view_states",
]
