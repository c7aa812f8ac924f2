"""The pump: moves due jobs from MySQL to the worker queue and re-sends jobs whose
lease expired (``python -m crm_scheduler pump``)."""
