"""`python -m vlmablate.report sweep_dir=PATH [budgets=24,80GiB,2h] [max_retention_loss=0.05] [n_boot=1000]`:
compare the cells of a sweep (comparison.csv / .md / .json / .png) and decide per budget.

Budgets and the retention limit not given here come from the sweep's `report` block (every run's config
carries one), else 24 GiB and 80 GiB with retention not asked.
"""

from __future__ import annotations

import sys
from pathlib import Path

from vlmablate.report.compare import publish, write_report
from vlmablate.report.decision import parse_budgets, parse_max_retention_loss

USAGE = "usage: python -m vlmablate.report sweep_dir=PATH [budgets=24,80GiB,2h] [max_retention_loss=0.05] [n_boot=1000]"
KEYS = ("sweep_dir", "n_boot", "budgets", "max_retention_loss")


def parse(argv: list[str]) -> dict:
    """`key=value` arguments; budgets and the retention limit parsed (a bad one exits naming it)."""
    args = {}
    for item in argv:
        key, sep, value = item.partition("=")
        if not sep or key not in KEYS:
            raise SystemExit(f"{USAGE}; got {item!r}")
        args[key] = value
    if "sweep_dir" not in args:
        raise SystemExit(USAGE)
    try:
        if "budgets" in args:
            args["budgets"] = parse_budgets(args["budgets"])
        if "max_retention_loss" in args:
            args["max_retention_loss"] = parse_max_retention_loss(args["max_retention_loss"])
    except ValueError as err:
        raise SystemExit(f"{err}\n{USAGE}") from None
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(sys.argv[1:] if argv is None else argv)
    sweep_dir = Path(args["sweep_dir"])
    settings = {key: args[key] for key in ("budgets", "max_retention_loss") if key in args}
    result = write_report(sweep_dir, n_boot=int(args.get("n_boot", 1000)), settings=settings)
    publish(result, sweep_dir, result["logger"])  # the runs' logger: with W&B, the decision goes there too


if __name__ == "__main__":
    main()
