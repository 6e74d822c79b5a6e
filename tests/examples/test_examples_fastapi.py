"""The FastAPI example serves the dashboard from the view, and its worker keeps it fresh."""

from __future__ import annotations

import datetime as dt
import importlib
import time
from pathlib import Path
from types import ModuleType

import pytest
import sqlalchemy as sa

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def example(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(ROOT))
    return importlib.import_module("examples.fastapi_dashboard.app")


def _wait_for(client: TestClient, predicate: object, timeout: float = 20.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        rows = client.get("/dashboard").json()
        if predicate(rows):  # type: ignore[operator]
            return rows  # type: ignore[no-any-return]
        if time.monotonic() > deadline:
            pytest.fail(f"dashboard never satisfied the condition; last: {rows}")
        time.sleep(0.05)


def test_dashboard_is_served_from_the_view_and_refreshed_by_the_worker(
    example: ModuleType, pg_url: sa.URL, engine: sa.Engine
) -> None:
    app = example.create_app(pg_url, debounce=0.1, max_delay=1.0, interval=None)
    with TestClient(app) as client:
        assert client.get("/dashboard").json() == []
        for event in (
            {"user_id": 1, "kind": "view"},
            {"user_id": 1, "kind": "purchase", "amount": "19.99"},
            {"user_id": 2, "kind": "purchase", "amount": "5.01"},
        ):
            response = client.post("/events", json=event)
            assert response.status_code == 201, response.text

        rows = _wait_for(client, lambda rows: rows and rows[0]["events"] == 3)
        today = dt.datetime.now(dt.timezone.utc).astimezone().date()
        assert len(rows) == 1
        assert rows[0]["unique_users"] == 2
        assert float(rows[0]["revenue"]) == 25.0
        assert abs((dt.date.fromisoformat(rows[0]["day"]) - today).days) <= 1

        refreshes = client.get("/refreshes").json()
        assert any(
            r["view"] == "public.mv_dashboard" and r["status"] == "refreshed" and r["concurrently"]
            for r in refreshes
        )

        # The dashboard really reads the view: it is a snapshot until the next refresh.
        with engine.begin() as conn:
            conn.execute(sa.text("ALTER TABLE events DISABLE TRIGGER USER"))
            conn.execute(sa.text("INSERT INTO events (user_id, kind) VALUES (3, 'view')"))
            conn.execute(sa.text("ALTER TABLE events ENABLE TRIGGER USER"))
        assert client.get("/dashboard").json()[0]["events"] == 3

        response = client.post("/events", json={"user_id": 4, "kind": "click"})
        assert response.status_code == 201
        results = client.post("/refresh").json()
        assert [r["status"] for r in results] in (["refreshed"], ["skipped_fresh"])
        _wait_for(client, lambda rows: rows[0]["events"] == 5)

        bad = client.post("/events", json={"user_id": 1, "kind": "teleport"})
        assert bad.status_code == 422
