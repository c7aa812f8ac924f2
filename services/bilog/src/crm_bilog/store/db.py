"""Engine construction (MySQL/MariaDB through PyMySQL)."""

from __future__ import annotations

from sqlalchemy import Engine, create_engine

__all__ = ["make_engine"]


def make_engine(url: str, pool_size: int) -> Engine:
    """An engine with a bounded pool (the executor is sized like the pool)."""
    return create_engine(
        url,
        pool_size=pool_size,
        max_overflow=0,
        pool_pre_ping=True,
        pool_recycle=1800,
        pool_timeout=30,
        isolation_level="READ COMMITTED",
        connect_args={"connect_timeout": 5, "charset": "utf8mb4"},
    )
