"""Helpers shared by the orchestration tests: a small schema of sources and views."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from sqlalchemy_matview import MaterializedView


@dataclass
class Shop:
    metadata: sa.MetaData
    orders: sa.Table
    mv_totals: MaterializedView
    mv_top: MaterializedView


def build_shop(*, track: bool = True, unique: bool = True) -> Shop:
    """orders -> mv_totals (per customer) -> mv_top (customers above 100)."""
    md = sa.MetaData()
    orders = sa.Table(
        "orders",
        md,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("customer", sa.Integer, nullable=False),
        sa.Column("amount", sa.Integer, nullable=False),
    )
    totals = sa.select(orders.c.customer, sa.func.sum(orders.c.amount).label("total")).group_by(
        orders.c.customer
    )
    mv_totals = MaterializedView(
        "mv_totals",
        md,
        totals,
        columns=[sa.Column("total", sa.BigInteger)],
        unique_key="customer" if unique else None,
        track_changes=track,
    )
    mv_top = MaterializedView(
        "mv_top",
        md,
        sa.select(mv_totals.c.customer, mv_totals.c.total).where(mv_totals.c.total > 100),
        unique_key="customer" if unique else None,
    )
    return Shop(md, orders, mv_totals, mv_top)


@pytest.fixture
def shop(engine: Engine) -> Shop:
    s = build_shop()
    s.metadata.create_all(engine)
    return s


def rows(engine: Engine, view: MaterializedView) -> list[tuple[object, ...]]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.select(view.table).order_by(*view.table.c))]


@pytest.fixture
def view_rows() -> Callable[[Engine, MaterializedView], list[tuple[object, ...]]]:
    return rows


def wait_for(predicate: Callable[[], bool], timeout: float = 60.0) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` passes; its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def failing_view(engine: Engine, metadata: sa.MetaData, name: str) -> MaterializedView:
    """A view created WITH NO DATA whose refresh fails (division by zero), on ``metadata``."""
    divisors = sa.Table(f"{name}_divisors", metadata, sa.Column("d", sa.Integer))
    view = MaterializedView(
        name, metadata, sa.select((sa.literal(1) / divisors.c.d).label("r")), with_data=False
    )
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(divisors.insert(), [{"d": 0}])
    return view
