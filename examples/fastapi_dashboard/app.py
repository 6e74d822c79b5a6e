"""A FastAPI application serving a dashboard from a materialized view.

Reads never touch ``events``: ``GET /dashboard`` selects from ``mv_dashboard``. Writes go to
``events``; change tracking marks the view stale, and the :class:`RefreshWorker` started in
the application's lifespan refreshes it concurrently a moment later (``debounce`` seconds
of quiet, at most ``max_delay`` after the first change). Run several instances: the
advisory locks let only one refresh at a time.

Run it::

    pip install 'sqlalchemy-matview[cli]' fastapi uvicorn
    export DATABASE_URL=postgresql+psycopg://app@localhost/app
    uvicorn examples.fastapi_dashboard.app:app

In production the tables and the view come from your Alembic migrations; this example
creates them at start-up (``create_all`` is idempotent) to stay self-contained.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from decimal import Decimal
from typing import Annotated, Any, Literal

import sqlalchemy as sa
from fastapi import Depends, FastAPI, Request
from pydantic import BaseModel, Field

from sqlalchemy_matview import RefreshResult, RefreshWorker, refresh_stale

from .models import events, metadata, mv_dashboard


def get_engine(request: Request) -> sa.Engine:
    """The application's engine, made in the lifespan."""
    engine: sa.Engine = request.app.state.engine
    return engine


EngineDep = Annotated[sa.Engine, Depends(get_engine)]


class DayOut(BaseModel):
    day: dt.date
    events: int
    unique_users: int
    revenue: Decimal


class EventIn(BaseModel):
    user_id: int
    kind: Literal["view", "click", "purchase"]
    amount: Decimal | None = Field(default=None, ge=0)


class RefreshOut(BaseModel):
    view: str
    status: str
    concurrently: bool
    duration: float


def create_app(
    database_url: str | sa.URL | None = None,
    *,
    debounce: float = 1.0,
    max_delay: float = 10.0,
    interval: float | None = 300.0,
) -> FastAPI:
    """Build the application; ``database_url`` defaults to ``$DATABASE_URL``."""
    url = database_url if database_url is not None else os.environ["DATABASE_URL"]

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = sa.create_engine(url, pool_pre_ping=True)
        metadata.create_all(engine)
        recent: list[RefreshResult] = []
        worker = RefreshWorker(
            engine,
            metadata,
            debounce=debounce,
            max_delay=max_delay,
            interval=interval,
            on_result=lambda result: recent.append(result),
        )
        worker.start()
        app.state.engine = engine
        app.state.refreshes = recent
        try:
            yield
        finally:
            worker.stop()
            engine.dispose()

    app = FastAPI(title="Dashboard", lifespan=lifespan)

    # Plain `def` endpoints: FastAPI runs them in a thread pool, fine for a sync engine.
    @app.get("/dashboard", response_model=list[DayOut])
    def dashboard(engine: EngineDep, days: int = 30) -> list[Any]:
        query = sa.select(mv_dashboard.table).order_by(mv_dashboard.c.day.desc()).limit(days)
        with engine.connect() as conn:
            return [row._asdict() for row in conn.execute(query)]

    @app.post("/events", status_code=201)
    def add_event(event: EventIn, engine: EngineDep) -> dict[str, int]:
        with engine.begin() as conn:
            new_id = conn.execute(
                events.insert().returning(events.c.id), event.model_dump()
            ).scalar_one()
        return {"id": new_id}

    @app.post("/refresh", response_model=list[RefreshOut])
    def refresh_now(engine: EngineDep) -> list[Any]:
        """Refresh what is stale right now (the worker would, after its debounce)."""
        return [
            RefreshOut(
                view=r.view, status=r.status, concurrently=r.concurrently, duration=r.duration
            )
            for r in refresh_stale(engine, metadata)
        ]

    @app.get("/refreshes", response_model=list[RefreshOut])
    def refreshes(request: Request) -> list[Any]:
        """What the background worker did, most recent last."""
        return [
            RefreshOut(
                view=r.view, status=r.status, concurrently=r.concurrently, duration=r.duration
            )
            for r in request.app.state.refreshes[-50:]
        ]

    return app


def __getattr__(name: str) -> Any:
    # `uvicorn examples.fastapi_dashboard.app:app` builds the app from $DATABASE_URL on
    # first access, so importing this module (in tests) needs no database.
    if name == "app":
        return create_app()
    raise AttributeError(name)
