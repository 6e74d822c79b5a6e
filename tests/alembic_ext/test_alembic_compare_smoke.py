import sqlalchemy as sa
from sqlalchemy_matview import MaterializedView
from sqlalchemy_matview.compare import compare_views, CreateView


def test_smoke(engine):
    md = sa.MetaData()
    t = sa.Table("t", md, sa.Column("id", sa.Integer, primary_key=True), sa.Column("x", sa.Text))
    mv = MaterializedView("mv", md, sa.select(t.c.id, t.c.x).where(t.c.x.like("%a'b")), unique_key="id")
    with engine.begin() as conn:
        t.create(conn)
        changes = compare_views(conn, md)
        print(changes)
        assert isinstance(changes[0], CreateView)
        md.create_all(conn)
        changes = compare_views(conn, md)
        print(changes)
        assert changes == []
