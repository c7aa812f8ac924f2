"""Assignment service: clues, customers, tasks, agents, queues and dispatch (see app.py)."""
