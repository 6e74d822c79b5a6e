"""ORM mapping, read-only behaviour and refresh through Session / AsyncSession."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, foreign, mapped_column, relationship

from sqlalchemy_matview import MaterializedView, ReadOnlyMaterializedViewError, refresh


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]


class Order(Base):
    __tablename__ = "orders"
    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(sa.ForeignKey("users.id"))
    total: Mapped[int]


orders = Order.__table__
user_totals = MaterializedView(
    "mv_user_totals",
    Base.metadata,
    sa.select(
        orders.c.user_id,
        sa.cast(sa.func.sum(orders.c.total), sa.Integer).label("total"),
        sa.cast(sa.func.count(), sa.Integer).label("orders"),
    ).group_by(orders.c.user_id),
    unique_key="user_id",
)


class UserTotal(Base):
    __table__ = user_totals.table
    user: Mapped[User] = relationship(
        primaryjoin=lambda: foreign(user_totals.c.user_id) == User.id, viewonly=True
    )


@pytest.fixture
def db(engine: Engine) -> Engine:
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        session.add_all([User(id=1, name="ada"), User(id=2, name="bob")])
        session.flush()
        session.add_all([Order(id=i, user_id=1 + i % 2, total=10 * i) for i in range(1, 5)])
        session.commit()
    return engine


def test_typed_orm_access_with_relationship(db: Engine) -> None:
    with Session(db) as session:
        session.execute(refresh(UserTotal))
        rows = session.scalars(sa.select(UserTotal).order_by(UserTotal.user_id)).all()
        assert [(r.user_id, r.total, r.orders, r.user.name) for r in rows] == [
            (1, 60, 2, "ada"),
            (2, 40, 2, "bob"),
        ]


def test_session_refresh_flushes_pending_changes_first(db: Engine) -> None:
    with Session(db) as session:
        session.add(Order(id=99, user_id=1, total=1000))  # pending, not flushed
        session.execute(refresh(user_totals))
        total = session.scalar(sa.select(UserTotal.total).where(UserTotal.user_id == 1))
        assert total == 1060
        session.rollback()
    with Session(db) as session:  # the refresh was part of the rolled back transaction
        assert session.scalar(sa.select(UserTotal.total).where(UserTotal.user_id == 1)) is None


@pytest.mark.parametrize("change", ["insert", "update", "delete"])
def test_orm_writes_to_a_view_fail_before_any_sql(db: Engine, change: str) -> None:
    statements: list[str] = []
    sa.event.listen(db, "before_cursor_execute", lambda *a: statements.append(a[2]))
    with Session(db) as session:
        session.execute(refresh(user_totals, concurrently=False))
        row = session.scalars(sa.select(UserTotal).where(UserTotal.user_id == 1)).one()
        session.add(Order(id=50, user_id=2, total=5))  # a legitimate change in the same flush
        if change == "insert":
            session.add(UserTotal(user_id=3, total=0, orders=0))
        elif change == "update":
            row.total = 0
        else:
            session.delete(row)
        statements.clear()
        with pytest.raises(ReadOnlyMaterializedViewError, match="mv_user_totals"):
            session.flush()
        assert statements == []


def test_session_refresh_flushes_where_sqlalchemy_would_not(
    db: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The library flushes before a refresh itself, not only through SQLAlchemy's autoflush.

    SQLAlchemy 2.1 autoflushes before every statement a Session executes, 2.0 not before a
    Core one: switching the Session's own autoflush off for the refresh makes 2.1 behave
    like 2.0, so this test holds the library to it on either version.
    """
    with Session(db) as session:
        session.add(Order(id=99, user_id=1, total=1000))  # pending, not flushed
        with monkeypatch.context() as patch:
            patch.setattr(session, "_autoflush", lambda: None)
            session.execute(refresh(user_totals))
            assert not session.new  # flushed by the library, before the REFRESH
        total = session.scalar(sa.select(UserTotal.total).where(UserTotal.user_id == 1))
        assert total == 1060
        session.rollback()


def test_session_refresh_respects_autoflush_off(db: Engine) -> None:
    with Session(db, autoflush=False) as session:
        session.add(Order(id=99, user_id=1, total=1000))
        session.execute(refresh(user_totals))
        assert len(session.new) == 1  # autoflush=False: the caller flushes when it wants
        total = session.scalar(sa.select(UserTotal.total).where(UserTotal.user_id == 1))
        assert total == 60
        session.rollback()


def test_loading_without_changes_is_not_a_write(db: Engine) -> None:
    statements: list[str] = []
    sa.event.listen(db, "before_cursor_execute", lambda *a: statements.append(a[2]))
    with Session(db) as session:
        session.execute(refresh(user_totals))
        rows = session.scalars(sa.select(UserTotal).order_by(UserTotal.user_id)).all()
        rows[0].total = rows[0].total  # same value: not modified
        assert rows[0] in session.dirty and not session.is_modified(rows[0])
        session.add(Order(id=77, user_id=2, total=1))
        statements.clear()
        session.commit()  # not refused: nothing is written to the view
    assert [s.split()[0] for s in statements] == ["INSERT"]
    assert "orders" in statements[0] and "mv_user_totals" not in statements[0]
    with Session(db) as session:
        assert session.get(Order, 77) is not None


@pytest.mark.parametrize("kind", ["insert", "update", "delete"])
def test_core_dml_on_a_view_is_refused(db: Engine, kind: str) -> None:
    statement = {
        "insert": sa.insert(user_totals.table).values(user_id=5, total=1, orders=1),
        "update": sa.update(user_totals.table).values(total=0),
        "delete": sa.delete(user_totals.table),
    }[kind]
    with db.begin() as conn, pytest.raises(ReadOnlyMaterializedViewError, match="refresh"):
        conn.execute(statement)
    with db.begin() as conn:  # ordinary tables are untouched by the guard
        conn.execute(sa.update(orders).values(total=orders.c.total + 1))


def test_async_session_and_connection(db: Engine, async_engine: AsyncEngine) -> None:
    async def main() -> tuple[int | None, int | None]:
        async with AsyncSession(async_engine) as session:
            session.add(Order(id=100, user_id=2, total=1))
            await session.execute(refresh(UserTotal))
            first = await session.scalar(sa.select(UserTotal.total).where(UserTotal.user_id == 2))
            await session.commit()
        async with async_engine.begin() as conn:
            await conn.execute(refresh(user_totals, concurrently=False))
            second = await conn.scalar(sa.select(sa.func.sum(user_totals.c.orders)))
        await async_engine.dispose()
        return first, second

    assert asyncio.run(main()) == (41, 5)


def test_date_typed_view_round_trip(engine: Engine) -> None:
    md = sa.MetaData()
    t = sa.Table("t", md, sa.Column("at", sa.DateTime))
    day = sa.cast(sa.func.date_trunc("day", t.c.at), sa.Date)
    mv = MaterializedView("mv_days", md, sa.select(day.label("day")).distinct(), unique_key="day")
    md.create_all(engine)
    with engine.begin() as conn:
        conn.execute(t.insert(), [{"at": dt.datetime(2026, 3, 1, h)} for h in range(3)])
        conn.execute(refresh(mv))
        assert conn.scalars(sa.select(mv.c.day)).all() == [dt.date(2026, 3, 1)]


def test_guard_leaves_dialect_dml_intact(db: Engine) -> None:
    from sqlalchemy.dialects.postgresql import insert

    upsert = insert(orders).values(id=1, user_id=1, total=7)
    upsert = upsert.on_conflict_do_update(index_elements=[orders.c.id], set_={"total": 7})
    with db.begin() as conn:
        conn.execute(upsert)
        returned = conn.execute(
            sa.update(orders).where(orders.c.id == 1).values(total=8).returning(orders.c.total)
        ).scalar_one()
        conn.execute(
            sa.insert(orders).from_select(
                ["id", "user_id", "total"],
                sa.select(orders.c.id + 1000, orders.c.user_id, orders.c.total),
            )
        )
        copied = conn.scalar(sa.select(sa.func.count()).where(orders.c.id > 1000))
    assert (returned, copied) == (8, 4)
    with db.begin() as conn, pytest.raises(ReadOnlyMaterializedViewError):
        conn.execute(insert(user_totals.table).values(user_id=1).on_conflict_do_nothing())
