"""``python -m crm_operator``: run the operator (kopf) with settings from CRM_OPERATOR_*.

``python -m crm_operator manifests [DIR]`` writes the CRDs and RBAC instead.

One replica by default (kopf ``--standalone``; Deployment strategy Recreate), because two
operators would both write etcd and patch status. Set CRM_OPERATOR_PEERING to a peering name
to run several replicas with kopf peering (one active, the others on standby).
"""

from __future__ import annotations

import sys
from pathlib import Path

import kopf
from crm_common.logs import configure_logging

from crm_operator.handlers import register
from crm_operator.manifests import write_all
from crm_operator.settings import OperatorSettings

__all__ = ["main"]


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["manifests"]:
        root = Path(args[1]) if len(args) > 1 else Path(__file__).resolve().parents[2]
        for path in write_all(root):
            print(path)
        return
    settings = OperatorSettings()
    configure_logging("operator", settings.log_level)
    registry = kopf.OperatorRegistry()
    register(registry, lambda: settings)
    namespaces = settings.namespace_list
    kopf.run(
        registry=registry,
        standalone=not settings.peering,
        peering_name=settings.peering or None,
        clusterwide=not namespaces,
        namespaces=namespaces,
        liveness_endpoint=settings.liveness_endpoint or None,
    )


if __name__ == "__main__":
    main()
