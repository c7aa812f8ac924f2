"""Root conftest: shared fixtures over the real local stack (see crm_devstack)."""

pytest_plugins = ["crm_devstack.pytest_plugin"]
