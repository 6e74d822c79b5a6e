import sqlalchemy as sa
from matview_alembic_helpers import autogenerate, run_code

from sqlalchemy_matview import MaterializedView


def build():
    md = sa.MetaData()
    t = sa.Table("events", md, sa.Column("id", sa.Integer, primary_key=True), sa.Column("kind", sa.Text))
    mv = MaterializedView(
        "mv_kinds", md, sa.select(t.c.kind, sa.func.count().label("n")).group_by(t.c.kind),
        unique_key="kind",
    )
    return md


def test_basic(conn):
    md = build()
    gen = autogenerate(conn, md)
    print(gen.upgrade)
    print("----")
    print(gen.downgrade)
    run_code(conn, gen.upgrade)
    gen2 = autogenerate(conn, md)
    print(gen2.upgrade)
    assert gen2.empty
    run_code(conn, gen.downgrade)
    assert sa.inspect(conn).get_materialized_view_names() == []
