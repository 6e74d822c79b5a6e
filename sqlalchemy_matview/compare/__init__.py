"""Declared materialized views against the database: what must change, in what order.

This package knows nothing of Alembic. :func:`compare_views` reads the catalog and returns plain
records (:class:`CreateView`, :class:`DropView`, :class:`ReplaceView`, :class:`CreateIndex`,
:class:`DropIndex`, :class:`ChangeComment`, :class:`EnableTracking`,
:class:`DisableTracking`, :class:`DetachView`, :class:`AttachView`) in an order that can be
executed as is. The Alembic comparator
(:mod:`sqlalchemy_matview.alembic.comparator`) turns them into operations; other tools (a
``matview diff`` command, a test) can use them directly.

Definitions are compared as PostgreSQL itself prints them. Every declared definition of a view
that exists already is created as a temporary plain view (with the same column names, on the
same connection and ``search_path``) inside one savepoint that is always rolled back, and all
those probes are read back with ``pg_get_viewdef`` in a single query. PostgreSQL prints a
materialized view's query exactly as it prints the same query stored as a view, so equal text
means an equal definition, without any hand-written SQL normalisation. Indexes are compared
the same way, by what ``pg_get_indexdef`` prints (:mod:`.indexes`); the probes of every
definition and index are sent as one ``DO`` block.

The number of queries is fixed, whatever the number of views: the materialized views, their
indexes, the default schema, the probes, the installed change tracking, and (only when several
views are dropped, when views are replaced, when a changed view may read a dropped one, or when
views must be detached around table changes) the dependency graph, the views reading columns
whose type changes, and in one query the privileges and owners of the views to drop and the
state of the views to replace or re-create with their dependents.

A replaced view's record (:class:`ReplaceView`) carries what the view and every view reading
it look like -- indexes, comment, privileges, owner, dependents' definitions -- so that the
replace can be carried out without reading the catalog (``alembic upgrade --sql``).

A changed view that still reads (in the database) a view being dropped is detached as well:
dropped before that drop, created from its new definition after it.

Privileges and owners: every record that drops a view carries its grants (``relacl`` without
the owner's own) and its owner (``None`` when it is the role comparing), and every record that
creates one again carries the same, so that roles reading the views keep their access.

Detaching views around table changes: a changed view whose definition reads a table that the
same migration alters in a way the old view would block (``DROP COLUMN``, a column type
change, ``DROP TABLE``) cannot be replaced after those changes, because PostgreSQL refuses
them while the old view exists; nor can an unchanged view stay in place while the type of a
column it reads changes. Such a view is *detached*: the view and every view depending on it
are dropped before the table changes (:class:`DetachView`, carrying what is needed to
re-create each of them) and created again after them (:class:`CreateView` with the declared
definition, :class:`AttachView` for the dependents). What the
dependents look like is read from the catalog when the comparison runs, so that the migration
shows it and ``--sql`` can print it.

The package is laid out by concept: :mod:`.records` (what a comparison returns),
:mod:`.declared` (the views of the ``MetaData``), :mod:`.reflected` (what the database has),
:mod:`.normalise` (definitions and indexes as PostgreSQL prints them, through probes),
:mod:`.indexes` (an index's shape, and rebuilding one exactly), :mod:`.plan` (the order of
operations, detaching) and :mod:`.diff` (:func:`compare_views`, which ties them together).
"""

from __future__ import annotations

from ..query import definition_sql
from .declared import is_view_table
from .diff import compare_views
from .normalise import normalize_definition
from .records import (
    PRIVILEGES,
    PUBLIC,
    AttachView,
    CapturedView,
    Change,
    ChangeComment,
    CreateIncremental,
    CreateIndex,
    CreateView,
    DetachView,
    DisableTracking,
    DropIncremental,
    DropIndex,
    DropView,
    EnableTracking,
    Grant,
    IncludeFilter,
    ReflectedIndex,
    ReplaceView,
    ViewRef,
)
from .reflected import capture_views

__all__ = [
    "PRIVILEGES",
    "PUBLIC",
    "AttachView",
    "CapturedView",
    "Change",
    "ChangeComment",
    "CreateIncremental",
    "CreateIndex",
    "CreateView",
    "DetachView",
    "DisableTracking",
    "DropIncremental",
    "DropIndex",
    "DropView",
    "EnableTracking",
    "Grant",
    "IncludeFilter",
    "ReflectedIndex",
    "ReplaceView",
    "ViewRef",
    "capture_views",
    "compare_views",
    "definition_sql",
    "is_view_table",
    "normalize_definition",
]
