"""The scheduler's domain: jobs, their states and rules (pure: no I/O)."""
