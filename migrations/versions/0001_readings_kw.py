"""Add kw (mean power over the interval) to readings: coordinator parent and every worker fragment.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

from alembic import op
from psycopg import sql

from orchestrator.elastic.migrate import fleet, shard_table

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    # The coordinator's ALTER recurses into its foreign partitions (their local definitions);
    # each worker's ALTER recurses into the fragment's time partitions.
    op.execute("ALTER TABLE public.readings ADD COLUMN kw double precision")
    fleet().on_fragments(lambda shard: sql.SQL("ALTER TABLE {} ADD COLUMN kw double precision").format(shard_table(shard)))


def downgrade() -> None:
    fleet().on_fragments(lambda shard: sql.SQL("ALTER TABLE {} DROP COLUMN kw").format(shard_table(shard)))
    op.execute("ALTER TABLE public.readings DROP COLUMN kw")
