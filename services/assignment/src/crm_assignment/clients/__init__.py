"""Clients of other services (and the interim stand-ins until those services exist)."""
