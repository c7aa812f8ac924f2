"""crmctl (a CLI for ops and developers) and the config-admin service (crm.config.v1).

- :mod:`crm_ctl.config`: the config-admin library over etcd (reusing the operator's
  ``ConfigStore`` and schema validation), used by both the gRPC service and the CLI;
- :mod:`crm_ctl.api` / :mod:`crm_ctl.app`: the ``ConfigAdminService`` gRPC server;
- :mod:`crm_ctl.cli`: ``crmctl``.
"""
