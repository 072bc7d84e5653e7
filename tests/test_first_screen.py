"""The first screen: a command's console holds no warning that the run did not cause. Nothing quantizes, so
bitsandbytes is never imported (on CPUs with AVX-512 BF16 its import looks a kernel up on the Hub and warns);
DeepSpeed, which accelerate imports whenever it is installed, stays silent about falling back to the CPU; and
Trainer gets transformers' current argument names."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings

import pytest
from conftest import compose_run

# What other libraries print on their own account; none of it concerns a run that quantizes nothing and uses
# no DeepSpeed.
NOISE = ("publisher trust", "Setting accelerator to CPU", "FutureWarning", "is deprecated and will be removed",
         "is_gradient_checkpointing")
UNUSED_LIBRARIES = ("bitsandbytes",)
PLAN = ("model=llava16_mistral_7b", "freeze=lora_llm", "quant=nf4", "train=rtx4090_qlora")
TRAIN = ("world=test", "model=tiny_random", "train=cpu_tiny", "train.max_steps=2", "train.save_steps=100",
         "train.progress=false", "eval.max_questions=8")


def command(module: str, *overrides: str) -> subprocess.CompletedProcess:
    """`python -m MODULE OVERRIDES` with `-X importtime`, so that stderr also lists every module it imported."""
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", module, *overrides], env=dict(os.environ),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def console(out: subprocess.CompletedProcess) -> str:
    """What the user sees: stdout and stderr without the import-time lines."""
    return out.stdout + "".join(line for line in out.stderr.splitlines(keepends=True)
                                if not line.startswith("import time:"))


def imported(out: subprocess.CompletedProcess) -> set[str]:
    return {line.rsplit("|", 1)[1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}


def assert_first_screen_clean(out: subprocess.CompletedProcess) -> None:
    screen = console(out)
    assert [n for n in NOISE if n in screen] == [], screen[-3000:]
    # a library's logger warning under Hydra's format, or a Python warning: only vlmablate's own may appear
    foreign = [line for line in screen.splitlines()
               if re.search(r"\[WARNING\]", line) and not re.search(r"\]\[vlmablate[.\]]", line)]
    assert foreign == [] and not re.search(r"\w+Warning: ", screen), screen[-3000:]
    modules = imported(out)
    assert [m for m in UNUSED_LIBRARIES if m in modules] == []


@pytest.mark.slow
def test_plan_prints_its_plan_and_nothing_else(tmp_path):
    out = command("vlmablate.plan", *PLAN, f"hydra.run.dir={tmp_path}")
    assert_first_screen_clean(out)
    assert out.stderr.count("import time:") > 100  # the import list is there: the check above saw it
    assert "frozen vision + LoRA LLM     nf4         62,926,848" in out.stdout


@pytest.mark.slow
def test_a_training_run_prints_only_its_own_story(tmp_path):
    out = command("vlmablate", *TRAIN, f"hydra.run.dir={tmp_path / 'run'}")
    assert_first_screen_clean(out)
    screen = console(out)
    assert "[TRAINABLE]" in screen and f"run directory: {tmp_path / 'run'}" in screen
    # a single run writes no comparison: the report callback acts only when a multirun ends
    assert not list((tmp_path / "run").glob("comparison*"))
    # the other entry points a user meets next: evaluating the run again, and checking the data
    again = command("vlmablate.eval", f"run_dir={tmp_path / 'run'}", "world=test", "eval=mmbench_fast",
                    "eval.max_questions=8", "train.progress=false", f"hydra.run.dir={tmp_path / 'eval-log'}")
    assert_first_screen_clean(again)
    check = command("vlmablate.data.check", *TRAIN, f"hydra.run.dir={tmp_path / 'check'}")
    assert_first_screen_clean(check)
    assert (tmp_path / "check" / "data_check.json").exists()


@pytest.mark.parametrize("checkpointing", [False, True])
def test_trainer_arguments_use_transformers_current_names(tmp_path, checkpointing):
    from vlmablate.train.runner import training_arguments

    cfg, _ = compose_run("model=tiny_random", "train=cpu_tiny", f"train.gradient_checkpointing={checkpointing}")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        args = training_arguments(cfg, tmp_path)
    assert args.gradient_checkpointing is checkpointing
    assert getattr(args, "activation_checkpointing", checkpointing) is checkpointing


def test_lora_on_a_model_that_quantizes_nothing_leaves_bitsandbytes_unimported():
    # in a fresh interpreter: this test session may have imported bitsandbytes for a quantized run already
    script = """
import sys
from conftest import compose_run
from vlmablate.plan import count_cell
table, _ = count_cell(compose_run("model=llava16_mistral_7b", "freeze=lora_llm", "vision=frozen")[0])
print(table["components"]["llm"]["lora"], "bitsandbytes" in sys.modules)
"""
    tests = os.path.dirname(__file__)
    out = subprocess.run([sys.executable, "-c", script], cwd=tests, env={**os.environ, "PYTHONPATH": tests},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["41943040", "False"]  # LoRA r=16 on every linear of Mistral 7B, as plan counts
