"""Change tracking's design: one notify per fresh->stale transition, no lost change during a
refresh, every write path, restored marks, squatting, layering, 0.1.0's layout moved."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from sqlalchemy_matview import (
    MaterializedView,
    TrackingInstallError,
    check_tracking,
    refresh_stale,
    refresh_views,
)
from sqlalchemy_matview.bookkeeping import LEGACY_TRIGGER, TRIGGER_NAMES
from sqlalchemy_matview.orchestration import tracking

from .conftest import Shop, wait_for

GATE = 4242  # advisory key a view's query waits on, held by a test to pause a refresh


@pytest.fixture
def listener(engine: Engine) -> Iterator[psycopg.Connection]:
    url = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("LISTEN sqlalchemy_matview")
        yield conn


def _payloads(listener: psycopg.Connection, timeout: float = 0.5) -> list[str]:
    return [n.payload for n in listener.notifies(timeout=timeout)]


def _state(engine: Engine, name: str) -> tracking.ViewState:
    with engine.connect() as conn:
        return tracking.view_states(conn)[("public", name)]


def test_one_notify_per_fresh_to_stale_transition(engine, shop: Shop, listener):
    for i in range(3):  # three writing transactions
        with engine.begin() as conn:
            conn.execute(shop.orders.insert(), [{"customer": i, "amount": 1}])
    assert _payloads(listener) == ["public.mv_totals"]
    # The first transaction left a mark; the next two found it and added none (no WAL).
    assert _state(engine, "mv_totals").pending_changes == 1
    [result, _] = refresh_stale(engine, shop.metadata)
    assert result.status == "refreshed" and not result.pending
    _payloads(listener)  # the refresh marks (and notifies) mv_top
    with engine.begin() as conn:
        conn.execute(shop.orders.insert(), [{"customer": 9, "amount": 1}])
    assert _payloads(listener) == ["public.mv_totals"]  # stale again: notified again


def _gated_view(engine: Engine) -> tuple[sa.MetaData, sa.Table, MaterializedView]:
    """A tracked view whose REFRESH waits while the test holds advisory lock GATE."""
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "CREATE FUNCTION public.gate() RETURNS int LANGUAGE sql VOLATILE AS"
                f" 'SELECT 1 FROM (SELECT pg_catalog.pg_advisory_xact_lock_shared({GATE})) g'"
            )
        )
    md = sa.MetaData()
    src = sa.Table("src", md, sa.Column("id", sa.Integer, primary_key=True))
    view = MaterializedView(
        "mv_gated",
        md,
        sa.select(src.c.id).where(sa.func.public.gate() == 1),
        columns=[sa.Column("id", sa.Integer)],
        track_changes=True,
    )
    md.create_all(engine)
    return md, src, view


def _waiting_on(engine: Engine, key: int) -> bool:
    with engine.connect() as conn:
        return bool(
            conn.scalar(
                sa.text(
                    "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory'"
                    " AND NOT granted AND objid = :k AND classid = 0)"
                ),
                {"k": key},
            )
        )


def _stale_gated_view(
    engine: Engine, listener: psycopg.Connection
) -> tuple[sa.MetaData, sa.Table, MaterializedView]:
    """The gated view, made stale by one committed row (id 1), whose notification is read."""
    md, src, view = _gated_view(engine)
    with engine.begin() as conn:
        conn.execute(src.insert(), [{"id": 1}])
    assert _payloads(listener) == ["public.mv_gated"]
    return md, src, view


class _HeldRefresh:
    """``refresh_stale`` in a thread, held inside its REFRESH (after it took the barrier and
    its snapshot) until :meth:`release`."""

    def __init__(self, engine: Engine, md: sa.MetaData) -> None:
        self.results: list[object] = []
        self.gate = engine.connect()
        self.gate.execute(sa.select(sa.func.pg_advisory_lock(GATE)))
        self.thread = threading.Thread(
            target=lambda: self.results.extend(refresh_stale(engine, md))
        )
        self.thread.start()
        assert wait_for(lambda: _waiting_on(engine, GATE))

    def release(self) -> object:
        self.gate.execute(sa.select(sa.func.pg_advisory_unlock(GATE)))
        self.thread.join(60)
        self.gate.close()
        [result] = self.results
        return result


def _write_concurrently(engine: Engine, src: sa.Table, ids: list[int], sessions: int) -> None:
    """Each id committed in a transaction of its own, from ``sessions`` sessions at once."""

    def run(part: list[int]) -> None:
        with engine.connect() as conn:
            for i in part:
                conn.execute(src.insert(), [{"id": i}])
                conn.commit()

    threads = [threading.Thread(target=run, args=(ids[k::sessions],)) for k in range(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)


def test_writers_during_a_refresh_notify_once_and_no_change_is_lost(engine, listener):
    """T8: the writers committing while a refresh runs do not notify (no queue on the NOTIFY
    lock); the refresh notifies once at its end, and another refresh covers them all."""
    md, src, view = _stale_gated_view(engine, listener)
    held = _HeldRefresh(engine, md)
    try:
        _write_concurrently(engine, src, list(range(2, 42)), sessions=8)  # never wait
        assert _payloads(listener, timeout=1) == []  # 40 transactions, no notification
    finally:
        result = held.release()
    assert result.status == "refreshed" and result.pending  # type: ignore[attr-defined]
    assert _payloads(listener, timeout=5) == ["public.mv_gated"]  # the refresh's, once
    assert _state(engine, "mv_gated").stale
    [again] = refresh_stale(engine, md)
    assert again.status == "refreshed" and not again.pending
    assert not _state(engine, "mv_gated").stale
    with engine.connect() as conn:
        assert conn.execute(sa.select(view.table.c.id).order_by("id")).scalars().all() == list(
            range(1, 42)
        )


def test_a_late_writer_still_open_when_the_refresh_ends_keeps_the_view_stale(engine, listener):
    """A writer that wrote during the refresh and commits after it: the refresh, finding the
    late key taken, leaves a mark of its own and notifies, and the next refresh, not skipped
    as fresh, covers the change."""
    md, src, view = _stale_gated_view(engine, listener)
    held = _HeldRefresh(engine, md)
    writer = engine.connect()
    try:
        writer.execute(src.insert(), [{"id": 2}])  # in flight, holds the late key
    finally:
        result = held.release()
    assert result.status == "refreshed" and result.pending  # type: ignore[attr-defined]
    assert _payloads(listener, timeout=5) == ["public.mv_gated"]
    writer.commit()
    writer.close()
    assert _payloads(listener) == []  # the late writer itself did not notify
    [again] = refresh_stale(engine, md)
    assert again.status == "refreshed" and not again.pending
    with engine.connect() as conn:
        assert conn.execute(sa.select(view.table.c.id).order_by("id")).scalars().all() == [1, 2]
    assert not _state(engine, "mv_gated").stale


def test_a_late_writer_reading_the_view_is_not_deadlocked(engine, listener):
    """A writer that wrote during a (non-concurrent) refresh and then reads the view waits
    for the refresh; the refresh must not wait for it in turn (its late key)."""
    md, src, view = _stale_gated_view(engine, listener)
    held = _HeldRefresh(engine, md)
    writer = engine.connect()
    read: list[object] = []
    try:
        writer.execute(src.insert(), [{"id": 2}])  # late: holds the late key
        reader = threading.Thread(
            target=lambda: read.append(writer.execute(sa.select(view.table.c.id)).all())
        )
        reader.start()  # waits for the refresh's lock on the view
        assert wait_for(lambda: _blocked(engine))
        result = held.release()
        reader.join(60)
        writer.commit()
    finally:
        writer.close()
    assert read, "the writer's read failed"
    assert result.status == "refreshed" and result.pending  # type: ignore[attr-defined]
    [again] = refresh_stale(engine, md)
    assert again.status == "refreshed"
    with engine.connect() as conn:
        assert conn.execute(sa.select(view.table.c.id).order_by("id")).scalars().all() == [1, 2]


def _blocked(engine: Engine, locktype: str = "relation") -> bool:
    """Some session waits for a lock of ``locktype``."""
    with engine.connect() as conn:
        return bool(
            conn.scalar(
                sa.text(
                    "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE NOT granted AND locktype = :t)"
                ),
                {"t": locktype},
            )
        )


def _tracked_src(engine: Engine) -> tuple[sa.MetaData, sa.Table, MaterializedView]:
    """Table ``src`` (id) read by the tracked view ``mv_w``, created."""
    md = sa.MetaData()
    src = sa.Table("src", md, sa.Column("id", sa.Integer, primary_key=True))
    mv = MaterializedView("mv_w", md, sa.select(src.c.id), unique_key="id", track_changes=True)
    md.create_all(engine)
    return md, src, mv


def test_a_barrier_held_by_another_session_still_wakes_a_refresh(engine, listener):
    """Someone holds the barrier exclusive (a role that read the key in pg_locks): writers
    never wait, the fresh-to-stale transition still notifies, and refreshes still happen,
    after their timeout, until nothing is missed."""
    md, src, mv = _tracked_src(engine)
    holder = engine.connect()
    try:
        key = holder.scalar(
            sa.text(
                "SELECT pg_catalog.hashint4extended(v.id, pg_catalog.pg_sequence_last_value("
                "'sqlalchemy_matview.barrier_secret')) FROM sqlalchemy_matview.views v"
                " WHERE v.view_name = 'mv_w'"
            )
        )
        holder.execute(sa.select(sa.func.pg_advisory_lock(key)))
        holder.commit()
        with engine.begin() as conn:
            conn.execute(src.insert(), [{"id": 1}])
        assert _payloads(listener) == ["public.mv_w"]  # the view was fresh: notified
        with engine.begin() as conn:
            conn.execute(src.insert(), [{"id": 2}])
        assert _payloads(listener) == []  # already stale
        [result] = refresh_views(engine, "mv_w", lock_timeout=0.3)
        assert result.status == "refreshed" and result.pending
        assert _payloads(listener) == ["public.mv_w"]
        holder.execute(sa.select(sa.func.pg_advisory_unlock(key)))
        holder.commit()
    finally:
        holder.close()
    [again] = refresh_stale(engine, md)
    assert again.status == "refreshed" and not again.pending
    assert not _state(engine, "mv_w").stale
    with engine.connect() as conn:
        assert conn.execute(sa.select(mv.table.c.id).order_by("id")).scalars().all() == [1, 2]


def test_refresh_waits_for_writers_in_flight_within_lock_timeout(engine, listener):
    """A writer holding the barrier delays the refresh (not the other way round); past the
    timeout the refresh goes ahead, reports pending and notifies."""
    md, src, _ = _tracked_src(engine)
    writer = engine.connect()
    try:
        writer.execute(src.insert(), [{"id": 1}])  # in flight: holds the barrier shared
        [result] = refresh_views(engine, "mv_w", lock_timeout=0.3)
        assert result.status == "refreshed" and result.pending
        assert "public.mv_w" in _payloads(listener)
        writer.commit()
    finally:
        writer.close()
    [again] = refresh_stale(engine, md)
    assert again.status == "refreshed" and not again.pending
    assert not _state(engine, "mv_w").stale


def _track(engine: Engine, ddl: list[str], source: str) -> None:
    with engine.begin() as conn:
        for statement in ddl:
            conn.execute(sa.text(statement))
        conn.execute(
            sa.text(f"CREATE MATERIALIZED VIEW mv_t AS SELECT count(*) AS n FROM {source}")
        )
        tracking.install_tracking(conn, None, "mv_t", [(None, source)])


def _marks_stale(engine: Engine, statement: str, *, replica: bool = False) -> bool:
    refresh_views(engine, "mv_t")
    assert not _state(engine, "mv_t").stale
    with engine.begin() as conn:
        if replica:
            conn.execute(sa.text("SET LOCAL session_replication_role = replica"))
        conn.execute(sa.text(statement))
    return _state(engine, "mv_t").stale


def test_partitioned_table_every_write_path(engine):
    _track(
        engine,
        [
            "CREATE TABLE ev (id int, day int) PARTITION BY RANGE (day)",
            "CREATE TABLE ev_1 PARTITION OF ev FOR VALUES FROM (0) TO (10)",
        ],
        "ev",
    )
    assert _marks_stale(engine, "INSERT INTO ev VALUES (1, 1)")
    assert _marks_stale(engine, "INSERT INTO ev_1 VALUES (2, 2)")  # straight into the leaf
    assert _marks_stale(engine, "UPDATE ev_1 SET id = 3")
    assert _marks_stale(engine, "DELETE FROM ev_1 WHERE id = 3")
    assert _marks_stale(engine, "INSERT INTO ev_1 VALUES (2, 2)", replica=True)
    assert _marks_stale(engine, "TRUNCATE ev_1")
    assert _marks_stale(engine, "TRUNCATE ev")
    with engine.begin() as conn:  # partitions made after tracking was enabled
        conn.execute(sa.text("CREATE TABLE ev_2 PARTITION OF ev FOR VALUES FROM (10) TO (20)"))
        conn.execute(sa.text("CREATE TABLE ev_3 (id int, day int)"))
        conn.execute(sa.text("ALTER TABLE ev ATTACH PARTITION ev_3 FOR VALUES FROM (20) TO (30)"))
    assert _marks_stale(engine, "INSERT INTO ev_2 VALUES (1, 11)")
    assert _marks_stale(engine, "INSERT INTO ev_3 VALUES (1, 21)")
    assert _marks_stale(engine, "INSERT INTO ev_3 VALUES (1, 22)", replica=True)


def test_inheritance_children_and_replication_role(engine):
    _track(
        engine,
        ["CREATE TABLE base (id int)", "CREATE TABLE child (extra int) INHERITS (base)"],
        "base",
    )
    assert _marks_stale(engine, "INSERT INTO base VALUES (1)")
    assert _marks_stale(engine, "INSERT INTO child VALUES (2, 2)")
    assert _marks_stale(engine, "UPDATE base SET id = id + 1")
    assert _marks_stale(engine, "INSERT INTO base VALUES (3)", replica=True)
    assert _marks_stale(engine, "INSERT INTO child VALUES (3, 3)", replica=True)
    assert _marks_stale(engine, "TRUNCATE child")
    refresh_views(engine, "mv_t")
    with engine.begin() as conn:  # rolled back: no mark
        conn.execute(sa.text("INSERT INTO child VALUES (4, 4)"))
        conn.rollback()
    assert not _state(engine, "mv_t").stale


def test_marks_from_a_txid_this_cluster_never_reached_are_consumed(engine, shop: Shop):
    """Restored from another cluster, such a mark would never become visible to a snapshot."""
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO sqlalchemy_matview.changes (view_id, txid)"
                " SELECT id, pg_current_xact_id()::text::bigint + 1000000000"
                " FROM sqlalchemy_matview.views WHERE view_name = 'mv_totals'"
            )
        )
    assert _state(engine, "mv_totals").stale
    results = {r.view: r for r in refresh_stale(engine, shop.metadata)}
    assert results["public.mv_totals"].status == "refreshed"
    assert not results["public.mv_totals"].pending
    assert not _state(engine, "mv_totals").stale


def test_functions_are_not_executable_by_public_and_pin_search_path(engine, shop: Shop):
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT p.proname, p.prosecdef, p.proconfig,"
                " EXISTS (SELECT 1 FROM aclexplode(p.proacl) a"
                "         WHERE a.grantee = 0 AND a.privilege_type = 'EXECUTE') AS public_exec,"
                " p.proacl IS NULL AS default_acl"
                " FROM pg_proc p WHERE p.pronamespace = 'sqlalchemy_matview'::regnamespace"
            )
        ).all()
    assert sorted(r.proname for r in rows) == [
        "bump_epoch",
        "check_triggers",
        "expand_sources",
        "lower_flag",
        "mark_stale",
        "mark_views",
        "record",
        "refresh",
        "refresh_job",
        "sync_triggers",
        "track",
        "untrack",
        "wanted_triggers",
    ]
    for row in rows:
        assert not row.public_exec and not row.default_acl, row.proname
        # refresh_job is a procedure that COMMITs, which a SET clause forbids, and
        # mark_stale is the writers' hot path, where one costs as much as the rest: they
        # qualify everything instead (tests run both under a hostile search_path).
        if row.proname in ("refresh_job", "mark_stale"):
            assert row.proconfig is None, row.proname
        else:
            assert row.proconfig == ["search_path=pg_catalog, pg_temp"], row.proname
        assert row.prosecdef == (
            row.proname in ("mark_stale", "bump_epoch", "lower_flag")
        ), row.proname


@pytest.fixture
def intruder(engine: Engine) -> Iterator[str]:
    role = f"intruder_{uuid.uuid4().hex[:8]}"
    with engine.begin() as conn:
        database = conn.scalar(sa.text("SELECT current_database()"))
        conn.execute(sa.text(f"CREATE ROLE {role}"))
        conn.execute(sa.text(f'GRANT CREATE ON DATABASE "{database}" TO {role}'))
        conn.execute(sa.text(f"GRANT CREATE ON SCHEMA public TO {role}"))
    yield role
    with engine.begin() as conn:
        conn.execute(sa.text(f"DROP OWNED BY {role} CASCADE"))
        conn.execute(sa.text(f"DROP ROLE {role}"))


def test_a_squatted_bookkeeping_schema_is_refused(engine, intruder):
    with engine.begin() as conn:
        conn.execute(sa.text(f"SET ROLE {intruder}"))
        conn.execute(sa.text("CREATE SCHEMA sqlalchemy_matview"))
        conn.execute(sa.text("RESET ROLE"))
    from .conftest import build_shop

    shop = build_shop()
    with pytest.raises(TrackingInstallError, match=rf"'sqlalchemy_matview'.*{intruder}"):
        shop.metadata.create_all(engine)
    with engine.connect() as conn:
        assert not tracking.bookkeeping_installed(conn)  # untrusted: never called


def test_a_squatted_legacy_table_is_refused(engine, intruder):
    with engine.begin() as conn:
        conn.execute(sa.text(f"SET ROLE {intruder}"))
        conn.execute(sa.text("CREATE TABLE public.sqlalchemy_matview_state (id int)"))
        conn.execute(sa.text("RESET ROLE"))
    from .conftest import build_shop

    with pytest.raises(TrackingInstallError, match=rf"sqlalchemy_matview_state.*{intruder}"):
        build_shop().metadata.create_all(engine)


_LEGACY_LAYOUT = [
    "CREATE TABLE public.sqlalchemy_matview_state (id serial PRIMARY KEY,"
    " view_schema text NOT NULL, view_name text NOT NULL,"
    " tracked boolean NOT NULL DEFAULT false, source_oids oid[] NOT NULL DEFAULT '{}',"
    " refreshed_version bigint NOT NULL DEFAULT 0, last_refreshed_at timestamptz,"
    " last_duration double precision, last_concurrently boolean,"
    " refresh_count bigint NOT NULL DEFAULT 0, UNIQUE (view_schema, view_name))",
    "CREATE TABLE public.sqlalchemy_matview_changes (view_id integer NOT NULL,"
    " txid bigint NOT NULL, id bigserial NOT NULL,"
    " changed_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (view_id, txid))",
    "CREATE FUNCTION public.sqlalchemy_matview_mark_stale() RETURNS trigger"
    " LANGUAGE plpgsql AS 'BEGIN RETURN NULL; END'",
    "CREATE FUNCTION public.sqlalchemy_matview_refresh(text, text, bigint, boolean, text,"
    " boolean) RETURNS text LANGUAGE sql AS 'SELECT ''refreshed'''",
    "CREATE TABLE orders (id int PRIMARY KEY, customer int NOT NULL, amount int NOT NULL)",
    "CREATE MATERIALIZED VIEW mv_totals AS SELECT customer, sum(amount) AS total"
    " FROM orders GROUP BY customer",
    "CREATE UNIQUE INDEX mv_totals_unique_key ON mv_totals (customer)",
    f"CREATE TRIGGER {LEGACY_TRIGGER} AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON orders"
    " FOR EACH STATEMENT EXECUTE FUNCTION public.sqlalchemy_matview_mark_stale()",
    "INSERT INTO public.sqlalchemy_matview_state (view_schema, view_name, tracked, source_oids)"
    " VALUES ('public', 'mv_totals', true, ARRAY['orders'::regclass::oid])",
    "INSERT INTO public.sqlalchemy_matview_changes (view_id, txid) VALUES (1, 1)",
]


def test_create_all_moves_the_bookkeeping_of_0_1_0_out_of_public(engine, caplog):
    from .conftest import build_shop

    with engine.begin() as conn:
        for statement in _LEGACY_LAYOUT:
            conn.execute(sa.text(statement))
    shop = build_shop()
    shop.metadata.create_all(engine)
    with engine.connect() as conn:
        leftovers = conn.execute(
            sa.text(
                "SELECT (SELECT count(*) FROM pg_class WHERE relname LIKE 'sqlalchemy_matview%'"
                "         AND relnamespace = 'public'::regnamespace)"
                " + (SELECT count(*) FROM pg_proc WHERE proname LIKE 'sqlalchemy_matview%')"
                " + (SELECT count(*) FROM pg_trigger WHERE tgname = :legacy)"
            ),
            {"legacy": LEGACY_TRIGGER},
        ).scalar()
        assert leftovers == 0
        state = tracking.view_states(conn)[("public", "mv_totals")]
    assert state.tracked and state.stale  # the pending change was carried over
    assert "moved the change tracking" in caplog.text
    assert {r.view: r.status for r in refresh_stale(engine, shop.metadata)}[
        "public.mv_totals"
    ] == "refreshed"
    with engine.begin() as conn:
        conn.execute(shop.orders.insert(), [{"id": 1, "customer": 1, "amount": 1}])
    assert _state(engine, "mv_totals").stale


def test_uninstall_bookkeeping_leaves_nothing(engine, shop: Shop):
    with engine.begin() as conn:
        tracking.uninstall_bookkeeping(conn)
        tracking.uninstall_bookkeeping(conn)
    with engine.connect() as conn:
        assert conn.scalar(sa.text("SELECT to_regnamespace('sqlalchemy_matview')")) is None
        assert (
            conn.scalar(
                sa.text("SELECT count(*) FROM pg_trigger WHERE tgname = ANY(:n)"),
                {"n": list(TRIGGER_NAMES)},
            )
            == 0
        )
    with engine.begin() as conn:
        conn.execute(shop.orders.insert(), [{"customer": 1, "amount": 1}])  # no trigger left


def test_a_custom_tracking_schema(engine):
    from sqlalchemy_matview import set_tracking_schema

    from .conftest import build_shop

    shop = build_shop()
    set_tracking_schema(shop.metadata, "mv admin")
    shop.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(shop.orders.insert(), [{"customer": 1, "amount": 500}])
    with engine.connect() as conn:
        assert conn.scalar(sa.text("SELECT to_regnamespace('sqlalchemy_matview')")) is None
        assert tracking.view_states(conn, "mv admin")[("public", "mv_totals")].stale
    results = {r.view: r.status for r in refresh_stale(engine, shop.metadata)}
    assert results == {"public.mv_totals": "refreshed", "public.mv_top": "refreshed"}
    shop.metadata.drop_all(engine)
    with engine.connect() as conn:
        assert tracking.tracking_installed(conn, "mv admin") == set()


def test_the_declaration_layer_does_not_import_orchestration(engine):
    """create_all still installs tracking: the orchestration is loaded when needed."""
    url = engine.url.render_as_string(hide_password=False)
    script = f"""
import sys
import sqlalchemy as sa
import sqlalchemy_matview.schema as schema
assert not [m for m in sys.modules if m.startswith("sqlalchemy_matview.orchestration")]
md = sa.MetaData()
t = sa.Table("layer_src", md, sa.Column("id", sa.Integer, primary_key=True))
schema.MaterializedView("mv_layer", md, sa.select(t.c.id), track_changes=True)
assert not [m for m in sys.modules if m.startswith("sqlalchemy_matview.orchestration")]
engine = sa.create_engine({url!r})
md.create_all(engine)
with engine.connect() as conn:
    print(conn.scalar(sa.text(
        "SELECT count(*) FROM sqlalchemy_matview.views WHERE view_name = 'mv_layer' AND tracked")))
"""
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ},
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1"


def _problems(engine: Engine, md: sa.MetaData) -> dict[str, str]:
    return {p.view: p.problem for p in check_tracking(engine, md)}


def test_check_tracking_finds_what_breaks_it_and_create_all_repairs(engine):
    from .conftest import build_shop

    shop = build_shop()
    md = shop.metadata
    problems = _problems(engine, md)  # nothing installed yet
    assert (
        list(problems) == ["public.mv_totals"] and "not installed" in problems["public.mv_totals"]
    )
    md.create_all(engine)
    assert _problems(engine, md) == {}
    breakages = [
        "DROP TRIGGER sqlalchemy_matview_row ON orders",
        "ALTER TABLE orders DISABLE TRIGGER sqlalchemy_matview_stmt",
        "CREATE TABLE orders_archive (note text) INHERITS (orders)",
        "SELECT sqlalchemy_matview.untrack('public', 'mv_totals')",
    ]
    for statement in breakages:
        with engine.begin() as conn:
            conn.execute(sa.text(statement))
        assert list(_problems(engine, md)) == ["public.mv_totals"], statement
        md.create_all(engine)
        assert _problems(engine, md) == {}, statement
    # The repaired triggers work, the late inheritance child's too.
    refresh_views(engine, shop.mv_totals)
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO orders_archive VALUES (7, 1, 1, 'x')"))
    assert _state(engine, "mv_totals").stale


def test_check_tracking_after_a_source_is_recreated(engine):
    from .conftest import build_shop

    shop = build_shop()
    shop.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE orders CASCADE"))  # the views go with it
    problems = _problems(engine, shop.metadata)
    assert "does not exist" in problems["public.mv_totals"]
    shop.metadata.create_all(engine)
    assert _problems(engine, shop.metadata) == {}
    with engine.begin() as conn:
        conn.execute(shop.orders.insert(), [{"customer": 1, "amount": 1}])
    assert _state(engine, "mv_totals").stale


def test_check_tracking_async(async_engine, engine):
    import asyncio

    from sqlalchemy_matview.asyncio import check_tracking as acheck

    from .conftest import build_shop

    shop = build_shop()
    shop.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(sa.text("DROP TRIGGER sqlalchemy_matview_stmt ON orders"))

    async def main() -> list[str]:
        return [p.view for p in await acheck(async_engine, shop.metadata)]

    assert asyncio.run(main()) == ["public.mv_totals"]


def test_row_level_firings_call_the_function_once_per_transaction(engine):
    """The WHEN clause of row-level triggers spares the call for every further row."""
    _track(
        engine,
        [
            "CREATE TABLE ev (id int, day int) PARTITION BY RANGE (day)",
            "CREATE TABLE ev_1 PARTITION OF ev FOR VALUES FROM (0) TO (10)",
            "CREATE TABLE ev_2 PARTITION OF ev FOR VALUES FROM (10) TO (20)",
        ],
        "ev",
    )
    refresh_views(engine, "mv_t")
    with engine.begin() as conn:
        conn.execute(sa.text("SET LOCAL track_functions = 'pl'"))
        conn.execute(sa.text("INSERT INTO ev SELECT g, g % 20 FROM generate_series(1, 1000) g"))
        conn.execute(sa.text("UPDATE ev SET id = id + 1 WHERE day = 3"))
        calls = conn.scalar(
            sa.text("SELECT calls FROM pg_stat_xact_user_functions WHERE funcname = 'mark_stale'")
        )
    assert calls == 1
    assert _state(engine, "mv_t").stale


def test_bookkeeping_of_an_older_version_is_upgraded_by_create_all(engine, shop: Shop):
    """Versions up to 10 had no secret sequence and read the barrier key from ``views``:
    create_all installs the new functions and a random secret, and a refresh still waits for
    a writer holding the old key (one running the old function while the upgrade commits)."""
    with engine.begin() as conn:
        conn.execute(sa.text("DROP SEQUENCE sqlalchemy_matview.barrier_secret"))
        conn.execute(
            sa.text("COMMENT ON SCHEMA sqlalchemy_matview IS 'sqlalchemy_matview bookkeeping 10'")
        )
        assert not tracking.bookkeeping_installed(conn)
    shop.metadata.create_all(engine)
    with engine.connect() as conn:
        assert tracking.bookkeeping_installed(conn)
        secret = conn.scalar(
            sa.text("SELECT last_value FROM sqlalchemy_matview.barrier_secret WHERE is_called")
        )
        old_key = conn.scalar(
            sa.text(
                "SELECT barrier_key FROM sqlalchemy_matview.views WHERE view_name = 'mv_totals'"
            )
        )
    assert secret is not None and secret not in (0, 1)
    with engine.begin() as conn:
        conn.execute(shop.orders.insert(), [{"customer": 1, "amount": 5}])
    assert _state(engine, "mv_totals").stale
    old_writer = engine.connect()
    try:
        old_writer.execute(sa.select(sa.func.pg_advisory_xact_lock_shared(old_key)))
        [result] = refresh_views(engine, "mv_totals", lock_timeout=0.3)
        assert result.status == "refreshed" and result.pending  # it waited, then went ahead
    finally:
        old_writer.rollback()
        old_writer.close()


def test_a_refresh_past_the_barrier_timeout_leaves_the_view_stale(engine, listener):
    """The view is stale; a writer in flight found the mark and added none (it holds the
    barrier shared). A refresh that times out on the barrier consumes that mark: it must
    leave one of its own, or the refresh its notification causes skips the view as fresh."""
    md, src, mv = _tracked_src(engine)
    with engine.begin() as conn:
        conn.execute(src.insert(), [{"id": 1}])
    writer = engine.connect()
    try:
        writer.execute(src.insert(), [{"id": 2}])  # finds the mark: adds none
        [result] = refresh_views(engine, "mv_w", lock_timeout=0.3)
        assert result.status == "refreshed" and result.pending
        writer.commit()
    finally:
        writer.close()
    assert "public.mv_w" in _payloads(listener)
    [again] = refresh_stale(engine, md)
    assert again.status == "refreshed"
    with engine.connect() as conn:
        assert conn.execute(sa.select(mv.table.c.id).order_by("id")).scalars().all() == [1, 2]


def test_a_repeatable_read_refresh_leaves_the_view_stale(engine, listener):
    """A refresh in a REPEATABLE READ transaction took its snapshot before the barrier: a
    writer that committed while it waited for the barrier, and added no mark (it found one),
    is not in the refresh; the view must stay stale."""
    md, src, mv = _tracked_src(engine)
    with engine.begin() as conn:
        conn.execute(src.insert(), [{"id": 1}])
    writer = engine.connect()
    writer.execute(src.insert(), [{"id": 2}])  # finds the mark, holds the barrier shared
    results: list[object] = []
    with engine.connect().execution_options(isolation_level="REPEATABLE READ") as rr:
        rr.execute(sa.text("SELECT 1"))  # the transaction's snapshot, taken now
        refresher = threading.Thread(target=lambda: results.extend(refresh_views(rr, "mv_w")))
        refresher.start()
        assert wait_for(lambda: _blocked(engine, "advisory"))
        writer.commit()
        writer.close()
        refresher.join(60)
        rr.commit()
    [result] = results
    assert result.status == "refreshed" and result.pending  # type: ignore[attr-defined]
    [again] = refresh_stale(engine, md)
    assert again.status == "refreshed"
    with engine.connect() as conn:
        assert conn.execute(sa.select(mv.table.c.id).order_by("id")).scalars().all() == [1, 2]
