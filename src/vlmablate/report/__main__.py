"""`python -m vlmablate.report sweep_dir=PATH`: compare the cells of a sweep (comparison.csv / .md / .png)."""

from __future__ import annotations

import sys
from pathlib import Path

from vlmablate.report.compare import write_report


def parse(argv: list[str]) -> dict:
    args = {}
    for item in argv:
        key, sep, value = item.partition("=")
        if not sep or key not in ("sweep_dir", "n_boot"):
            raise SystemExit(f"usage: python -m vlmablate.report sweep_dir=PATH [n_boot=1000]; got {item!r}")
        args[key] = value
    if "sweep_dir" not in args:
        raise SystemExit("usage: python -m vlmablate.report sweep_dir=PATH [n_boot=1000]")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(sys.argv[1:] if argv is None else argv)
    sweep_dir = Path(args["sweep_dir"])
    result = write_report(sweep_dir, n_boot=int(args.get("n_boot", 1000)))
    print((sweep_dir / "comparison.md").read_text())
    print(f"written: {sweep_dir / 'comparison.csv'}, {sweep_dir / 'comparison.md'}, {sweep_dir / 'comparison.png'}")
    if result["wandb_offline"]:
        print("W&B runs were logged offline; upload them with:\n  wandb sync " + " ".join(result["wandb_offline"]))


if __name__ == "__main__":
    main()
