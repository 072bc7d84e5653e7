"""Retention on lm-evaluation-harness tasks: the LM's text benchmarks (MMLU, HellaSwag...) before and after stage 2.

An optional extra (`pip install "vlmablate[lmeval]"`). The tasks named in `eval.retention.lm_eval_tasks` run
through lm-eval's own API, `lm_eval.simple_evaluate` on its Hugging Face wrapper `HFLM`, twice: on the base LM
("before": the model as loaded, any LoRA adapter switched off) and on the trained cell ("after"). lm-eval does
all the prompting and scoring; this module only hands it the LM and compares the two results.

The LM lm-eval sees is the Llava model's text path: a causal-LM object of the LM's own class (built on the meta
device, so it holds no weights of its own) whose decoder and head are the Llava model's `language_model` and
`lm_head` modules themselves. No weight is copied; a LoRA adapter inside them is switched off for "before"
exactly as `retention.item_losses(..., base=True)` does. No image is ever seen.

"Before" is computed once per base, task set and settings, and cached under the cache root like the loss
probe's (eval/retention.py), with the per-document scores, so that a frozen LLM's difference is exactly 0 and
the difference gets a paired bootstrap interval over documents.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vlmablate.errors import ConfigError
from vlmablate.eval.metrics import bootstrap_ci
from vlmablate.eval.retention import kept_modes, text_lm

log = logging.getLogger(__name__)

LM_EVAL_RETENTION_VERSION = 1  # bump when how tasks are run changes: cached "before" results then recompute
INSTALL = 'pip install "vlmablate[lmeval]"'
MEASURED = ("lm-evaluation-harness {version} task(s) {tasks} ({shots}, {limit}) on the LM's text path, no image, "
            "no chat template, scored by lm-eval itself; before = the base LM as loaded (LoRA off), after = the "
            "trained cell; difference = after - before per metric (for a metric where higher is better, negative: "
            "forgetting); stderr: lm-eval's; ci: 95% paired bootstrap over documents")
_SUFFIX = ",none"  # lm-eval names a metric "metric,filter"; most tasks have the one filter "none"


def lm_eval_module():
    """The `lm_eval` package, or a ConfigError saying how to install it."""
    try:
        import lm_eval
    except ImportError:
        raise ConfigError("eval.retention.lm_eval_tasks names lm-eval tasks but lm-eval is not installed; install "
                          f"it with: {INSTALL}") from None
    return lm_eval


# --- the tasks --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _task_manager(include_path: str | None, include_defaults: bool):
    """One lm-eval TaskManager per (include path, defaults): indexing lm-eval's own tasks reads thousands of YAMLs."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=include_defaults)


def task_manager(tasks: list[str], include_path: str | None):
    """The TaskManager that knows `tasks`: the include path alone where it holds all of them (fast: lm-eval's
    thousands of own tasks are not indexed), else lm-eval's own tasks with the include path added."""
    lm_eval_module()
    if include_path is not None:
        local = _task_manager(str(include_path), False)
        if all(local.match_tasks([name]) for name in tasks):
            return local
    return _task_manager(None if include_path is None else str(include_path), True)


def check_tasks(tasks: list[str], include_path: str | None) -> None:
    """Raise a ConfigError naming every task lm-eval does not know, and where it looked."""
    lm_eval = lm_eval_module()
    manager = task_manager(tasks, include_path)
    unknown = [name for name in tasks if not manager.match_tasks([name])]
    if unknown:
        where = f"lm-eval {lm_eval.__version__}'s own tasks" + (
            f" and eval.retention.lm_eval_include_path={include_path}" if include_path else
            " (no eval.retention.lm_eval_include_path given for tasks of your own)")
        listing = "lm-eval ls tasks" + (f" --include_path {include_path}" if include_path else "")
        raise ConfigError(f"eval.retention.lm_eval_tasks: unknown lm-eval task(s) {unknown}: not found in {where}; "
                          f"list the known ones with `{listing}`")


# --- the model --------------------------------------------------------------------------------------


@contextlib.contextmanager
def _kept_state(model):
    """Put back, after lm-eval, each module's train/eval mode and the random number generators' states: lm-eval
    seeds them, and training must draw the same numbers whether or not lm-eval ran before it."""
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with kept_modes(model), torch.random.fork_rng(
                devices=range(torch.cuda.device_count()) if torch.cuda.is_available() else []):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def run_tasks(model, tokenizer, cfg, *, base: bool = False) -> dict:
    """lm-eval's results for `cfg.lm_eval_tasks` (`cfg`: `eval.retention`) on the model's text path; `base`: with
    LoRA switched off. Returns {"results": {task: {metric: value, metric_stderr: value}}, "docs": {task: {metric:
    [per-document score, by document id]}}, "n": {task: documents}, "higher_is_better": {task: {metric: bool}}}."""
    lm_eval = lm_eval_module()
    from lm_eval.models.huggingface import HFLM

    manager = task_manager(list(cfg.lm_eval_tasks), cfg.lm_eval_include_path)
    adapters_off = getattr(model, "disable_adapter", None) if base else None
    # lm-eval may give the tokenizer a pad token: the run's own tokenizer stays as it is
    tokenizer = copy.deepcopy(tokenizer)
    with _kept_state(model), (adapters_off() if callable(adapters_off) else contextlib.nullcontext()):
        lm = HFLM(pretrained=text_lm(model), tokenizer=tokenizer, batch_size=cfg.lm_eval_batch_size)
        out = lm_eval.simple_evaluate(model=lm, tasks=list(cfg.lm_eval_tasks), task_manager=manager,
                                      num_fewshot=cfg.lm_eval_num_fewshot, limit=cfg.lm_eval_limit,
                                      batch_size=cfg.lm_eval_batch_size, log_samples=True, bootstrap_iters=1000)
    return {"results": {task: _metrics(out["results"].get(task, {})) for task in cfg.lm_eval_tasks},
            "docs": {task: _doc_scores(samples) for task, samples in out.get("samples", {}).items()},
            "n": {task: out.get("n-samples", {}).get(task, {}).get("effective") for task in cfg.lm_eval_tasks},
            "higher_is_better": {task: {_name(k): v for k, v in out.get("higher_is_better", {}).get(task, {}).items()}
                                 for task in cfg.lm_eval_tasks},
            "lm_eval_version": lm_eval.__version__}


def _name(key: str) -> str:
    return key[:-len(_SUFFIX)] if key.endswith(_SUFFIX) else key


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _metrics(row: dict) -> dict:
    """A task's (or group's) metrics as lm-eval reports them, `acc,none` named `acc`; "N/A" stderr as None."""
    out = {}
    for key, value in row.items():
        if "," not in key:  # alias, name, sample_len
            continue
        name = _name(key)
        if key.partition(",")[0].endswith("_stderr"):
            out[name] = _number(value)
        elif _number(value) is not None:
            out[name] = float(value)
    return out


def _doc_scores(samples: list[dict]) -> dict:
    """Each metric's per-document score, in order of document id, where lm-eval logs a number per document."""
    rows: dict[str, dict[int, float]] = {}
    for sample in samples:
        flt = sample.get("filter", "none")
        for metric in sample.get("metrics", []):
            value = _number(sample.get(metric))
            if value is not None:
                rows.setdefault(metric if flt == "none" else f"{metric},{flt}", {})[sample["doc_id"]] = value
    return {name: [scores[i] for i in sorted(scores)] for name, scores in rows.items()}


# --- before and after -------------------------------------------------------------------------------


def lm_eval_result(before: dict, after: dict, *, measured: str, n_boot: int = 1000) -> dict:
    """summary.json's `eval.retention.lm_eval` from the base's and the trained LM's `run_tasks` results: per task
    and metric its before, after, difference (after - before), both stderrs, and the difference's paired
    bootstrap CI where lm-eval logged a score per document of the task itself (not for a group such as `mmlu`,
    whose documents lm-eval logs under its subtasks)."""
    tasks = {}
    for task, metrics in after["results"].items():
        section = {}
        for name, value in metrics.items():
            if name.split(",")[0].endswith("_stderr") or name not in before["results"].get(task, {}):
                continue
            stderr = name.replace(",", "_stderr,", 1) if "," in name else f"{name}_stderr"
            b = before["results"][task][name]
            entry = {"before": b, "after": value, "difference": value - b,
                     "stderr_before": before["results"][task].get(stderr), "stderr_after": metrics.get(stderr),
                     "higher_is_better": after["higher_is_better"].get(task, {}).get(name)}
            docs_b, docs_a = before["docs"].get(task, {}).get(name), after["docs"].get(task, {}).get(name)
            if docs_b is not None and docs_a is not None and len(docs_b) == len(docs_a):
                entry["ci"] = bootstrap_ci(np.subtract(docs_a, docs_b), n_boot=n_boot)
            section[name] = entry
        tasks[task] = {"n": after["n"].get(task), "metrics": section}
    return {"tasks": tasks, "measured": measured}


def describe(cfg, version: str) -> str:
    """What the lm-eval section measured, in words."""
    shots = "tasks' own n-shot" if cfg.lm_eval_num_fewshot is None else f"{cfg.lm_eval_num_fewshot}-shot"
    limit = "all documents" if cfg.lm_eval_limit is None else f"first {cfg.lm_eval_limit} documents per task"
    return MEASURED.format(version=version, tasks=", ".join(cfg.lm_eval_tasks), shots=shots, limit=limit)


def _include_digest(include_path: str | None) -> str | None:
    """The include path's task files, by content: editing a task YAML or its data there recomputes "before"."""
    if include_path is None:
        return None
    digest = hashlib.sha256()
    for path in sorted(Path(include_path).rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(include_path)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


@dataclass
class LmEvalProbe:
    """A run's lm-eval retention: the base's results, taken before training; `measure` runs the trained LM."""

    before: dict
    cached: bool
    before_s: float
    tokenizer: object
    cfg: object  # eval.retention

    @classmethod
    def start(cls, model, tokenizer, cfg, *, identity: dict, cache_dir: Path) -> LmEvalProbe:
        """Read the base's results from the cache, or run the tasks on the base (LoRA off) and cache them."""
        lm_eval = lm_eval_module()
        start = time.perf_counter()
        # Data files outside the include path (and lm-eval's own tasks' data) are named by lm-eval's version and
        # the task names only: a changed data file elsewhere needs the cache entry removed.
        material = {"version": LM_EVAL_RETENTION_VERSION, "lm_eval": lm_eval.__version__, "base": identity,
                    "tasks": list(cfg.lm_eval_tasks), "include": _include_digest(cfg.lm_eval_include_path),
                    "limit": cfg.lm_eval_limit, "num_fewshot": cfg.lm_eval_num_fewshot,
                    "batch_size": cfg.lm_eval_batch_size}
        key = hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()[:16]
        path = Path(cache_dir) / "retention" / f"lm_eval-{key}.json"
        cached = path.exists()
        if cached:
            before = json.loads(path.read_text())["before"]
        else:
            before = run_tasks(model, tokenizer, cfg, base=True)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps({"material": material, "before": before}, default=str))
            os.replace(tmp, path)
        return cls(before, cached, time.perf_counter() - start, tokenizer, cfg)

    def measure(self, model, out_dir: Path, *, n_boot: int = 1000) -> dict:
        """Run the tasks on the trained model; write both results to out_dir/lm_eval.json; return the section."""
        start = time.perf_counter()
        after = run_tasks(model, self.tokenizer, self.cfg)
        result = lm_eval_result(self.before, after, measured=describe(self.cfg, after["lm_eval_version"]),
                                n_boot=n_boot)
        seconds = time.perf_counter() - start
        result.update(seconds=round(self.before_s + seconds, 3), before_cached=self.cached)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "lm_eval.json").write_text(json.dumps({"before": self.before, "after": after}, default=str))
        for task, section in result["tasks"].items():
            for name, m in section["metrics"].items():
                log.info("retention, lm-eval %s %s: %.4f -> %.4f (difference %+.4f)", task, name, m["before"],
                         m["after"], m["difference"])
        log.info("retention, lm-eval: %.2f s (before: %s, %.2f s; after: %.2f s)", result["seconds"],
                 "cached" if self.cached else "computed", self.before_s, seconds)
        return result
