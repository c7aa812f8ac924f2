"""``python -m crm_ctl ...``: the same as ``crmctl ...`` (``serve-config-admin`` included)."""

from crm_ctl.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
