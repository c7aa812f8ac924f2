"""Wiring of the config-admin server: ``build_app(settings) -> App``.

Used by ``python -m crm_ctl serve-config-admin`` (also ``crmctl serve-config-admin``) and
the tests (in-process on port 0)::

    app = build_app(ConfigAdminSettings(port=0, metrics_port=-1, etcd_endpoints=...))
    async with app:
        await app.wait_ready(10)    # etcd answers
        channel = grpc.aio.insecure_channel(app.target)

Health, reflection, metrics, request ids, error mapping and the graceful stop come from
crm_common's GrpcServer / ServiceApp. Building does no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

from crm.config.v1 import config_pb2, config_pb2_grpc
from crm_common.app import ServiceApp
from crm_common.metrics import RpcMetrics
from crm_common.server import GrpcServer

from crm_ctl.api import ConfigAdminServicer
from crm_ctl.config import ConfigAdmin
from crm_ctl.settings import ConfigAdminSettings

__all__ = ["SERVICE_NAME", "App", "build_app"]

SERVICE_NAME: str = config_pb2.DESCRIPTOR.services_by_name["ConfigAdminService"].full_name


@dataclass
class App(ServiceApp):
    """The assembled config-admin server."""

    settings: ConfigAdminSettings
    admin: ConfigAdmin
    server: GrpcServer


def build_app(settings: ConfigAdminSettings) -> App:
    """Assemble the server from its settings (no I/O)."""
    admin = ConfigAdmin.connect(
        settings.etcd_endpoints, settings.config_prefix, settings.history_limit
    )
    server = GrpcServer(
        [SERVICE_NAME],
        settings,
        [(config_pb2_grpc.add_ConfigAdminServiceServicer_to_server, ConfigAdminServicer(admin))],
        readiness_checks={"etcd": admin.ping},
        metrics=RpcMetrics("config_admin"),
    )
    server.on_stop.append(admin.close)
    return App(settings=settings, admin=admin, server=server)
