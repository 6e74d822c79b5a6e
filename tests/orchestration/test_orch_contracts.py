"""Contracts other processes rely on, pinned to literal values.

``lock_key`` values are stored outside this library: pg_cron jobs carry them as literals in
their command, and other releases (or other languages) must compute the same key to
coordinate with a running worker. A change to any value below breaks every scheduled job
and every mixed-version deployment: it needs a migration story, not a test update.
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from sqlalchemy_matview import MaterializedView, MaterializedViewError, lock_key
from sqlalchemy_matview.orchestration.cron import job_name_for, refresh_command
from sqlalchemy_matview.orchestration.locking import lock_key_parts

# (schema, name) -> (lock_key, (classid, objid) as pg_locks shows them)
PINNED = {
    ("public", "mv_daily"): (-6283123207096362487, (2832063675, 2298616329)),
    ("public", "Daily Stats"): (5476311138525878931, (1275053047, 995728019)),
    ("reporting", "mv_daily"): (-410023241908835192, (4199501320, 2891885704)),
    ("public", "a.b"): (8414533326812730107, (1959161210, 2270941947)),
    ("S c", 'it\'s "odd"'): (-8333806095337087830, (2354601858, 3161627818)),
    ("public", "ünï"): (-241518092063633248, (4238734483, 733450400)),
}


@pytest.mark.parametrize("qname", list(PINNED), ids=[f"{s}.{n}" for s, n in PINNED])
def test_lock_key_values_are_stable(qname: tuple[str, str]) -> None:
    key, parts = PINNED[qname]
    assert lock_key(qname) == key
    assert lock_key_parts(qname) == parts


def test_every_way_of_naming_a_view_gives_its_key() -> None:
    md = sa.MetaData()
    t = sa.Table("t", md, sa.Column("id", sa.Integer, primary_key=True))
    daily = MaterializedView("mv_daily", md, sa.select(t.c.id))
    elsewhere = MaterializedView("mv_daily", md, sa.select(t.c.id), schema="reporting")
    public_key = PINNED[("public", "mv_daily")][0]
    reporting_key = PINNED[("reporting", "mv_daily")][0]
    assert lock_key("mv_daily") == lock_key((None, "mv_daily")) == public_key
    assert lock_key(daily) == lock_key(daily.table) == public_key
    assert lock_key(elsewhere) == lock_key(elsewhere.table) == reporting_key
    assert lock_key("mv_daily", schema="reporting") == reporting_key
    assert lock_key(daily, schema="reporting") == reporting_key  # undeclared schema: the default
    assert lock_key(elsewhere, schema="other") == reporting_key  # declared schema wins
    with pytest.raises(TypeError, match="lock_key"):
        lock_key(42)  # type: ignore[arg-type]


def test_pg_cron_job_command_text() -> None:
    # 0.1.0's jobs called public.sqlalchemy_matview_refresh(...); the bookkeeping moved to
    # its own schema, and schedule_refresh() writes this CALL of a procedure that records a failed
    # run in the refresh history (the CHANGELOG says to reschedule).
    assert refresh_command("mv_daily") == (
        "CALL sqlalchemy_matview.refresh_job("
        "'public', 'mv_daily', -6283123207096362487, true, 'skip', false)"
    )
    assert refresh_command("Daily Stats", concurrently=False) == (
        "CALL sqlalchemy_matview.refresh_job("
        "'public', 'Daily Stats', 5476311138525878931, false, 'skip', false)"
    )
    assert refresh_command('it\'s "odd"', schema="S c", concurrently=False, only_if_stale=True) == (
        "CALL sqlalchemy_matview.refresh_job("
        "'S c', 'it''s \"odd\"', -8333806095337087830, false, 'skip', true)"
    )


def test_pg_cron_job_command_with_a_lock_namespace() -> None:
    assert refresh_command("mv_daily", lock_namespace="tenant-a") == (
        "CALL sqlalchemy_matview.refresh_job("
        "'public', 'mv_daily', -3002704982268961825, true, 'skip', false)"
    )


def test_pg_cron_job_names() -> None:
    assert job_name_for("mv_daily") == "sqlalchemy_matview refresh public.mv_daily"
    assert (
        job_name_for("mv_daily", schema="reporting", database="app")
        == "sqlalchemy_matview refresh reporting.mv_daily in app"
    )


# (schema, name, lock_namespace) -> (lock_key, (classid, objid)): HMAC-SHA-256 keyed by the
# namespace; workers, CLI runs and pg_cron jobs of one deployment must all agree on these.
PINNED_NAMESPACED = {
    ("public", "mv_daily", "tenant-a"): (-3002704982268961825, (3595845562, 1183849439)),
    ("public", "mv_daily", "ünï ns"): (7251377251330052574, (1688342832, 3454030302)),
    ("reporting", "mv_daily", "tenant-a"): (2729891637335323400, (635602427, 112096008)),
    ("S c", 'it\'s "odd"', "tenant-a"): (4423110315091764037, (1029835621, 2640913221)),
}


@pytest.mark.parametrize(
    "pinned", list(PINNED_NAMESPACED), ids=[f"{s}.{n}@{ns}" for s, n, ns in PINNED_NAMESPACED]
)
def test_namespaced_lock_key_values_are_stable(pinned: tuple[str, str, str]) -> None:
    schema, name, namespace = pinned
    key, parts = PINNED_NAMESPACED[pinned]
    assert lock_key((schema, name), namespace=namespace) == key
    assert lock_key_parts((schema, name), namespace=namespace) == parts
    assert key != lock_key((schema, name))


@pytest.mark.parametrize("bad", ["", 42, b"ns"])
def test_lock_namespace_must_be_a_non_empty_string(bad: object) -> None:
    with pytest.raises(MaterializedViewError, match="lock_namespace"):
        lock_key("mv_daily", namespace=bad)  # type: ignore[arg-type]
    with pytest.raises(MaterializedViewError, match="lock_namespace"):
        refresh_command("mv_daily", lock_namespace=bad)  # type: ignore[arg-type]
