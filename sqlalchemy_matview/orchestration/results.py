"""What a refresh run reports: one :class:`RefreshResult` per view."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["STATUSES", "RefreshResult", "RefreshStatus"]

RefreshStatus = Literal[
    "refreshed",
    "skipped_locked",
    "skipped_fresh",
    "skipped_dependency_failed",
    "failed",
]

#: Every value :attr:`RefreshResult.status` can take.
STATUSES: tuple[RefreshStatus, ...] = (
    "refreshed",
    "skipped_locked",
    "skipped_fresh",
    "skipped_dependency_failed",
    "failed",
)


@dataclass(frozen=True)
class RefreshResult:
    """The outcome of refreshing one view.

    >>> r = RefreshResult("public.mv_daily", "refreshed", concurrently=True, duration=0.25)
    >>> r.ok, r.skipped
    (True, False)
    """

    #: Schema-qualified name of the view, ``"schema.name"`` (unquoted).
    view: str
    #: ``"refreshed"``, ``"skipped_locked"`` (another process holds the view's lock),
    #: ``"skipped_fresh"`` (nothing changed since its last refresh),
    #: ``"skipped_dependency_failed"`` (a view it reads from failed) or ``"failed"``.
    status: RefreshStatus
    #: Whether ``REFRESH ... CONCURRENTLY`` was used (or would have been).
    concurrently: bool = False
    #: Seconds spent on this view, lock wait and bookkeeping included.
    duration: float = 0.0
    #: The exception behind ``"failed"`` (or a lock timeout behind ``"skipped_locked"``).
    error: BaseException | None = None
    #: Changes to its sources committed while it was being refreshed: the view is still
    #: stale and another refresh is due (a worker refreshes it again).
    pending: bool = False
    #: Incremental views only (else ``None``): how many buckets the refresh recomputed
    #: (every stored bucket after a full recompute; 0 when nothing was dirty).
    buckets: int | None = None
    #: Incremental views only (else ``None``): True when everything was recomputed, because
    #: a source was truncated or the dirty buckets held more than ``full_refresh_above`` of
    #: the rows.
    full_refresh: bool | None = None

    @property
    def ok(self) -> bool:
        """True unless the view failed or was skipped because a view it reads failed."""
        return self.status not in ("failed", "skipped_dependency_failed")

    @property
    def skipped(self) -> bool:
        """True for every ``skipped_*`` status."""
        return self.status.startswith("skipped")
