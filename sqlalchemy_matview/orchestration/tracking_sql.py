"""The SQL of change tracking's bookkeeping: tables, sequences and functions in one schema.

Built for a schema name (quoted by the caller with the dialect's identifier preparer) and
executed by :func:`~sqlalchemy_matview.orchestration.tracking.ensure_bookkeeping`.

Design (see ``docs/change-tracking.md``):

``views``
    one row per view the library knows: whether it is tracked, the tables it is tracked on
    (``regclass[]``: dumped as names, so a restore resolves them again), a random
    ``barrier_key`` (the barrier of bookkeeping 10 and before, which refreshes still take for
    writers running that version's function during an upgrade), and its last refresh.
``changes``
    the change log, keyed ``(view_id, txid)``: no sequence, nothing updated in place, so
    writers never wait on each other. A writer adds a row only where it finds none.
    Removing rows replaces the random value in the sequence ``epoch`` (a trigger).

Writers: the triggers pass ``(view id, payload)`` pairs as arguments, so the trigger
function trusts no OID. Each view has a *barrier key* and a *late key*, derived from its id and
a random secret kept in the sequence ``barrier_secret`` (readable only by the owner, so by
the SECURITY DEFINER trigger function and by refreshers; trigger arguments are readable by
every role). A writer takes the barrier *shared* without waiting. Got it: no refresh of that
view is between "taken its snapshot" and "committed", and any refresh that starts waits for
this transaction, so an existing mark covers this change too and the writer adds nothing;
only when there is none does it add a mark and notify (the fresh-to-stale transition), so a
busy table neither queues its writers on the server-wide NOTIFY lock nor writes a row per
transaction while the view is stale. Did not get it: a refresh is running (or waiting to)
and may not see this change, so the writer adds a mark of its own, and takes the late key
shared without waiting; holding it, it does not notify, because that refresh tries the late
key at its end and, finding it taken or marks left, notifies (once, for all of them). Only a
writer that cannot take the late key either (the refresh is in its last moments) notifies.

The refresh takes the barrier *exclusive* (bounded by ``lock_timeout``, 60 s when unset)
before taking its snapshot, deletes the marks that snapshot covers, then tries the late key
exclusive (without waiting), and reports ``refreshed_pending`` and notifies when marks remain. A
refresh that could not get the barrier (a writer held it past the timeout) or the late key
(a writer that wrote during the refresh is still open) still refreshes, adds a mark of its
own, reports ``refreshed_pending`` and notifies, so that another refresh follows and is not
skipped as fresh.

Writers that already found a view stale in this session skip even the index probe: a
token in a session setting names the epoch (a random value in a sequence, replaced by
every removal of marks) at which they saw the mark; see the comment above ``_MARK_STALE``.
Once any writer has found another transaction's committed mark, every writer skips the
function altogether: the triggers' WHEN clauses read the view's *flag* (a sequence only
the owner sets), and a refresh lowers it, then waits for the writers that read it raised
(they hold a lock on a source table); see ``_FLAGS``.

Every function but two has a pinned ``search_path`` (``pg_catalog, pg_temp``) and names
every function ``pg_catalog.``-qualified: ``mark_stale``, the triggers' hot path, runs
under the writer's search_path (a SET clause costs as much as the rest of it) and qualifies
every function, operator and type; ``refresh_job`` is a procedure that commits, which a SET
clause forbids. Only ``mark_stale`` and ``bump_epoch`` are ``SECURITY DEFINER``. EXECUTE is
revoked from PUBLIC: a trigger function is never called directly, and creating a trigger
with it needs EXECUTE, so nobody else can forge the arguments.
"""

from __future__ import annotations

import hashlib

from ..bookkeeping import (
    CHANGES_TABLE,
    CHANNEL,
    DEFAULT_HISTORY_KEEP,
    HISTORY_KEEP_SETTING,
    HISTORY_TABLE,
    TRIGGER_NAMES,
    TRIGGER_PARTITION,
    TRIGGER_ROW,
    TRIGGER_STATEMENT,
    TRIGGER_TRUNCATE,
    VIEWS_TABLE,
)

__all__ = [
    "ADVISORY_TIMEOUT_MARK",
    "EPOCH_SEQUENCE",
    "FLAG_PREFIX",
    "FUNCTIONS",
    "MARKER",
    "SECRET_SEQUENCE",
    "SETUP_LOCK_KEY",
    "function_signatures",
    "setup_statements",
    "token_prefix",
]

#: Starts the message of a refresh that timed out waiting for another refresher's lock.
ADVISORY_TIMEOUT_MARK = "lock timeout waiting for the refresh lock of"
#: Sequence in the bookkeeping schema holding the secret the barrier keys derive from.
SECRET_SEQUENCE = "barrier_secret"
#: Sequence holding a random value that every statement removing marks replaces (what
#: writers' tokens name).
EPOCH_SEQUENCE = "epoch"
#: Start of the name of each tracked view's flag: a sequence in the bookkeeping schema,
#: ``stale_<view id>``, that writers may read and only the owner may set (see _FLAGS).
FLAG_PREFIX = "stale_"
#: Comment on the schema naming the version of these definitions; a different one means
#: the functions are replaced.
MARKER = "sqlalchemy_matview bookkeeping 14"
# Serialises creation of the bookkeeping and trigger changes among concurrent create_all()
# calls: CREATE ... IF NOT EXISTS alone can still fail on the catalogs' unique indexes.
SETUP_LOCK_KEY = 0x73716C6D76737431  # "sqlmvst1"

#: name -> argument types, as ``to_regprocedure`` and ``REVOKE`` want them.
FUNCTIONS = {
    "mark_stale": "",
    "mark_views": "text[], boolean",
    "bump_epoch": "",
    "lower_flag": "integer",
    "refresh": "text, text, bigint, boolean, text, boolean",
    "track": "text, text, pg_catalog.regclass[]",
    "untrack": "text, text",
    "sync_triggers": "",
    "wanted_triggers": "",
    "check_triggers": "",
    "expand_sources": "pg_catalog.regclass[]",
    "record": "text, text, timestamp with time zone, double precision, text, boolean, text",
    "refresh_job": "text, text, bigint, boolean, text, boolean, text",
}


def function_signatures(schema: str) -> list[str]:
    """``schema.name(args)`` of every function (``schema`` already quoted)."""
    return [f"{schema}.{name}({args})" for name, args in FUNCTIONS.items()]


def token_prefix(raw_schema: str) -> str:
    """Start of the session settings holding writers' tokens, one per bookkeeping schema
    (a setting name allows no quoting: the schema is hashed into it)."""
    return "sqlalchemy_matview.m" + hashlib.md5(raw_schema.encode()).hexdigest()[:8] + "_"


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


# A random bigint from the server's strong random source (gen_random_uuid).
_RANDOM_BIGINT = (
    "('x' OPERATOR(pg_catalog.||) pg_catalog.substr(pg_catalog.md5("
    "pg_catalog.gen_random_uuid()::pg_catalog.text), 1, 16))::pg_catalog.bit(64)::pg_catalog.int8"
)


def _random_sequence(sequence: str) -> list[str]:
    """A sequence only its owner reads, holding a random value from the start."""
    return [
        f"CREATE SEQUENCE IF NOT EXISTS {sequence} AS bigint"
        " MINVALUE -9223372036854775808 MAXVALUE 9223372036854775807",
        f"REVOKE ALL ON SEQUENCE {sequence} FROM PUBLIC",
        f"SELECT pg_catalog.setval({_literal(sequence)}, {_RANDOM_BIGINT})"
        f" FROM {sequence} WHERE NOT is_called",
    ]


def _flagged(flag: str) -> str:
    """The value that says "stale, and a committed mark stands for it" in the flag
    ``flag`` (an expression of type regclass): the flag's own OID, so that a value
    ``pg_dump`` copied (it reads sequences after the snapshot of its tables, so a flag may
    be newer than the marks it dumped) means nothing in the restored database, whose flag
    has another OID. Kept this small on purpose: the WHEN clause that compares it is read
    from the catalog and planned again at every statement (valgrind: each node costs)."""
    return f"{flag}::pg_catalog.oid::pg_catalog.int8"


def _token_valid(arg: str, secret: str, epoch_lit: str, prefix_lit: str) -> str:
    """The hot path's test for the view whose id is ``arg``: its barrier taken shared, then
    the session's token for it equal to the one for the current epoch. The epoch is read
    after the barrier is held (AND evaluates in order): a refresh that consumed the mark
    before that has replaced it; one that has not cannot start before this commits."""
    return (
        "pg_catalog.pg_try_advisory_xact_lock_shared(pg_catalog.hashint4extended("
        f"{arg}::pg_catalog.int4, {secret}))"
        f" AND pg_catalog.current_setting({prefix_lit} OPERATOR(pg_catalog.||) {arg}, true)"
        " OPERATOR(pg_catalog.=) pg_catalog.md5(pg_catalog.pg_sequence_last_value("
        f"{epoch_lit}::pg_catalog.regclass)::pg_catalog.text"
        f" OPERATOR(pg_catalog.||) '/' OPERATOR(pg_catalog.||) {arg})"
    )


def setup_statements(schema: str, raw_schema: str) -> list[str]:
    """Create (or upgrade) everything in ``schema`` (already quoted; it exists);
    ``raw_schema`` is its name unquoted."""
    views = f"{schema}.{VIEWS_TABLE}"
    changes = f"{schema}.{CHANGES_TABLE}"
    history = f"{schema}.{HISTORY_TABLE}"
    secret = f"{schema}.{SECRET_SEQUENCE}"
    secret_lit = _literal(secret)
    epoch = f"{schema}.{EPOCH_SEQUENCE}"
    names = {
        "s": schema,
        "s_lit": _literal(raw_schema),
        "views": views,
        "changes": changes,
        "history": history,
        "keep_setting": HISTORY_KEEP_SETTING,
        "keep_default": DEFAULT_HISTORY_KEEP,
        "channel": CHANNEL,
        "secret": secret,
        "secret_lit": secret_lit,
        "epoch_lit": _literal(epoch),
        "random_bigint": _RANDOM_BIGINT,
        "flag_prefix": _literal(FLAG_PREFIX),
        "flagged": _flagged("flag"),
        "flagged_tpl": _literal(_flagged("FLAG")),
        "token_prefix": _literal(token_prefix(raw_schema)),
        # One view (the first pair) reads the secret inline: an expression fewer.
        "token_first": _token_valid(
            "TG_ARGV[0]",
            f"pg_catalog.pg_sequence_last_value({secret_lit}::pg_catalog.regclass)",
            _literal(epoch),
            _literal(token_prefix(raw_schema)),
        ),
        "token_each": _token_valid(
            "TG_ARGV[i]", "secret", _literal(epoch), _literal(token_prefix(raw_schema))
        ),
        "mark": ADVISORY_TIMEOUT_MARK,
        "setup_key": SETUP_LOCK_KEY,
        "t_stmt": TRIGGER_STATEMENT,
        "t_row": TRIGGER_ROW,
        "t_trunc": TRIGGER_TRUNCATE,
        "t_part": TRIGGER_PARTITION,
        "t_all": ", ".join(f"'{n}'" for n in TRIGGER_NAMES),
    }
    statements = [
        f"CREATE TABLE IF NOT EXISTS {views} ("
        " id integer GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,"
        " view_schema text NOT NULL,"
        " view_name text NOT NULL,"
        " tracked boolean NOT NULL DEFAULT false,"
        " sources pg_catalog.regclass[] NOT NULL DEFAULT '{}',"
        " barrier_key bigint,"
        " last_refreshed_at timestamptz,"
        " last_duration double precision,"
        " last_concurrently boolean,"
        " refresh_count bigint NOT NULL DEFAULT 0,"
        " UNIQUE (view_schema, view_name))",
        f"CREATE TABLE IF NOT EXISTS {changes} ("
        " view_id integer NOT NULL,"
        # bigint rather than xid8: tools that reflect every table know bigint; a 64-bit
        # transaction id fits, and is cast back to xid8 when compared.
        " txid bigint NOT NULL,"
        " changed_at timestamptz NOT NULL DEFAULT pg_catalog.now(),"
        " PRIMARY KEY (view_id, txid))",
        f"CREATE TABLE IF NOT EXISTS {history} ("
        " id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,"
        " view_schema text NOT NULL,"
        " view_name text NOT NULL,"
        " started_at timestamptz NOT NULL,"
        " duration double precision,"
        " status text NOT NULL,"
        " concurrent_refresh boolean,"
        " error text,"
        " row_estimate bigint)",
        f"CREATE INDEX IF NOT EXISTS history_view ON {history} (view_schema, view_name, id)",
        # The barrier keys' secret (see _MARK_STALE): random once, kept by dump and restore.
        *_random_sequence(secret),
        *_random_sequence(epoch),
        _RECORD.format(**names),
        _MARK_VIEWS.format(**names),
        _MARK_STALE.format(**names),
        _LOWER_FLAG.format(**names),
        _BUMP_EPOCH.format(**names),
        f"DROP TRIGGER IF EXISTS bump_epoch ON {changes}",
        f"CREATE TRIGGER bump_epoch AFTER DELETE ON {changes} REFERENCING OLD TABLE AS gone"
        f" FOR EACH STATEMENT EXECUTE FUNCTION {schema}.bump_epoch()",
        f"ALTER TABLE {changes} ENABLE ALWAYS TRIGGER bump_epoch",
        # A transition table cannot be had for TRUNCATE: a trigger of its own.
        f"DROP TRIGGER IF EXISTS bump_epoch_truncate ON {changes}",
        f"CREATE TRIGGER bump_epoch_truncate AFTER TRUNCATE ON {changes}"
        f" FOR EACH STATEMENT EXECUTE FUNCTION {schema}.bump_epoch()",
        f"ALTER TABLE {changes} ENABLE ALWAYS TRIGGER bump_epoch_truncate",
        _REFRESH.format(**names),
        _REFRESH_JOB.format(**names),
        # Its result columns changed across versions: CREATE OR REPLACE cannot do that.
        f"DROP FUNCTION IF EXISTS {schema}.wanted_triggers()",
        _WANTED_TRIGGERS.format(**names),
        _SYNC_TRIGGERS.format(**names),
        _CHECK.format(**names),
        _EXPAND.format(**names),
        _TRACK.format(**names),
        _UNTRACK.format(**names),
        # Triggers of an earlier version get this version's guards (and views their flags).
        f"SELECT {schema}.sync_triggers()",
    ]
    statements += [
        # ROUTINE: refresh_job is a procedure, which ON FUNCTION does not name.
        f"REVOKE ALL ON ROUTINE {sig} FROM PUBLIC"
        for sig in function_signatures(schema)
    ]
    statements.append(f"COMMENT ON SCHEMA {schema} IS '{MARKER}'")
    return statements


# _FLAGS: the hottest path never calls a function. Each tracked view has a flag, the
# sequence stale_<view id> in the bookkeeping schema: every role may read it (SELECT), only
# the owner set it. Raised (set to _flagged's value) by mark_views when, holding the
# barrier, it finds a mark that another transaction committed; lowered (0) by every
# statement that removes marks of the view (bump_epoch) and by a refresh as soon as it
# holds the barrier. The statement trigger's WHEN clause reads the flags of its views, and
# calls mark_stale only when one is not raised; the row triggers' WHEN clauses too, after
# their transaction-local setting. Sequences are read and set outside transactions, so:
# - raised means a committed mark exists that nothing has removed since (removal lowers
#   it first; raising happens under the barrier, so no refresh is between taking the
#   barrier and committing; a mark another role deletes by hand is not covered);
# - a writer that read the flag raised holds a lock on the source table (taken when its
#   statement started, before its triggers): the refresh, after lowering the flag, waits
#   until every transaction holding such a lock has ended, then takes its snapshot. Those
#   that read it lowered call mark_stale, which finds the barrier taken (the late path).
# A writer cannot raise a flag (no UPDATE on it), so it cannot opt out of marking; the
# barrier key stays a secret. A value copied by pg_dump or replicated to a standby is void
# there (salted with the flag's OID and the server's start time).
#
# Pairs (view id, payload) in TG_ARGV. The hot path (a writing statement on a table whose
# view is already stale, in a session that has seen it stale since the last refresh) is
# one shared advisory lock, two sequence reads, a setting read and an MD5, with no query,
# in a single expression: measured with valgrind on a single-user backend (one statement
# per transaction), an SPI query, a SET search_path clause, and every further PL/pgSQL
# expression (set up again in each transaction) each cost a good part of the row's INSERT
# itself. So mark_stale has no SET clause: it is SECURITY DEFINER and runs under the
# writer's search_path, so every function, operator and type in it is pg_catalog-qualified
# (and pg_temp, searched first for types, is never named without it). Everything else is
# in mark_views, whose search_path is pinned.
#
# Tokens: once a transaction has found another's mark of a view (or added one: then for
# the rest of that transaction only, so that its next one comes back, finds the mark
# committed and raises the flag) while holding its
# barrier, it sets a session setting to md5(epoch/view id), the epoch being a random
# bigint in a sequence only the owner reads, replaced (trigger bump_epoch) by every
# statement that removes marks, before its transaction commits. A later statement of the
# session holding the barrier and reading the same epoch knows that the mark is still
# there, without looking: no refresh consumed it, and none can start before this
# transaction ends. Settings are rolled back with the transaction that set them (its mark
# with them). A session can set the setting itself, but not compute a valid value without
# the epoch, and a value it saw names an epoch that does not come back (64 random bits).
# Reading the epoch only after taking the barrier matters: read before, a refresh could
# consume the mark and commit in between.
#
# Barrier keys: hashint4extended(view id, secret), the secret a random bigint kept in a
# sequence of the bookkeeping schema that only its owner (so this SECURITY DEFINER function)
# may read; pg_sequence_last_value() reads it without running a query. Trigger arguments
# are readable by every role, and a role that knew a key could hold it; the secret is never
# in them. The late key (below) is derived from minus the view id.
#
# Holding the barrier shared, a READ COMMITTED writer that sees a committed mark of the
# view adds nothing: any refresh that will consume that mark waits for this transaction
# (the barrier) before taking its snapshot, so it sees this change too. The stale steady
# state then writes no row and no WAL. Under REPEATABLE READ / SERIALIZABLE the
# statement's snapshot may still show marks a refresh has deleted since: always add a mark
# and notify.
#
# Barrier busy (a refresh holds it, or waits for it): this change may be missed by that
# refresh. The writer adds a mark of its own, and takes the view's late key shared without
# waiting. Got it, and the barrier is still busy: that refresh has not reached its end yet
# (at its end it tries the late key exclusive, which it holds from then until it commits,
# so this writer could not have taken it shared after that), so it will find the late key
# taken by this transaction, count the view as still stale, leave a mark of its own (this
# writer's may not be committed yet) and notify, once for all such writers: this one does
# not notify. Got it and the barrier is free now (the refresh ended in between), or did not
# get the late key (the refresh is in its last moments): notify. A late writer that sees no
# mark at all notifies too: a refresh of a stale view leaves its marks visible until it
# commits, so this may be a barrier held by some other role (one that read the key in
# pg_locks), with no refresh to notify at its end.
#
# Row-level firings (partitions, replication apply) do the work once per transaction and
# set of views: a transaction-local setting named after the views records it, and the
# trigger's WHEN clause reads it, so further rows do not even call the function. They are
# BEFORE triggers because the WHEN clause of an AFTER trigger is evaluated when the event
# is queued, before any of them ran. (A row that a later BEFORE trigger skips still marks
# the view: one needless refresh at worst.) A session can forge that setting and skip
# marking for row-level firings (documented); statement-level firings never trust it.
# The first row of a transaction takes the token's hot path like a statement does.
#
# A mark is only added for a view the bookkeeping still tracks (a trigger left behind marks
# nothing); that check is on the rare path, where a row is added anyway.
_MARK_STALE = """
CREATE OR REPLACE FUNCTION {s}.mark_stale() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER AS $body$
DECLARE
    secret pg_catalog.int8;
    i pg_catalog.int4;
    seen pg_catalog.text;
BEGIN
    -- One view (the common case) in one expression: PL/pgSQL sets up every expression
    -- again in each transaction, and a writing transaction is often one statement.
    IF TG_NARGS OPERATOR(pg_catalog.=) 2
       AND {token_first}
    THEN
        IF TG_LEVEL OPERATOR(pg_catalog.=) 'STATEMENT' THEN
            RETURN NULL;
        END IF;
        seen := 'sqlalchemy_matview.v' OPERATOR(pg_catalog.||) TG_ARGV[0];
    ELSE
        secret := pg_catalog.pg_sequence_last_value({secret_lit}::pg_catalog.regclass);
        i := 0;
        seen := 'sqlalchemy_matview.v';
        WHILE i OPERATOR(pg_catalog.<) TG_NARGS LOOP
            IF ({token_each}) IS NOT TRUE THEN
                PERFORM {s}.mark_views(TG_ARGV, TG_LEVEL OPERATOR(pg_catalog.=) 'ROW');
                seen := NULL;
                EXIT;
            END IF;
            seen := pg_catalog.concat(
                seen, CASE WHEN i OPERATOR(pg_catalog.>) 0 THEN '_' END, TG_ARGV[i]);
            i := i OPERATOR(pg_catalog.+) 2;
        END LOOP;
        IF TG_LEVEL OPERATOR(pg_catalog.=) 'STATEMENT' THEN
            RETURN NULL;
        END IF;
    END IF;
    IF seen IS NOT NULL THEN
        -- What mark_views records too: the trigger's WHEN clause spares further rows.
        PERFORM pg_catalog.set_config(
            seen, pg_catalog.pg_current_xact_id()::pg_catalog.text, true);
    END IF;
    -- Row-level triggers fire BEFORE (see wanted_triggers): the row goes on unchanged.
    IF TG_OP OPERATOR(pg_catalog.=) 'DELETE' THEN
        RETURN OLD;
    END IF;
    RETURN NEW;
END $body$
"""

# The work behind mark_stale, for row-level firings and for statements without a valid
# token: called only by mark_stale (EXECUTE is the owner's alone), so with its privileges.
_MARK_VIEWS = """
CREATE OR REPLACE FUNCTION {s}.mark_views(args text[], row_level boolean) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $body$
DECLARE
    i integer := pg_catalog.array_lower(args, 1);
    last integer := pg_catalog.array_upper(args, 1);
    vid integer;
    late boolean := false;
    known boolean;
    seen text;
    epoch bigint;
    flag regclass;
    secret bigint := pg_catalog.pg_sequence_last_value({secret_lit}::pg_catalog.regclass);
BEGIN
    IF row_level THEN
        -- Named after the views (the trigger's WHEN clause reads the same setting, and
        -- spares the call for every further row of the transaction).
        seen := 'sqlalchemy_matview.v';
        WHILE i < last LOOP
            seen := seen || CASE WHEN i > pg_catalog.array_lower(args, 1) THEN '_' ELSE '' END
                    || args[i];
            i := i + 2;
        END LOOP;
        i := pg_catalog.array_lower(args, 1);
        IF pg_catalog.current_setting(seen, true)
           = pg_catalog.pg_current_xact_id()::text THEN
            RETURN;
        END IF;
    END IF;
    WHILE i < last LOOP
        vid := args[i];
        IF pg_catalog.pg_try_advisory_xact_lock_shared(pg_catalog.hashint4extended(vid, secret))
        THEN
            -- Read before the probe: a token says "a mark existed at this epoch or later".
            epoch := pg_catalog.pg_sequence_last_value({epoch_lit}::pg_catalog.regclass);
            -- Another transaction's mark, so a committed one (READ COMMITTED): it stays
            -- until a refresh removes it, which lowers the flag first (see refresh).
            PERFORM FROM {changes} c
             WHERE c.view_id = vid
               AND c.txid <> COALESCE(
                       pg_catalog.pg_current_xact_id_if_assigned()::text::bigint, -1)
             LIMIT 1;
            known := FOUND
                     AND pg_catalog.current_setting('transaction_isolation') = 'read committed';
            IF known THEN
                flag := pg_catalog.to_regclass(pg_catalog.quote_ident({s_lit}) || '.'
                                               || pg_catalog.quote_ident({flag_prefix} || vid));
                IF flag IS NOT NULL
                   AND pg_catalog.pg_sequence_last_value(flag) IS DISTINCT FROM {flagged} THEN
                    PERFORM pg_catalog.setval(flag, {flagged});
                END IF;
                -- Session-wide: rolled back with the transaction (its mark too).
                PERFORM pg_catalog.set_config({token_prefix} || vid,
                    pg_catalog.md5(epoch::text || '/' || vid), false);
            ELSE
                -- This transaction's own mark (found or added) serves its token only until
                -- it ends: its next transaction comes back here, finds the mark committed
                -- and raises the flag.
                INSERT INTO {changes} (view_id, txid)
                    SELECT vid, pg_catalog.pg_current_xact_id()::text::bigint
                     WHERE EXISTS (SELECT FROM {views} v WHERE v.id = vid AND v.tracked)
                    ON CONFLICT DO NOTHING;
                IF FOUND THEN
                    PERFORM pg_catalog.pg_notify('{channel}', args[i + 1]);
                END IF;
                IF pg_catalog.current_setting('transaction_isolation') = 'read committed'
                   AND EXISTS (SELECT FROM {changes} c
                                WHERE c.view_id = vid
                                  AND c.txid = pg_catalog.pg_current_xact_id()::text::bigint)
                THEN
                    PERFORM pg_catalog.set_config({token_prefix} || vid,
                        pg_catalog.md5(epoch::text || '/' || vid), true);
                END IF;
            END IF;
        ELSE
            -- Late: the late key taken, and the barrier still busy (not just freed by the
            -- refresh ending in between, which takes the notifying path).
            late := pg_catalog.pg_try_advisory_xact_lock_shared(
                        pg_catalog.hashint4extended(-vid, secret))
                    AND NOT pg_catalog.pg_try_advisory_xact_lock_shared(
                        pg_catalog.hashint4extended(vid, secret));
            IF late THEN
                -- No mark at all: not the refresh's doing (it consumes marks), so maybe no
                -- refresh is running and another role holds the barrier: notify anyway.
                PERFORM FROM {changes} c WHERE c.view_id = vid LIMIT 1;
                late := FOUND;
            END IF;
            INSERT INTO {changes} (view_id, txid)
                SELECT vid, pg_catalog.pg_current_xact_id()::text::bigint
                 WHERE EXISTS (SELECT FROM {views} v WHERE v.id = vid AND v.tracked)
                ON CONFLICT DO NOTHING;
            IF FOUND AND NOT late THEN
                PERFORM pg_catalog.pg_notify('{channel}', args[i + 1]);
            END IF;
        END IF;
        i := i + 2;
    END LOOP;
    IF row_level THEN
        PERFORM pg_catalog.set_config(seen, pg_catalog.pg_current_xact_id()::text, true);
    END IF;
END $body$
"""

# Any statement that removes marks replaces the epoch, before its transaction commits:
# every token is then void (a refresh of one view costs every session one slow statement
# per view it writes to); and it lowers the flags of the views whose marks it removed (all
# of them for TRUNCATE). ALWAYS: it must fire in replica mode too.
_BUMP_EPOCH = """
CREATE OR REPLACE FUNCTION {s}.bump_epoch() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $body$
BEGIN
    PERFORM pg_catalog.setval({epoch_lit}::pg_catalog.regclass, {random_bigint});
    IF TG_OP = 'TRUNCATE' THEN
        PERFORM pg_catalog.setval(c.oid, 0)
           FROM pg_catalog.pg_class c
          WHERE c.relnamespace = pg_catalog.to_regnamespace(pg_catalog.quote_ident({s_lit}))
            AND c.relkind = 'S' AND pg_catalog.starts_with(c.relname, {flag_prefix});
    ELSE
        PERFORM {s}.lower_flag(g.view_id) FROM (SELECT DISTINCT gone.view_id FROM gone) AS g;
    END IF;
    RETURN NULL;
END $body$
"""

# SECURITY DEFINER so that a refresher needs no privilege on the flags (created per view);
# lowering a flag is always safe (writers merely call mark_stale). False: no flag.
_LOWER_FLAG = """
CREATE OR REPLACE FUNCTION {s}.lower_flag(vid integer) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $body$
DECLARE
    flag regclass := pg_catalog.to_regclass(pg_catalog.quote_ident({s_lit}) || '.'
                                            || pg_catalog.quote_ident({flag_prefix} || vid));
BEGIN
    IF flag IS NULL THEN
        RETURN false;
    END IF;
    PERFORM pg_catalog.setval(flag, 0);
    RETURN true;
END $body$
"""

# Not SECURITY DEFINER: only the view's owner may refresh it, so the refresh runs with
# the caller's privileges (which must include the bookkeeping tables). Names arrive as
# arguments and reach SQL only through quote_ident(); no percent sign anywhere, since a
# pyformat driver would take it for a placeholder.
# One history row, then the view's rows beyond the newest N go (N from a setting, so that a
# DBA can change it per database without a release). The row estimate is the planner's, as
# of the view's last ANALYZE / autovacuum: counting rows would cost a scan.
_RECORD = """
CREATE OR REPLACE FUNCTION {s}.record(
    target_schema text, target_name text, started timestamptz, spent double precision,
    outcome text, was_concurrent boolean, failure text)
RETURNS void LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $body$
DECLARE
    -- A setting that is not a plain number is ignored rather than failing every refresh.
    setting text := pg_catalog.current_setting('{keep_setting}', true);
    keep integer := {keep_default};
    estimate bigint;
BEGIN
    IF setting OPERATOR(pg_catalog.~) '^[0-9]+$' AND pg_catalog.length(setting) < 10 THEN
        keep := setting::integer;
    END IF;
    SELECT CASE WHEN c.reltuples < 0 THEN NULL ELSE c.reltuples::bigint END INTO estimate
      FROM pg_catalog.pg_class c
     WHERE c.oid = pg_catalog.to_regclass(pg_catalog.quote_ident(target_schema) || '.'
                                          || pg_catalog.quote_ident(target_name));
    INSERT INTO {history} (view_schema, view_name, started_at, duration, status,
                           concurrent_refresh, error, row_estimate)
    VALUES (target_schema, target_name, started, spent, outcome, was_concurrent, failure,
            estimate);
    DELETE FROM {history} h
     WHERE h.view_schema = target_schema AND h.view_name = target_name
       AND h.id <= (SELECT o.id FROM {history} o
                     WHERE o.view_schema = target_schema AND o.view_name = target_name
                     ORDER BY o.id DESC OFFSET GREATEST(keep, 1) LIMIT 1);
END
$body$
"""

# What a pg_cron job CALLs: refresh(), and when it fails, a history row that must outlive the
# failed transaction: the error is caught, recorded and committed, then raised again so that
# pg_cron still marks the run failed. A procedure with a SET clause cannot COMMIT, so its
# search_path is not pinned: everything in it is qualified instead, operators included.
# CALL returns the refresh's status (the INOUT parameter), as refresh() does.
_REFRESH_JOB = """
CREATE OR REPLACE PROCEDURE {s}.refresh_job(
    target_schema pg_catalog.text, target_name pg_catalog.text, lock_key pg_catalog.int8,
    refresh_concurrently pg_catalog.bool DEFAULT false,
    lock_mode pg_catalog.text DEFAULT 'skip', only_if_stale pg_catalog.bool DEFAULT false,
    INOUT status pg_catalog.text DEFAULT NULL)
LANGUAGE plpgsql AS $body$
DECLARE
    started pg_catalog.timestamptz := pg_catalog.clock_timestamp();
    failure pg_catalog.text;
    code pg_catalog.text;
BEGIN
    BEGIN
        status := {s}.refresh(target_schema, target_name, lock_key, refresh_concurrently,
                              lock_mode, only_if_stale);
    EXCEPTION WHEN OTHERS THEN
        GET STACKED DIAGNOSTICS failure = MESSAGE_TEXT, code = RETURNED_SQLSTATE;
    END;
    IF failure IS NULL THEN
        RETURN;
    END IF;
    PERFORM {s}.record(target_schema, target_name, started,
                       pg_catalog.date_part('epoch', pg_catalog.clock_timestamp()
                                            OPERATOR(pg_catalog.-) started),
                       'failed', refresh_concurrently, failure);
    COMMIT;
    RAISE EXCEPTION USING MESSAGE = failure, ERRCODE = code;
END
$body$
"""

_REFRESH = """
CREATE OR REPLACE FUNCTION {s}.refresh(
    target_schema text, target_name text, lock_key bigint,
    refresh_concurrently boolean DEFAULT false, lock_mode text DEFAULT 'skip',
    only_if_stale boolean DEFAULT false)
RETURNS text LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $body$
DECLARE
    target text := pg_catalog.quote_ident(target_schema) || '.'
                   || pg_catalog.quote_ident(target_name);
    target_oid oid;
    vid integer;
    barrier bigint;
    saved_timeout text;
    degraded boolean := false;
    carried boolean := false;
    secret bigint;
    pending boolean;
    view_snapshot pg_catalog.pg_snapshot;
    started timestamptz;
    spent double precision;
    dep_schemas text[];
    dep_names text[];
    inc_status text;
    flagged boolean;
    deadline timestamptz;
    tree oid[];
    writers text[];
    -- An incremental view (a table kept per bucket) has a refresh function of its own,
    -- named after the MD5 of its name (sqlalchemy_matview.incremental.names_for).
    incremental text := pg_catalog.quote_ident({s_lit}) || '.' || pg_catalog.quote_ident(
        'inc_' || pg_catalog.left(pg_catalog.md5(target_schema || '.' || target_name), 12)
        || '_refresh');
BEGIN
    IF pg_catalog.to_regprocedure(
           incremental || '(bigint, text, boolean, double precision)') IS NOT NULL THEN
        EXECUTE 'SELECT r.status FROM ' || incremental || '($1, $2, $3, NULL) AS r'
           INTO STRICT inc_status USING lock_key, lock_mode, only_if_stale;
        RETURN inc_status;
    END IF;
    IF lock_mode = 'skip' THEN
        IF NOT pg_catalog.pg_try_advisory_xact_lock(lock_key) THEN
            RETURN 'skipped_locked';
        END IF;
    ELSIF lock_mode = 'wait' THEN
        BEGIN
            PERFORM pg_catalog.pg_advisory_xact_lock(lock_key);
        EXCEPTION WHEN lock_not_available THEN
            -- Tells the caller the wait for another refresher timed out, not the REFRESH.
            RAISE EXCEPTION USING ERRCODE = 'lock_not_available',
                MESSAGE = '{mark} ' || target,
                HINT = 'another process is refreshing it; raise lock_timeout or skip it';
        END;
    ELSIF lock_mode IS DISTINCT FROM 'none' THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = 'lock_mode ' || pg_catalog.quote_nullable(lock_mode)
                      || ': pass skip, wait or none';
    END IF;
    SELECT v.id, v.barrier_key INTO vid, barrier
      FROM {views} v WHERE v.view_schema = target_schema AND v.view_name = target_name;
    -- Checked under the lock: another process may have refreshed it a moment ago.
    IF only_if_stale AND (vid IS NULL
                          OR NOT EXISTS (SELECT 1 FROM {changes} c WHERE c.view_id = vid)) THEN
        RETURN 'skipped_fresh';
    END IF;
    IF barrier IS NOT NULL THEN
        -- Waits for the writers that may not be visible to a snapshot taken now.
        saved_timeout := pg_catalog.current_setting('lock_timeout');
        IF saved_timeout = '0' THEN
            PERFORM pg_catalog.set_config('lock_timeout', '60s', true);
        END IF;
        secret := pg_catalog.pg_sequence_last_value({secret_lit}::pg_catalog.regclass);
        BEGIN
            PERFORM pg_catalog.pg_advisory_xact_lock(pg_catalog.hashint4extended(vid, secret));
            -- The key of bookkeeping 10 and before, which writers still running the
            -- function of that version hold (an upgrade while they write).
            PERFORM pg_catalog.pg_advisory_xact_lock(barrier);
        EXCEPTION WHEN lock_not_available THEN
            degraded := true;
        END;
        PERFORM pg_catalog.set_config('lock_timeout', saved_timeout, true);
        -- Writers that skipped mark_stale on the view's flag (the triggers' WHEN clause)
        -- hold no barrier. Lowered, later ones call it and find the barrier taken; those
        -- already past the flag hold a lock on a source table, taken before they read it:
        -- wait for them too, as for the barrier (same timeout). Polled: a transaction
        -- cannot be waited for by its id from SQL.
        flagged := {s}.lower_flag(vid);
        -- (A refresh that could not take the barrier leaves a mark and notifies instead.)
        IF flagged AND NOT degraded THEN
            deadline := pg_catalog.clock_timestamp() + CASE
                WHEN saved_timeout = '0' THEN '60s'::interval ELSE saved_timeout::interval END;
            tree := ARRAY(
                WITH RECURSIVE t(rel) AS (
                    SELECT s.rel::oid FROM {views} v, pg_catalog.unnest(v.sources) AS s(rel)
                     WHERE v.id = vid
                  UNION
                    SELECT i.inhrelid FROM t JOIN pg_catalog.pg_inherits i ON i.inhparent = t.rel
                ) SELECT t.rel FROM t);
            writers := NULL;
            LOOP
                writers := ARRAY(
                    SELECT DISTINCT l.virtualtransaction FROM pg_catalog.pg_locks l
                     WHERE l.locktype = 'relation' AND l.mode = 'RowExclusiveLock'
                       AND l.granted AND l.relation = ANY (tree)
                       AND l.database = (SELECT d.oid FROM pg_catalog.pg_database d
                                          WHERE d.datname = pg_catalog.current_database())
                       AND l.pid IS DISTINCT FROM pg_catalog.pg_backend_pid()
                       AND (writers IS NULL OR l.virtualtransaction = ANY (writers)));
                EXIT WHEN pg_catalog.cardinality(writers) = 0;
                IF pg_catalog.clock_timestamp() > deadline THEN
                    degraded := true;
                    EXIT;
                END IF;
                PERFORM pg_catalog.pg_sleep(0.001);
            END LOOP;
        END IF;
        -- Under REPEATABLE READ / SERIALIZABLE the snapshot was taken before the barrier:
        -- a writer that committed meanwhile, relying on a mark this refresh consumes, is
        -- not in it. As good as not having the barrier.
        IF pg_catalog.current_setting('transaction_isolation') <> 'read committed' THEN
            degraded := true;
        END IF;
    END IF;
    -- Taken before the REFRESH, whose own snapshot is later and so sees at least as much:
    -- every change visible here is in the refreshed data.
    view_snapshot := pg_catalog.pg_current_snapshot();
    started := pg_catalog.clock_timestamp();
    IF refresh_concurrently THEN
        EXECUTE 'REFRESH MATERIALIZED VIEW CONCURRENTLY ' || target;
    ELSE
        EXECUTE 'REFRESH MATERIALIZED VIEW ' || target;
    END IF;
    spent := pg_catalog.date_part('epoch', pg_catalog.clock_timestamp() - started);
    target_oid := pg_catalog.to_regclass(target);
    IF vid IS NULL THEN
        INSERT INTO {views} (view_schema, view_name) VALUES (target_schema, target_name)
            ON CONFLICT (view_schema, view_name) DO NOTHING;
        SELECT v.id INTO vid FROM {views} v
         WHERE v.view_schema = target_schema AND v.view_name = target_name;
    END IF;
    -- Consumed: what the snapshot saw, this transaction's own marks, and marks no
    -- committed transaction of this cluster can have made (txid at or past the current
    -- snapshot's xmax: restored from another cluster, they would never become visible).
    DELETE FROM {changes} c
     WHERE c.view_id = vid
       AND (pg_catalog.pg_visible_in_snapshot(c.txid::text::xid8, view_snapshot)
            OR c.txid = pg_catalog.pg_current_xact_id()::text::bigint
            OR c.txid >= pg_catalog.pg_snapshot_xmax(
                             pg_catalog.pg_current_snapshot())::text::bigint);
    -- Writers that found the barrier taken and did not notify hold the late key shared
    -- until they commit (see mark_stale). None left: the check below sees all their marks.
    -- Some still running: never wait for them (the view is locked meanwhile, and one may be
    -- waiting to read it: a deadlock), count them as pending instead. Holding the late key
    -- exclusive from here on is brief, and the writers that cannot take it notify.
    IF barrier IS NOT NULL
       AND NOT pg_catalog.pg_try_advisory_xact_lock(pg_catalog.hashint4extended(-vid, secret))
    THEN
        carried := true;
    END IF;
    IF degraded OR carried THEN
        -- Writers this refresh may have missed are still running, and may have added no
        -- mark (a mark it just consumed covered them): a mark of its own keeps the view
        -- stale, so the refresh its notification causes is not skipped as fresh.
        INSERT INTO {changes} (view_id, txid)
            VALUES (vid, pg_catalog.pg_current_xact_id()::text::bigint) ON CONFLICT DO NOTHING;
    END IF;
    -- Left: changes committed while the refresh ran. Their writers did not notify (those
    -- that could not take the late key did): this does, once.
    pending := EXISTS (SELECT 1 FROM {changes} c WHERE c.view_id = vid);
    IF pending THEN
        PERFORM pg_catalog.pg_notify('{channel}', target_schema || '.' || target_name);
    END IF;
    PERFORM {s}.record(target_schema, target_name, started, spent, 'refreshed',
                       refresh_concurrently, NULL);
    UPDATE {views}
       SET last_refreshed_at = pg_catalog.clock_timestamp(),
           last_duration = spent,
           last_concurrently = refresh_concurrently,
           refresh_count = refresh_count + 1
     WHERE id = vid;
    -- The materialized views reading this one, directly or through plain views only.
    SELECT pg_catalog.array_agg(deps.nspname ORDER BY deps.nspname, deps.relname),
           pg_catalog.array_agg(deps.relname ORDER BY deps.nspname, deps.relname)
      INTO dep_schemas, dep_names
      FROM (WITH RECURSIVE readers(oid, relkind) AS (
                SELECT r.ev_class, c.relkind
                  FROM pg_catalog.pg_depend d
                  JOIN pg_catalog.pg_rewrite r ON r.oid = d.objid
                  JOIN pg_catalog.pg_class c ON c.oid = r.ev_class
                 WHERE d.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass
                   AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass
                   AND d.deptype = 'n' AND d.refobjid = target_oid
                   AND r.ev_class <> target_oid
              UNION
                SELECT r.ev_class, c.relkind
                  FROM readers
                  JOIN pg_catalog.pg_depend d ON d.refobjid = readers.oid
                  JOIN pg_catalog.pg_rewrite r ON r.oid = d.objid
                  JOIN pg_catalog.pg_class c ON c.oid = r.ev_class
                 WHERE readers.relkind = 'v'
                   AND d.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass
                   AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass
                   AND d.deptype = 'n' AND r.ev_class <> readers.oid)
            SELECT DISTINCT n.nspname::text AS nspname, c.relname::text AS relname
              FROM readers
              JOIN pg_catalog.pg_class c ON c.oid = readers.oid
              JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
             WHERE readers.relkind = 'm' AND readers.oid <> target_oid) AS deps;
    IF dep_names IS NOT NULL THEN
        INSERT INTO {views} (view_schema, view_name)
            SELECT d.sch, d.nam FROM ROWS FROM (pg_catalog.unnest(dep_schemas),
                                     pg_catalog.unnest(dep_names))
                 AS d(sch, nam)
            ON CONFLICT (view_schema, view_name) DO NOTHING;
        INSERT INTO {changes} (view_id, txid)
            SELECT v.id, pg_catalog.pg_current_xact_id()::text::bigint
              FROM {views} v
              JOIN ROWS FROM (pg_catalog.unnest(dep_schemas),
                                     pg_catalog.unnest(dep_names))
                 AS d(sch, nam)
                ON v.view_schema = d.sch AND v.view_name = d.nam
            ON CONFLICT DO NOTHING;
        PERFORM pg_catalog.pg_notify('{channel}', d.sch || '.' || d.nam)
           FROM ROWS FROM (pg_catalog.unnest(dep_schemas),
                                     pg_catalog.unnest(dep_names))
                 AS d(sch, nam);
    END IF;
    IF pending THEN
        RETURN 'refreshed_pending';
    END IF;
    RETURN 'refreshed';
END
$body$
"""

_WANTED_TRIGGERS = """
CREATE OR REPLACE FUNCTION {s}.wanted_triggers()
RETURNS TABLE (relid oid, tgname name, args bytea, arglist text, enabled "char",
               events text, level text, view_ids integer[], guard text)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $body$
    WITH RECURSIVE src AS (
        SELECT DISTINCT v.id, v.barrier_key,
               v.view_schema || '.' || v.view_name AS payload, s.rel::oid AS root
          FROM {views} v, pg_catalog.unnest(v.sources) AS s(rel)
         WHERE v.tracked AND v.barrier_key IS NOT NULL
    ), tree(id, barrier_key, payload, root, relid) AS (
        SELECT src.id, src.barrier_key, src.payload, src.root, src.root FROM src
      UNION
        SELECT tree.id, tree.barrier_key, tree.payload, tree.root, i.inhrelid
          FROM tree JOIN pg_catalog.pg_inherits i ON i.inhparent = tree.relid
    ), members AS (
        SELECT tree.*, c.relkind AS kind, rc.relkind AS root_kind
          FROM tree
          JOIN pg_catalog.pg_class c ON c.oid = tree.relid
          JOIN pg_catalog.pg_class rc ON rc.oid = tree.root
         WHERE c.relkind IN ('r', 'p')
    ), wanted AS (
        SELECT DISTINCT m.id, m.barrier_key, m.payload, m.relid, t.tgname, t.enabled,
               t.events, t.level
          FROM members m,
          LATERAL (VALUES
              ('{t_stmt}', 'O', 'AFTER INSERT OR UPDATE OR DELETE', 'STATEMENT'),
              ('{t_row}', 'R', 'BEFORE INSERT OR UPDATE OR DELETE', 'ROW'),
              ('{t_trunc}', 'A', 'AFTER TRUNCATE', 'STATEMENT'),
              ('{t_part}', 'A', 'BEFORE INSERT OR UPDATE OR DELETE', 'ROW')
          ) AS t(tgname, enabled, events, level)
         WHERE (m.root_kind = 'r' AND m.kind = 'r' AND t.tgname <> '{t_part}')
            OR (m.root_kind = 'p' AND t.tgname = '{t_trunc}')
            OR (m.root_kind = 'p' AND m.relid = m.root AND t.tgname = '{t_part}')
    ), flags AS (
        -- Each view's flag raised: its writers need not call mark_stale (see _FLAGS).
        SELECT f.id, 'pg_catalog.pg_sequence_last_value(' || f.lit
                     || ') IS DISTINCT FROM '
                     || pg_catalog.replace({flagged_tpl}, 'FLAG', f.lit) AS test
          FROM (SELECT DISTINCT src.id,
                       pg_catalog.quote_literal(pg_catalog.quote_ident({s_lit}) || '.'
                           || pg_catalog.quote_ident({flag_prefix} || src.id))
                       || '::pg_catalog.regclass' AS lit
                  FROM src) AS f
    )
    SELECT w.relid, w.tgname::name,
           pg_catalog.string_agg(pg_catalog.convert_to(a.val, 'UTF8') || '\\x00'::bytea,
                                 ''::bytea ORDER BY w.id, a.ord),
           pg_catalog.string_agg(pg_catalog.quote_literal(a.val), ', ' ORDER BY w.id, a.ord),
           pg_catalog.min(w.enabled)::"char", pg_catalog.min(w.events),
           pg_catalog.min(w.level), pg_catalog.array_agg(DISTINCT w.id),
           CASE w.tgname
               WHEN '{t_trunc}' THEN NULL
               WHEN '{t_stmt}' THEN
                   pg_catalog.string_agg(DISTINCT fl.test, ' OR ' ORDER BY fl.test)
               ELSE
                   -- The flags first: raised (the steady state), one test per row.
                   '(' || pg_catalog.string_agg(DISTINCT fl.test, ' OR ' ORDER BY fl.test)
                   || ') AND pg_catalog.current_setting('
                   || pg_catalog.quote_literal('sqlalchemy_matview.v'
                      || pg_catalog.array_to_string(pg_catalog.array_agg(DISTINCT w.id), '_'))
                   || ', true) IS DISTINCT FROM pg_catalog.pg_current_xact_id()::text'
           END
      FROM wanted w
      JOIN flags fl ON fl.id = w.id,
           LATERAL pg_catalog.unnest(ARRAY[w.id::text, w.payload])
                   WITH ORDINALITY AS a(val, ord)
     GROUP BY w.relid, w.tgname
$body$
"""

# Puts exactly the wanted triggers in place, from the views table alone:
# - a plain table (and each inheritance child): statement INSERT/UPDATE/DELETE trigger
#   (fires in origin/local sessions), its row-level twin ENABLE REPLICA (logical
#   replication applies rows with session_replication_role = replica and fires only row
#   triggers), and a TRUNCATE trigger ENABLE ALWAYS;
# - a partitioned table: a row-level trigger ENABLE ALWAYS, which PostgreSQL clones to
#   every partition, those attached or created later included, and a TRUNCATE trigger on
#   it and on each partition that exists now.
# Arguments are the (view id, payload) pairs of the views reading the table.
_SYNC_TRIGGERS = """
CREATE OR REPLACE FUNCTION {s}.sync_triggers() RETURNS integer
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $body$
DECLARE
    r record;
    changed integer := 0;
    func oid := pg_catalog.to_regprocedure(pg_catalog.quote_ident({s_lit}) || '.mark_stale()');
    fname text := pg_catalog.quote_ident({s_lit}) || '.mark_stale';
BEGIN
    PERFORM pg_catalog.pg_advisory_xact_lock({setup_key});
    CREATE TEMPORARY TABLE IF NOT EXISTS sqlalchemy_matview_wanted (
        relid oid, tgname name, args bytea, arglist text, enabled "char", events text,
        level text, view_ids integer[], guard text
    ) ON COMMIT DROP;
    TRUNCATE sqlalchemy_matview_wanted;
    -- Every tracked view has its flag (the triggers' guards name them).
    FOR r IN
        SELECT pg_catalog.quote_ident({s_lit}) || '.'
               || pg_catalog.quote_ident({flag_prefix} || v.id) AS flag
          FROM {views} v WHERE v.tracked
    LOOP
        IF pg_catalog.to_regclass(r.flag) IS NULL THEN
            EXECUTE 'CREATE SEQUENCE ' || r.flag || ' AS bigint'
                    || ' MINVALUE -9223372036854775808 MAXVALUE 9223372036854775807 START 0';
            EXECUTE 'GRANT SELECT ON SEQUENCE ' || r.flag || ' TO PUBLIC';
        END IF;
    END LOOP;
    INSERT INTO sqlalchemy_matview_wanted SELECT * FROM {s}.wanted_triggers();
    -- Drop what is not wanted, or not exactly as wanted (arguments, function, firing).
    FOR r IN
        SELECT t.tgrelid, t.tgname FROM pg_catalog.pg_trigger t
         WHERE t.tgname IN ({t_all}) AND t.tgparentid = 0
           AND NOT EXISTS (SELECT 1 FROM sqlalchemy_matview_wanted w
                            WHERE w.relid = t.tgrelid AND w.tgname = t.tgname
                              AND w.args = t.tgargs AND t.tgfoid = func
                              AND t.tgenabled = w.enabled
                              AND pg_catalog.obj_description(t.oid, 'pg_trigger')
                                  IS NOT DISTINCT FROM pg_catalog.md5(w.guard))
    LOOP
        EXECUTE 'DROP TRIGGER ' || pg_catalog.quote_ident(r.tgname) || ' ON '
                || r.tgrelid::pg_catalog.regclass::text;
        changed := changed + 1;
    END LOOP;
    FOR r IN
        SELECT w.* FROM sqlalchemy_matview_wanted w
         WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger t
                            WHERE t.tgrelid = w.relid AND t.tgname = w.tgname)
    LOOP
        EXECUTE 'CREATE TRIGGER ' || pg_catalog.quote_ident(r.tgname) || ' ' || r.events
                || ' ON ' || r.relid::pg_catalog.regclass::text || ' FOR EACH ' || r.level
                || CASE WHEN r.guard IS NOT NULL THEN ' WHEN (' || r.guard || ')' ELSE '' END
                || ' EXECUTE FUNCTION ' || fname || '(' || r.arglist || ')';
        IF r.guard IS NOT NULL THEN
            -- How a later call tells a guard of another version (or other keys) apart.
            EXECUTE 'COMMENT ON TRIGGER ' || pg_catalog.quote_ident(r.tgname) || ' ON '
                    || r.relid::pg_catalog.regclass::text || ' IS '
                    || pg_catalog.quote_literal(pg_catalog.md5(r.guard));
        END IF;
        IF r.enabled = 'R' THEN
            EXECUTE 'ALTER TABLE ' || r.relid::pg_catalog.regclass::text
                    || ' ENABLE REPLICA TRIGGER ' || pg_catalog.quote_ident(r.tgname);
        ELSIF r.enabled = 'A' THEN
            EXECUTE 'ALTER TABLE ' || r.relid::pg_catalog.regclass::text
                    || ' ENABLE ALWAYS TRIGGER ' || pg_catalog.quote_ident(r.tgname);
        END IF;
        changed := changed + 1;
    END LOOP;
    -- The flags of views no longer tracked (their triggers, which named them, are gone).
    FOR r IN
        SELECT c.oid::pg_catalog.regclass::text AS flag FROM pg_catalog.pg_class c
         WHERE c.relnamespace = pg_catalog.to_regnamespace(pg_catalog.quote_ident({s_lit}))
           AND c.relkind = 'S' AND pg_catalog.starts_with(c.relname, {flag_prefix})
           AND NOT EXISTS (SELECT 1 FROM {views} v
                            WHERE v.tracked AND c.relname = {flag_prefix} || v.id)
    LOOP
        EXECUTE 'DROP SEQUENCE ' || r.flag;
    END LOOP;
    RETURN changed;
END $body$
"""

# What is wrong with the tracking of each view, from the catalog: a wanted trigger
# missing or altered (a table INHERITing later, a partition created later gets no TRUNCATE
# trigger of its own, someone dropped or disabled one), a source table that was dropped.
_CHECK = """
CREATE OR REPLACE FUNCTION {s}.check_triggers()
RETURNS TABLE (view_schema text, view_name text, problem text)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $body$
    SELECT v.view_schema, v.view_name,
           'trigger ' || w.tgname || ' on ' || w.relid::pg_catalog.regclass::text
           || ' is missing or altered'
      FROM {s}.wanted_triggers() w
      JOIN {views} v ON v.id = ANY (w.view_ids)
     WHERE NOT EXISTS (
           SELECT 1 FROM pg_catalog.pg_trigger t
            WHERE t.tgrelid = w.relid AND t.tgname = w.tgname AND t.tgargs = w.args
              AND t.tgenabled = w.enabled
              AND pg_catalog.obj_description(t.oid, 'pg_trigger')
                  IS NOT DISTINCT FROM pg_catalog.md5(w.guard)
              AND t.tgfoid = pg_catalog.to_regprocedure(
                                 pg_catalog.quote_ident({s_lit}) || '.mark_stale()'))
    UNION ALL
    SELECT v.view_schema, v.view_name,
           'source table ' || s.rel::oid::text || ' was dropped'
      FROM {views} v, pg_catalog.unnest(v.sources) AS s(rel)
     WHERE v.tracked
       AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_class c WHERE c.oid = s.rel::oid)
$body$
"""

# Plain views are looked through to the tables they read, recursively; materialized views
# are not: their own refreshes mark their dependents stale.
_EXPAND = """
CREATE OR REPLACE FUNCTION {s}.expand_sources(source_tables pg_catalog.regclass[])
RETURNS pg_catalog.regclass[]
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $body$
    WITH RECURSIVE rels(oid) AS (
        SELECT s.rel::oid FROM pg_catalog.unnest(source_tables) AS s(rel)
      UNION
        SELECT d.refobjid
          FROM rels
          JOIN pg_catalog.pg_class c ON c.oid = rels.oid AND c.relkind = 'v'
          JOIN pg_catalog.pg_rewrite r ON r.ev_class = c.oid
          JOIN pg_catalog.pg_depend d ON d.objid = r.oid
               AND d.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass
               AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass
               AND d.deptype = 'n' AND d.refobjid <> c.oid
    )
    SELECT COALESCE(pg_catalog.array_agg(c.oid::pg_catalog.regclass
                                         ORDER BY n.nspname, c.relname), '{{}}')
      FROM rels
      JOIN pg_catalog.pg_class c ON c.oid = rels.oid
      JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
     WHERE c.relkind IN ('r', 'p')
       AND n.nspname NOT IN ('pg_catalog', 'information_schema')
$body$
"""

_TRACK = """
CREATE OR REPLACE FUNCTION {s}.track(
    target_schema text, target_name text, source_tables pg_catalog.regclass[])
RETURNS pg_catalog.regclass[] LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $body$
DECLARE
    tables pg_catalog.regclass[] := {s}.expand_sources(source_tables);
BEGIN
    INSERT INTO {views} AS v (view_schema, view_name, tracked, sources, barrier_key)
    VALUES (target_schema, target_name, true, tables,
            ('x' || pg_catalog.substr(pg_catalog.md5(pg_catalog.gen_random_uuid()::text),
                                      1, 16))::bit(64)::bigint)
    ON CONFLICT (view_schema, view_name) DO UPDATE
       SET tracked = true, sources = EXCLUDED.sources,
           barrier_key = COALESCE(v.barrier_key, EXCLUDED.barrier_key);
    PERFORM {s}.sync_triggers();
    RETURN tables;
END $body$
"""

_UNTRACK = """
CREATE OR REPLACE FUNCTION {s}.untrack(target_schema text, target_name text)
RETURNS boolean LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $body$
DECLARE
    vid integer;
BEGIN
    DELETE FROM {views} v WHERE v.view_schema = target_schema AND v.view_name = target_name
        RETURNING v.id INTO vid;
    IF vid IS NULL THEN
        RETURN false;
    END IF;
    DELETE FROM {changes} c WHERE c.view_id = vid;
    PERFORM {s}.sync_triggers();
    RETURN true;
END $body$
"""
