"""Health names of the pump and the workers; their health-only servers are the shared
kit's (:mod:`crm_common.health`).

The pump serves health on ``pump_health_port`` (name :data:`PUMP_HEALTH_SERVICE`), a
worker on ``worker_health_port`` (:data:`WORKER_HEALTH_SERVICE`); ``""`` answers too.
Both report NOT_SERVING until MySQL and Redis answer, like every CRM server, so a
Kubernetes ``grpc`` probe works. A Celery worker owns its main thread, so it runs the
server with :class:`~crm_common.health.HealthThread`.
"""

from __future__ import annotations

__all__ = ["PUMP_HEALTH_SERVICE", "WORKER_HEALTH_SERVICE"]

PUMP_HEALTH_SERVICE = "crm.scheduler.v1.Pump"
"""Health service name of the pump (no RPCs besides health)."""
WORKER_HEALTH_SERVICE = "crm.scheduler.v1.Worker"
"""Health service name of a worker (no RPCs besides health)."""
