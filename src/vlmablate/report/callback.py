"""A Hydra callback that writes the comparison report when a multirun ends (sweeps/*.yaml register it)."""

from __future__ import annotations

import logging
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)


class ReportCallback(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        from vlmablate.report.compare import write_report

        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            result = write_report(sweep_dir)
        except Exception:  # the runs are done and saved; a report can be made again by hand
            log.exception("the sweep's report failed; run `python -m vlmablate.report sweep_dir=%s`", sweep_dir)
            return
        log.info("sweep report: %s", sweep_dir / "comparison.md")
        print((sweep_dir / "comparison.md").read_text())
        if result["wandb_offline"]:
            print("W&B runs were logged offline; upload them with:\n  wandb sync " + " ".join(result["wandb_offline"]))
