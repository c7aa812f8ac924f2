"""The in-memory serving index (numpy) and its synchronization with the database."""

from crm_recommendation.index.car_index import CarIndex

__all__ = ["CarIndex"]
