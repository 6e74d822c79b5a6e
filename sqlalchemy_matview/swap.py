"""Side-by-side replacement: build a view's new version next to the old one, swap in milliseconds.

Replacing a materialized view the plain way (drop it, create it again) keeps it locked, or
absent, for the whole rebuild. The side-by-side way keeps readers reading the old version
until the new one is complete:

1. **Build**, in a transaction of its own: a *staging schema* is created (one per schema
   among the swapped views, named ``sqlalchemy_matview_swap_<hash>``, at most 63 bytes and
   checked free) and the new version is created there under the view's own name, ``WITH
   DATA``, with the view's indexes (under their own names), comment and privileges, and
   analysed. Every view depending on it is built there too, against the new version: the
   build runs with the staging schemas first on ``search_path``, so that the dependents'
   definitions (as ``pg_get_viewdef`` printed them) read the staged versions. Nothing in the
   build locks the old views: readers, and writers of the tables, carry on.
2. **Swap**, at the end of the same transaction, in one ``DO`` block: with ``lock_timeout``
   set to the swap's, the old dependents (readers first) and the old view are dropped, the
   staged views are moved into their schemas (``ALTER ... SET SCHEMA``, which keeps their
   indexes and names), owners are given back and the staging schemas dropped. When a lock
   cannot be had in time -- a long transaction reading the old view, a refresh -- the swap's
   subtransaction is rolled back, which releases whatever it had locked, so that readers
   queued behind it go on; it sleeps (exponential backoff with jitter) and tries again, up
   to ``retries`` times, then fails naming the sessions holding the locks
   (:class:`SwapLockTimeoutError`).

Build and swap are one transaction, so that any failure -- in the build, in the swap, or the
migration's process dying -- leaves the old views as they were and no staging schema behind.
Only the swap holds locks that readers wait for, from its first ``DROP`` to the commit.

Refreshes made through this library (``refresh_views``, the workers, ``schedule_refresh``)
take each view's advisory lock first (:func:`~sqlalchemy_matview.lock_key`); the build takes
the same locks before it reads anything, so that no refresh of the old view (or of a
materialized dependent) can run between the build's snapshot and the swap and clear
staleness marks that the new version does not cover. Such a refresh is skipped (or waits, with
``lock="wait"``) and refreshes the new version once the swap has committed.

The statements are built here from plain records (:class:`SwappedView`) and executed by the
caller -- Alembic's operation (:mod:`sqlalchemy_matview.alembic.toimpl`), which prints them
with ``--sql`` -- so that the same steps run online and offline.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.schema import CreateSchema
from sqlalchemy.sql.compiler import DDLCompiler, IdentifierPreparer
from sqlalchemy.sql.ddl import ExecutableDDLElement

from . import sqltext
from .ddl import (
    CatalogStatement,
    CommentOnMaterializedView,
    CommentOnPlainView,
    CreateMaterializedView,
    CreatePlainView,
    access_statements,
)
from .errors import MaterializedViewError

if TYPE_CHECKING:
    from .query import Definition

__all__ = [
    "DEFAULT_SWAP_LOCK_TIMEOUT",
    "DEFAULT_SWAP_RETRIES",
    "STAGING_PREFIX",
    "SwapError",
    "SwapLockTimeoutError",
    "SwapOptionError",
    "SwapPlan",
    "SwappedView",
    "check_swap_options",
    "plan_swap",
    "retarget_index",
]

#: Seconds the swap waits for each lock before it rolls back, sleeps and tries again.
DEFAULT_SWAP_LOCK_TIMEOUT = 0.5
#: How many times the swap tries again after a lock timeout before it gives up.
DEFAULT_SWAP_RETRIES = 10
#: First sleep between two attempts, in seconds; it doubles at each attempt up to
#: :data:`BACKOFF_MAX`, and each sleep is drawn between half of it and all of it.
BACKOFF_START = 0.2
BACKOFF_MAX = 5.0
#: Staging schemas are named ``<prefix><8 hex digits>[_<n>]``.
STAGING_PREFIX = "sqlalchemy_matview_swap_"
#: Message of the error the swap raises when it runs out of attempts.
LOCK_TIMEOUT_MARK = "could not take the locks to swap materialized view"
#: Set (transaction-locally) by the swap to the number of attempts it needed.
ATTEMPTS_SETTING = "sqlalchemy_matview.swap_attempts"
# Where the build keeps the search_path it found, to give it back.
_SAVED_PATH_SETTING = "sqlalchemy_matview.search_path"

_MAX_IDENTIFIER_BYTES = 63


class SwapError(MaterializedViewError, RuntimeError):
    """A side-by-side replacement failed; the old views are untouched."""


class SwapLockTimeoutError(SwapError):
    """The swap could not take its locks within ``swap_retries`` attempts.

    The message names the sessions that held locks on the old views; the build was rolled
    back with everything else.
    """


class SwapOptionError(MaterializedViewError, ValueError):
    """``swap_lock_timeout`` / ``swap_retries`` of a replace are not valid."""


def check_swap_options(view: str, lock_timeout: object, retries: object) -> tuple[float, int]:
    """``(lock_timeout in seconds, retries)``, checked before any SQL is sent.

    >>> check_swap_options("mv", timedelta(milliseconds=250), 3)
    (0.25, 3)
    """
    if isinstance(lock_timeout, timedelta):
        lock_timeout = lock_timeout.total_seconds()
    if (
        isinstance(lock_timeout, bool)
        or not isinstance(lock_timeout, (int, float))
        or not math.isfinite(lock_timeout)
        or lock_timeout < 0.001
    ):
        raise SwapOptionError(
            f"replace_materialized_view({view!r}): swap_lock_timeout={lock_timeout!r} is not "
            "a duration; pass seconds (0.5) or a timedelta of at least 1 ms"
        )
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise SwapOptionError(
            f"replace_materialized_view({view!r}): swap_retries={retries!r} is not a number "
            "of attempts; pass an int >= 0"
        )
    return float(lock_timeout), retries


@dataclass(frozen=True)
class SwappedView:
    """A view rebuilt side by side: the replaced view with its new definition, or one of the
    views depending on it with its current definition, and what it must keep."""

    name: str
    #: ``None``: found through ``search_path`` (the default schema).
    schema: str | None
    materialized: bool
    definition: Definition
    with_data: bool = True
    #: Column names to give the view (the replaced view's ``columns=``).
    columns: tuple[str, ...] | None = None
    comment: str | None = None
    #: ``key=value`` options of a plain view.
    options: tuple[str, ...] = ()
    #: ``CREATE INDEX`` statements naming the view (see :func:`retarget_index`).
    indexes: tuple[str, ...] = ()
    #: ``(grantee, privilege, grantable)``; ``"public"`` is ``PUBLIC``.
    grants: tuple[tuple[str, str, bool], ...] = ()
    #: Its owner; ``None`` when it is the role running the swap.
    owner: str | None = None

    @property
    def kind(self) -> str:
        return "MATERIALIZED VIEW" if self.materialized else "VIEW"


def retarget_index(statement: str, table: str) -> str:
    """``statement`` (``CREATE [UNIQUE] INDEX [name] ON [ONLY] view ...``) on ``table`` instead.

    ``table`` is SQL (a quoted, qualified name). Only the relation between ``ON`` and the
    ``USING`` clause (or the opening parenthesis) is replaced; the index keeps its name, which
    PostgreSQL gives it in the table's schema.

    >>> retarget_index("CREATE UNIQUE INDEX mv_k ON mv USING btree (k)", '"stage"."mv"')
    'CREATE UNIQUE INDEX mv_k ON "stage"."mv" USING btree (k)'
    >>> retarget_index('CREATE INDEX "On" ON ONLY s."mv" (k)', "t")
    'CREATE INDEX "On" ON t (k)'
    """
    words = [t for t in sqltext.tokens(statement) if t.kind not in ("space", "comment")]
    upper = [t.text.upper() if t.kind == "word" else None for t in words]
    if upper[:1] != ["CREATE"] or "INDEX" not in upper[:3] or "ON" not in upper:
        raise SwapError(f"not a CREATE INDEX statement: {statement!r}")
    on = upper.index("ON", upper.index("INDEX"))
    end = next(
        (
            i
            for i in range(on + 1, len(words))
            if upper[i] == "USING" or (words[i].kind == "punct" and words[i].text == "(")
        ),
        None,
    )
    if end is None or end == on + 1:
        raise SwapError(f"cannot find the indexed relation in {statement!r}")
    return f"{statement[: words[on].end]} {table} {statement[words[end].start :]}"


class AdvisoryLock(ExecutableDDLElement):
    """``SELECT pg_advisory_xact_lock(key)``, the key written in (``--sql`` prints it)."""

    inherit_cache = False

    def __init__(self, key: int) -> None:
        self.key = int(key)


@compiles(AdvisoryLock, "postgresql")
def _visit_lock(element: AdvisoryLock, compiler: DDLCompiler, **kw: Any) -> str:
    return f"SELECT pg_catalog.pg_advisory_xact_lock({element.key:d})"


class AnalyzeView(ExecutableDDLElement):
    """``ANALYZE name``: a view built side by side serves its first readers with statistics."""

    inherit_cache = False

    def __init__(self, name: str, schema: str | None) -> None:
        self.table = sa.table(name, schema=schema)


@compiles(AnalyzeView, "postgresql")
def _visit_analyze(element: AnalyzeView, compiler: DDLCompiler, **kw: Any) -> str:
    return "ANALYZE " + compiler.preparer.format_table(element.table)


class SearchPathFirst(ExecutableDDLElement):
    """Put ``schemas`` first on ``search_path`` until :class:`SearchPathRestore` (or the end of
    the transaction), keeping the path it found in a custom setting."""

    inherit_cache = False

    def __init__(self, schemas: Sequence[str]) -> None:
        self.schemas = tuple(schemas)


class SearchPathRestore(ExecutableDDLElement):
    """Give back the ``search_path`` that :class:`SearchPathFirst` found."""

    inherit_cache = False


@compiles(SearchPathFirst, "postgresql")
def _visit_path_first(element: SearchPathFirst, compiler: DDLCompiler, **kw: Any) -> str:
    first = ", ".join(compiler.preparer.quote_identifier(s) for s in element.schemas) + ", "
    literal = compiler.sql_compiler.render_literal_value
    return (
        "SELECT pg_catalog.set_config("
        f"{literal(_SAVED_PATH_SETTING, sa.String())}, "
        "pg_catalog.current_setting('search_path'), true), pg_catalog.set_config("
        f"'search_path', {literal(first, sa.String())} "
        "|| pg_catalog.current_setting('search_path'), true)"
    )


@compiles(SearchPathRestore, "postgresql")
def _visit_path_restore(element: SearchPathRestore, compiler: DDLCompiler, **kw: Any) -> str:
    literal = compiler.sql_compiler.render_literal_value(_SAVED_PATH_SETTING, sa.String())
    return (
        f"SELECT pg_catalog.set_config('search_path', pg_catalog.current_setting({literal}), true)"
    )


class SwapBlock(ExecutableDDLElement):
    """The swap: one ``DO`` block that retries on lock timeouts (see the module docstring)."""

    inherit_cache = False

    def __init__(self, plan: SwapPlan) -> None:
        self.plan = plan


@dataclass(frozen=True)
class SwapPlan:
    """Everything a side-by-side replacement runs, in order: see :func:`plan_swap`."""

    #: The replaced view, with its new definition.
    view: SwappedView
    #: The views reading it (directly or not), each after what it reads.
    dependents: tuple[SwappedView, ...]
    #: Staging schema of each schema among the swapped views (``None``: the default one).
    staging: dict[str | None, str]
    lock_timeout: float
    retries: int
    #: Advisory-lock keys of the materialized views swapped (refreshers take the same).
    lock_keys: tuple[int, ...] = ()
    backoff: tuple[float, float] = field(default=(BACKOFF_START, BACKOFF_MAX))

    @property
    def views(self) -> tuple[SwappedView, ...]:
        return (self.view, *self.dependents)

    @property
    def label(self) -> str:
        return f"{self.view.schema}.{self.view.name}" if self.view.schema else self.view.name

    def staged(self, item: SwappedView) -> sa.TableClause:
        return sa.table(item.name, schema=self.staging[item.schema])

    def locks(self) -> list[ExecutableDDLElement]:
        """``pg_advisory_xact_lock`` of each swapped materialized view, in key order."""
        return [AdvisoryLock(key) for key in sorted(set(self.lock_keys))]

    def build(self) -> list[ExecutableDDLElement]:
        """The staging schemas, then every view built in them with what it keeps."""
        return [statement for _, statement in self.build_steps()]

    def build_steps(self) -> list[tuple[SwappedView | None, ExecutableDDLElement]]:
        """:meth:`build`, each statement with the view whose ``CREATE`` it is (else ``None``)."""
        steps: list[tuple[SwappedView | None, ExecutableDDLElement]] = [
            (None, CreateSchema(name)) for name in dict.fromkeys(self.staging.values())
        ]
        steps += self._build_one(self.view)
        if self.dependents:
            # The staged views first, then the schemas of the views as the dependents'
            # definitions were printed with them (see plan_swap), then the path as it is.
            first = [*self.staging.values(), *(s for s in self.staging if s is not None)]
            steps.append((None, SearchPathFirst(list(dict.fromkeys(first)))))
            for item in self.dependents:
                steps += self._build_one(item)
            steps.append((None, SearchPathRestore()))
        return steps

    def _build_one(
        self, item: SwappedView
    ) -> list[tuple[SwappedView | None, ExecutableDDLElement]]:
        staged = self.staged(item)
        schema = staged.schema
        create: ExecutableDDLElement
        if item.materialized:
            create = CreateMaterializedView(
                item.name,
                item.definition,
                schema=schema,
                with_data=item.with_data,
                columns=item.columns,
            )
        else:
            create = CreatePlainView(item.name, schema, item.definition, item.options)
        statements: list[ExecutableDDLElement] = []
        for index in item.indexes:
            statements.append(_RetargetedIndex(index, staged))
        if item.materialized and item.with_data:
            statements.append(AnalyzeView(item.name, schema))
        if item.comment is not None:
            if item.materialized:
                statements.append(CommentOnMaterializedView(item.name, item.comment, schema=schema))
            else:
                statements.append(CommentOnPlainView(item.name, schema, item.comment))
        # The owner is given in the swap: the new owner needs CREATE on the schema it ends in.
        statements += access_statements(
            item.name,
            schema,
            materialized=item.materialized,
            grants=[g for g in item.grants if g[0] != item.owner],
            owner=None,
            current_user=None,
        )
        return [(item, create)] + [(None, statement) for statement in statements]

    def swap(self) -> SwapBlock:
        return SwapBlock(self)


class _RetargetedIndex(CatalogStatement):
    def __init__(self, statement: str, table: sa.TableClause) -> None:
        super().__init__(statement)
        self.relation = table


@compiles(_RetargetedIndex, "postgresql")
def _visit_retargeted(element: _RetargetedIndex, compiler: DDLCompiler, **kw: Any) -> str:
    statement = retarget_index(element.statement, compiler.preparer.format_table(element.relation))
    text: str = compiler.sql_compiler.post_process_text(statement)  # type: ignore[no-untyped-call]
    return text


def _staging_names(
    schemas: Sequence[str | None], token: str, taken: Callable[[str], bool]
) -> dict[str | None, str]:
    names: dict[str | None, str] = {}
    n = 0
    for schema in schemas:
        while True:
            name = f"{STAGING_PREFIX}{token}" + (f"_{n}" if n else "")
            n += 1
            if not taken(name):
                break
        assert len(name.encode()) <= _MAX_IDENTIFIER_BYTES
        names[schema] = name
    return names


def plan_swap(
    view: SwappedView,
    dependents: Sequence[SwappedView],
    *,
    lock_timeout: float = DEFAULT_SWAP_LOCK_TIMEOUT,
    retries: int = DEFAULT_SWAP_RETRIES,
    lock_keys: Sequence[int] = (),
    schema_taken: Callable[[str], bool] = lambda name: False,
) -> SwapPlan:
    """The statements replacing ``view`` side by side, with ``dependents`` rebuilt against it.

    ``dependents`` come each after what it reads. Their definitions name the views they read
    without a schema wherever ``search_path`` finds them: the build puts the staging schemas
    first on it, then the swapped views' own schemas (in the order of ``view`` and
    ``dependents``, as the definitions should have been printed with), then the path it finds.
    ``schema_taken`` says whether a schema of that name exists (online); staging names are
    otherwise derived from the views and the new definition, so that ``--sql`` prints the same
    script every time.

    Raises :class:`SwapError` when two swapped views share a name in different schemas: the
    build finds the staged versions by name through ``search_path``.
    """
    items = (view, *dependents)
    seen: dict[str, str | None] = {}
    for item in items:
        if item.name in seen and seen[item.name] != item.schema:
            raise SwapError(
                f"replace_materialized_view({view.name!r}, strategy='side_by_side'): the views "
                f"{seen[item.name] or '(default schema)'}.{item.name} and "
                f"{item.schema or '(default schema)'}.{item.name} are both rebuilt, and the "
                "build finds staged views by name; use strategy='drop_create' for this change"
            )
        seen[item.name] = item.schema
    from .query import definition_sql

    digest = hashlib.sha256()
    for item in items:
        digest.update(f"{item.schema}\x00{item.name}\x00".encode())
    definition = view.definition
    digest.update(definition_sql(definition).encode())
    schemas = list(dict.fromkeys(item.schema for item in items))
    return SwapPlan(
        view=view,
        dependents=tuple(dependents),
        staging=_staging_names(schemas, digest.hexdigest()[:8], schema_taken),
        lock_timeout=lock_timeout,
        retries=retries,
        lock_keys=tuple(lock_keys),
    )


# -- the swap block -------------------------------------------------------------------------


def _swap_body(plan: SwapPlan, preparer: IdentifierPreparer, literal: Callable[[str], str]) -> str:
    """PL/pgSQL of the swap; ``literal`` quotes a piece of SQL text (a dollar quote)."""
    items = plan.views
    timeout_ms = max(1, round(plan.lock_timeout * 1000))
    lines = [
        "DECLARE",
        "    saved_timeout pg_catalog.text := pg_catalog.current_setting('lock_timeout');",
        "    attempt pg_catalog.int4 := 0;",
        "    old_oids pg_catalog.oid[];",
        "    holders pg_catalog.text;",
        *(f"    s{i} pg_catalog.text;" for i in range(len(items))),
        *(f"    o{i} pg_catalog.oid;" for i in range(len(items))),
        "BEGIN",
        "    LOOP",
        "        attempt := attempt + 1;",
        "        BEGIN",
        f"            PERFORM pg_catalog.set_config('lock_timeout', '{timeout_ms}ms', true);",
    ]
    # Where each old view is now (a view named without its schema is found through the
    # search_path): the new version goes to the same schema.
    for i, item in enumerate(items):
        name = literal(preparer.format_table(sa.table(item.name, schema=item.schema)))
        relkind = "m" if item.materialized else "v"
        lines += [
            f"            SELECT pg_catalog.quote_ident(n.nspname), c.oid INTO s{i}, o{i}",
            "              FROM pg_catalog.pg_class c",
            "              JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace",
            f"             WHERE c.oid = pg_catalog.to_regclass({name})::pg_catalog.oid"
            f" AND c.relkind = '{relkind}';",
            f"            IF s{i} IS NULL THEN",
            "                RAISE EXCEPTION USING ERRCODE = 'undefined_table', MESSAGE ="
            f" pg_catalog.concat({literal(item.kind.lower())}, ' ', {name},"
            " ' no longer exists: it cannot be swapped');",
            "            END IF;",
        ]
    lines.append(
        "            old_oids := ARRAY["
        + ", ".join(f"o{i}" for i in range(len(items)))
        + "]::pg_catalog.oid[];"
    )

    def execute(*parts: str) -> str:
        return "            EXECUTE " + " || ".join(parts) + ";"

    # Readers first: the dependents in reverse creation order, then the view itself.
    for i in reversed(range(len(items))):
        item = items[i]
        quoted = literal("." + preparer.quote(item.name))
        lines.append(execute(literal(f"DROP {item.kind} "), f"s{i}", quoted))
    for i, item in enumerate(items):
        staged = literal(
            f"ALTER {item.kind} {preparer.format_table(plan.staged(item))} SET SCHEMA "
        )
        lines.append(execute(staged, f"s{i}"))
    for i, item in enumerate(items):
        if item.owner is not None:
            lines.append(
                execute(
                    literal(f"ALTER {item.kind} "),
                    f"s{i}",
                    literal(f".{preparer.quote(item.name)} OWNER TO {preparer.quote(item.owner)}"),
                )
            )
    for name in dict.fromkeys(plan.staging.values()):
        lines.append(execute(literal(f"DROP SCHEMA {preparer.quote(name)}")))
    start, cap = plan.backoff
    lines += [
        "            EXIT;",
        "        EXCEPTION WHEN lock_not_available OR deadlock_detected THEN",
        f"            IF attempt > {plan.retries} THEN",
        "                SELECT pg_catalog.string_agg(DISTINCT pg_catalog.concat('pid ', l.pid,",
        "                       ' (', a.usename, ', ', a.state, ', transaction started ',",
        "                       a.xact_start, ': ', pg_catalog.left(a.query, 80), ')'), '; ')",
        "                  INTO holders",
        "                  FROM pg_catalog.pg_locks l",
        "                  JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid",
        "                 WHERE l.locktype = 'relation' AND l.granted",
        "                   AND l.relation = ANY (old_oids)",
        "                   AND l.pid <> pg_catalog.pg_backend_pid();",
        "                RAISE EXCEPTION USING ERRCODE = 'lock_not_available',",
        f"                    MESSAGE = pg_catalog.concat({literal(LOCK_TIMEOUT_MARK + ' ')},",
        f"                        {literal(plan.label)}, ' in ', attempt, ' attempts of',",
        f"                        ' {timeout_ms} ms each'),",
        "                    DETAIL = pg_catalog.concat('sessions holding locks on the views: ',",
        "                        COALESCE(holders, 'none any more')),",
        "                    HINT = 'end those transactions, or raise swap_lock_timeout or"
        " swap_retries';",
        "            END IF;",
        f"            PERFORM pg_catalog.pg_sleep(LEAST({cap}, {start} * 2 ^ (attempt - 1))",
        "                * (0.5 + pg_catalog.random() / 2));",
        "        END;",
        "    END LOOP;",
        "    PERFORM pg_catalog.set_config('lock_timeout', saved_timeout, true);",
        f"    PERFORM pg_catalog.set_config('{ATTEMPTS_SETTING}', attempt::pg_catalog.text, true);",
        "END",
    ]
    return "\n".join(lines) + "\n"


@compiles(SwapBlock, "postgresql")
def _visit_swap(element: SwapBlock, compiler: DDLCompiler, **kw: Any) -> str:
    preparer = compiler.preparer
    pieces: list[str] = []

    def collect(text: str) -> str:
        pieces.append(text)
        return f"\x00{len(pieces) - 1}\x00"

    # First with placeholders, to choose one dollar tag that quotes every piece; the pieces
    # (names, SQL) never reach PL/pgSQL other than as string literals.
    body = _swap_body(element.plan, preparer, collect)
    tag = sqltext.dollar_tag(pieces, "q")
    for i, piece in enumerate(pieces):
        body = body.replace(f"\x00{i}\x00", f"{tag}{piece}{tag}")
    outer = sqltext.dollar_tag([body], "swap")
    text: str = compiler.sql_compiler.post_process_text(  # type: ignore[no-untyped-call]
        f"DO {outer}\n{body}{outer}"
    )
    return text


def is_lock_timeout(exc: BaseException) -> bool:
    """True for the error of a swap that ran out of attempts (see :class:`SwapBlock`)."""
    orig = getattr(exc, "orig", None)
    code = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    return code == "55P03" and LOCK_TIMEOUT_MARK in str(orig)


# -- what the database says (online) -------------------------------------------------------

_RESULT_TYPES = sa.text(
    """
    SELECT w.label,
           ARRAY(SELECT a.attname || ' ' || pg_catalog.format_type(a.atttypid, a.atttypmod)
                   FROM pg_catalog.pg_attribute a
                  WHERE a.attrelid = pg_catalog.to_regclass(w.old)::pg_catalog.oid AND a.attnum > 0
                    AND NOT a.attisdropped ORDER BY a.attnum) AS old_columns,
           ARRAY(SELECT a.attname || ' ' || pg_catalog.format_type(a.atttypid, a.atttypmod)
                   FROM pg_catalog.pg_attribute a
                  WHERE a.attrelid = pg_catalog.to_regclass(w.new)::pg_catalog.oid AND a.attnum > 0
                    AND NOT a.attisdropped ORDER BY a.attnum) AS new_columns
      FROM ROWS FROM (pg_catalog.unnest(CAST(:labels AS text[])),
                      pg_catalog.unnest(CAST(:old AS text[])),
                      pg_catalog.unnest(CAST(:new AS text[])))
           AS w(label, old, new)
    """
)


def changed_result_types(conn: Connection, plan: SwapPlan) -> list[str]:
    """The swapped views whose columns (names, types, order) differ from the old ones'.

    Run after the build. Their readers' prepared statements (psycopg prepares a query after
    it ran 5 times on a connection; asyncpg, JDBC and PgBouncer-1.21+ setups prepare too) fail
    after the swap with "cached plan must not change result type".
    """
    preparer = conn.dialect.identifier_preparer
    items = plan.views
    rows = conn.execute(
        _RESULT_TYPES,
        {
            "labels": [item.name for item in items],
            "old": [preparer.format_table(sa.table(i.name, schema=i.schema)) for i in items],
            "new": [preparer.format_table(plan.staged(i)) for i in items],
        },
    )
    return [row.label for row in rows if list(row.old_columns) != list(row.new_columns)]


_SIZES = sa.text(
    """
    SELECT COALESCE(sum(pg_catalog.pg_total_relation_size(c.oid)), 0)::bigint
      FROM pg_catalog.pg_class c
     WHERE c.oid = ANY (ARRAY(SELECT pg_catalog.to_regclass(n)::pg_catalog.oid
                                FROM pg_catalog.unnest(CAST(:names AS text[])) AS n))
       AND c.relkind = 'm'
    """
)


def extra_disk_bytes(conn: Connection, plan: SwapPlan) -> int:
    """About how much disk the build needs on top of what the old views use: their size, with
    their indexes and TOAST.

    Read outside the build's transaction (``pg_total_relation_size`` takes a lock on each
    view for the duration of the statement).
    """
    preparer = conn.dialect.identifier_preparer
    names = [
        preparer.format_table(sa.table(i.name, schema=i.schema))
        for i in plan.views
        if i.materialized
    ]
    return int(conn.execute(_SIZES, {"names": names}).scalar_one())
