"""Workers: Celery consumers that claim a due job in MySQL, call its target, record the
result (``python -m crm_scheduler worker``)."""
