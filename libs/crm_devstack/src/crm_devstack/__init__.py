"""Local stack for tests, demo and bench (see crm_devstack.stack)."""

from crm_devstack.stack import (
    Proc,
    Stack,
    StackError,
    create_database,
    down,
    drop_database,
    ensure_mariadb,
    ensure_redis,
    free_port,
    mysql_url,
    port_open,
    start_etcd,
    start_tansu,
    up,
    wait_until,
)

__all__ = [
    "Proc",
    "Stack",
    "StackError",
    "create_database",
    "down",
    "drop_database",
    "ensure_mariadb",
    "ensure_redis",
    "free_port",
    "mysql_url",
    "port_open",
    "start_etcd",
    "start_tansu",
    "up",
    "wait_until",
]
