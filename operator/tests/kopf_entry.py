"""The operator as the tests run it: every handler of crm_operator plus a login handler
pointing kopf at the Kubernetes API stand-in (its URL in CRM_TEST_KUBE_URL)."""

import os
from typing import Any

import kopf
from crm_operator.handlers import register

register(kopf.get_default_registry())


@kopf.on.login()
def login(**_: Any) -> kopf.ConnectionInfo:
    return kopf.ConnectionInfo(server=os.environ["CRM_TEST_KUBE_URL"], insecure=True)
