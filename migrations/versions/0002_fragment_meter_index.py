"""Index (meter, ts) on every worker fragment, for per-meter time-range queries.

Revision ID: 0002
Revises: 0001
Create Date: 2025-01-01
"""

from __future__ import annotations

from psycopg import sql

from orchestrator.elastic.migrate import fleet, shard_table

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def _index(shard: str) -> sql.Identifier:
    # Named after the fragment so moves and splits can copy it (shardops.copy_indexes renames it).
    return sql.Identifier(f"{shard}_meter_ts_idx")


def upgrade() -> None:
    fleet().on_fragments(lambda shard: sql.SQL("CREATE INDEX {} ON {} (meter, ts)").format(_index(shard), shard_table(shard)))


def downgrade() -> None:
    fleet().on_fragments(lambda shard: sql.SQL("DROP INDEX {}.{}").format(sql.Identifier("bsdata"), _index(shard)))
