"""`python -m crm_devstack up|down|env`: manage the local stack from the Makefile."""

from __future__ import annotations

import argparse
import sys

from crm_devstack.stack import StackError, down, up


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="crm-devstack", description=__doc__)
    ap.add_argument("command", choices=["up", "down", "env"])
    args = ap.parse_args(argv)
    try:
        if args.command == "down":
            down()
            print("stack: etcd and Tansu stopped (MariaDB and Redis left running)")
            return 0
        stack = up()
    except StackError as exc:
        print(f"stack: {exc}", file=sys.stderr)
        return 1
    if args.command == "env":
        for k, v in stack.env().items():
            print(f"export {k}={v}")
    else:
        print(
            f"stack: MariaDB {stack.mysql_host}:{stack.mysql_port}, Redis {stack.redis_url}, "
            f"etcd {stack.etcd_endpoint}, Tansu {stack.kafka_bootstrap}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
