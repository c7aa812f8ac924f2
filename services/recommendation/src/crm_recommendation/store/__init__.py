"""Persistence of the recommendation service (SQLAlchemy 2, MySQL/MariaDB, synchronous)."""

from crm_common.db import make_engine

from crm_recommendation.store.repository import RecommendationStore

__all__ = ["RecommendationStore", "make_engine"]
