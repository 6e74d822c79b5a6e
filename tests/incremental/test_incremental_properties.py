"""Incremental refresh is exact: random writes and refreshes, compared with the definition.

A hypothesis state machine interleaves inserts, updates that move rows between days and
users, deletes, truncates, rolled-back writes and refreshes on a real server; after every
refresh both views (the README's dashboard per UTC day, and per-user totals) must equal their
definitions computed from scratch (``EXCEPT ALL`` both ways: zero rows), over a plain or a
partitioned source (rows moving between partitions). Realtime views
(``realtime=True``) must equal them after every write as well, inside the writing transaction.
"""

from __future__ import annotations

import datetime as dt

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule, run_state_machine_as_test
from sqlalchemy.engine import Engine

from sqlalchemy_matview import refresh_views

from .conftest import Dashboard, build_dashboard, difference

DAYS = st.integers(min_value=1, max_value=6)
HOURS = st.integers(min_value=0, max_value=23)
USERS = st.integers(min_value=1, max_value=5)
KINDS = st.sampled_from(["view", "purchase"])
AMOUNTS = st.integers(min_value=0, max_value=50)
ROW = st.tuples(DAYS, HOURS, USERS, KINDS, AMOUNTS)


def at(day: int, hour: int) -> dt.datetime:
    # Around midnight UTC in some zones: the UTC day is what counts.
    return dt.datetime(2026, 3, day, hour, 30, tzinfo=dt.timezone.utc)


def machine_for(engine: Engine) -> type[RuleBasedStateMachine]:
    class IncrementalMachine(RuleBasedStateMachine):
        d: Dashboard

        @initialize(
            threshold=st.sampled_from([0.3, 1.0]),
            realtime=st.booleans(),
            partitioned=st.booleans(),
        )
        def create(self, threshold: float, realtime: bool, partitioned: bool) -> None:
            with engine.begin() as conn:
                # A clean database for every example.
                conn.execute(sa.text("DROP SCHEMA IF EXISTS sqlalchemy_matview CASCADE"))
                conn.execute(sa.text("DROP SCHEMA public CASCADE"))
                conn.execute(sa.text("CREATE SCHEMA public"))
            self.realtime = realtime
            self.d = build_dashboard(
                threshold=threshold, realtime=realtime, partitioned=partitioned
            )
            if partitioned:
                # Row-level logging (cloned to every partition) instead of statement-level.
                with engine.begin() as conn:
                    self.d.events.create(conn)
                    conn.execute(
                        sa.text(
                            "CREATE TABLE events_early PARTITION OF events"
                            " FOR VALUES FROM (MINVALUE) TO ('2026-03-04')"
                        )
                    )
                    conn.execute(sa.text("CREATE TABLE events_late PARTITION OF events DEFAULT"))
            self.d.metadata.create_all(engine)

        def write(
            self, statement: sa.Executable, *, commit: bool = True, zone: str = "UTC"
        ) -> None:
            with engine.connect() as conn:
                # Writers in other time zones must log the same UTC days.
                conn.execute(sa.text("SELECT set_config('TimeZone', :z, true)"), {"z": zone})
                conn.execute(statement)
                if self.realtime:
                    # A realtime view is exact at every moment, the writer's own changes
                    # included, refreshed or not.
                    for view in (self.d.mv_daily, self.d.mv_users):
                        assert difference(conn, view) == 0, view.name
                if commit:
                    conn.commit()
                else:
                    conn.rollback()

        @rule(
            rows=st.lists(ROW, min_size=1, max_size=8),
            zone=st.sampled_from(["UTC", "Asia/Tokyo", "America/Los_Angeles"]),
        )
        def insert(self, rows: list[tuple[int, int, int, str, int]], zone: str) -> None:
            values = [
                {"created_at": at(day, hour), "user_id": u, "kind": k, "amount": a}
                for day, hour, u, k, a in rows
            ]
            self.write(self.d.events.insert().values(values), zone=zone)

        @rule(user=USERS, day=DAYS, hour=HOURS)
        def move_between_days(self, user: int, day: int, hour: int) -> None:
            events = self.d.events
            self.write(
                events.update().where(events.c.user_id == user).values(created_at=at(day, hour))
            )

        @rule(user=USERS, to=USERS, kind=KINDS)
        def move_between_users(self, user: int, to: int, kind: str) -> None:
            events = self.d.events
            self.write(
                events.update()
                .where(events.c.user_id == user, events.c.kind == kind)
                .values(user_id=to, amount=events.c.amount + 1)
            )

        @rule(day=DAYS, user=USERS)
        def delete(self, day: int, user: int) -> None:
            events = self.d.events
            self.write(
                events.delete().where(
                    sa.or_(events.c.user_id == user, events.c.created_at < at(day, 0))
                )
            )

        @rule(rows=st.lists(ROW, min_size=1, max_size=3))
        def rolled_back(self, rows: list[tuple[int, int, int, str, int]]) -> None:
            values = [
                {"created_at": at(day, hour), "user_id": u, "kind": k, "amount": a}
                for day, hour, u, k, a in rows
            ]
            self.write(self.d.events.insert().values(values), commit=False)

        @rule()
        def truncate(self) -> None:
            self.write(sa.text("TRUNCATE events"))

        @rule(which=st.sampled_from(["both", "daily", "users"]))
        def refresh(self, which: str) -> None:
            views = {
                "both": [self.d.mv_daily, self.d.mv_users],
                "daily": [self.d.mv_daily],
                "users": [self.d.mv_users],
            }[which]
            results = refresh_views(engine, *views)
            assert [r.status for r in results] == ["refreshed"] * len(views), results
            with engine.connect() as conn:
                for view in views:
                    assert difference(conn, view) == 0, view.name

    return IncrementalMachine


@pytest.mark.slow
def test_incremental_refresh_is_exact(engine):
    run_state_machine_as_test(
        machine_for(engine),
        settings=settings(
            max_examples=40,
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
        ),
    )
