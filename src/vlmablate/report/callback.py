"""A Hydra callback that writes the comparison report when a multirun ends (conf/config.yaml registers it, so
every multirun of `python -m vlmablate` ends with one; a single run never calls it).

The sweep's `report` block (budgets, max_retention_loss) sets what the report decides on; with
`logger=wandb` the decision also goes to the sweep's W&B group.
"""

from __future__ import annotations

import logging
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def report_settings(config: DictConfig) -> dict:
    """The sweep config's `report` block as `write_report` settings (the schema's defaults where it has none)."""
    from vlmablate.config import ReportConfig
    from vlmablate.report.decision import parse_budgets, parse_max_retention_loss

    block = OmegaConf.to_container(config.report, resolve=True) if "report" in config else {}
    block = {**vars(ReportConfig()), **block}
    return {"budgets": parse_budgets(block["budgets"]),
            "max_retention_loss": parse_max_retention_loss(block["max_retention_loss"])}


class ReportCallback(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        from vlmablate.report.compare import find_runs, publish, write_report

        sweep_dir = Path(config.hydra.sweep.dir)
        if not find_runs(sweep_dir):  # a multirun of another command (plan, data check) trains nothing to compare
            log.info("no training runs below %s: no comparison to write", sweep_dir)
            return
        try:
            result = write_report(sweep_dir, settings=report_settings(config))
        except Exception:  # the runs are done and saved; a report can be made again by hand
            log.exception("the sweep's report failed; run `python -m vlmablate.report sweep_dir=%s`", sweep_dir)
            return
        log.info("sweep report: %s", sweep_dir / "comparison.md")
        logger = OmegaConf.to_container(config.logger, resolve=True) if "logger" in config else None
        publish(result, sweep_dir, logger)
