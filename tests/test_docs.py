"""The README and docs/ stay true: every documented command composes, every link resolves, and `plan`'s
documented output is what `python -m vlmablate.plan` prints.

Commands are read from the fenced ```bash blocks of README.md and docs/*.md, one shell line at a time
(backslash continuations joined, `&&` chains split, comments dropped). Each `python -m vlmablate ...` line
(also under torchrun, accelerate launch and the deepspeed launcher) is composed with Hydra's compose API,
exactly as `--cfg job` would, turned into the typed config and checked by `config.validate`: nothing is
trained or downloaded. A sweep command composes every value of each of its sweeper's parameters. The
other entry points compose (`plan`, `eval`, `data.check`) or parse (`report`) their arguments, and each
`python benchmarks/X.py --flag` names a flag that X's argparse defines. A command of no known kind
fails the test, so a new kind of line in the docs is noticed here rather than left unchecked.
"""

from __future__ import annotations

import ast
import contextlib
import io
import logging
import re
import runpy
import shlex
import sys
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from conftest import CONF, ROOT
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf, open_dict

from vlmablate.config import ConfigError, to_run_config, validate

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)
# Entry points: python -m MODULE, and where the module's source is when its flags are argparse's
COMPOSED = {"vlmablate", "vlmablate.plan", "vlmablate.eval", "vlmablate.data.check"}
ARGPARSE_MODULES = {"vlmablate.world.components": ROOT / "src" / "vlmablate" / "world" / "components.py"}
# Lines the docs show but this test does not run or compose: set-up, tests, W&B's own CLI, shell variables.
NOT_CHECKED = {"python3", "pip", "pytest", ".", "wandb", "export"}
HYDRA_FLAGS_WITH_VALUE = {"--cfg", "-c", "--config-dir", "-cd", "--config-name", "-cn", "--package", "-p"}


@dataclass(frozen=True)
class Command:
    page: str
    line: int  # where the command starts in its page
    argv: tuple[str, ...]

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}: {' '.join(self.argv)}"


def _shell_lines(block: str, first_line: int):
    """(line number, text) of each shell line of a block: continuations joined, blank lines skipped."""
    pending, start = "", None
    for offset, raw in enumerate(block.split("\n")):
        if start is None:
            start = first_line + offset
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        text = (pending + raw).strip()
        pending, line, start = "", start, None
        if text and not text.startswith("#"):
            yield line, text


def _name(page: Path) -> str:
    return str(page.relative_to(ROOT)) if page.is_relative_to(ROOT) else page.name


def documented_commands(pages=PAGES) -> list[Command]:
    out = []
    for page in pages:
        text = page.read_text()
        for block in FENCE.finditer(text):
            if block.group(1) != "bash":
                continue
            first_line = text[: block.start(2)].count("\n") + 1
            for line, shell in _shell_lines(block.group(2), first_line):
                if re.match(r"[A-Z_]+=\$\(", shell):  # CONF=$(python -c ...): a shell variable, nothing to check
                    continue
                tokens = shlex.split(shell, comments=True)
                for part in _split_chain(tokens):
                    while part and re.fullmatch(r"[A-Z_]+=\S*", part[0]):  # LLAVA_DATA=... prefixes
                        part = part[1:]
                    if part:
                        out.append(Command(_name(page), line, tuple(part)))
    return out


def _split_chain(tokens: list[str]) -> list[list[str]]:
    parts, current = [], []
    for token in tokens:
        if token == "&&":
            parts.append(current)
            current = []
        else:
            current.append(token)
    return [*parts, current]


def classify(argv: tuple[str, ...]) -> tuple[str, str | None, list[str], dict]:
    """(kind, target, arguments, launcher options). Kinds: 'module' (target is the module), 'script'
    (target is the file), 'other' (not checked). Anything else raises: the docs grew a kind of line this
    test does not know."""
    head, rest = argv[0], list(argv[1:])
    if head == "python" and rest[:1] == ["-m"] and len(rest) > 1:
        module, args = rest[1], rest[2:]
        if module in COMPOSED or module == "vlmablate.report":
            return "module", module, args, {}
        if module in ARGPARSE_MODULES:
            return "script", str(ARGPARSE_MODULES[module]), args, {}
        raise AssertionError(f"unknown module {module!r}")
    if head == "python" and rest and rest[0].endswith(".py"):
        return "script", str(ROOT / rest[0]), rest[1:], {}
    if head in ("torchrun", "accelerate", "deepspeed"):
        flag = "--module" if head == "deepspeed" else "-m"
        assert flag in rest, f"{head} without {flag} vlmablate"
        at = rest.index(flag)
        assert rest[at + 1] == "vlmablate", f"{head} launches {rest[at + 1]!r}, not vlmablate"
        launcher = rest[:at]
        options = {}
        if "--config_file" in launcher:
            options["config_file"] = launcher[launcher.index("--config_file") + 1]
        return "module", "vlmablate", rest[at + 2:], options
    if head in NOT_CHECKED:
        return "other", None, rest, {}
    raise AssertionError(f"a documented command of no known kind: {' '.join(argv)}")


def hydra_arguments(args: list[str]) -> tuple[list[str], str | None, str]:
    """(overrides, config dir, config name) of a Hydra command line; a stray word fails."""
    overrides, config_dir, config_name = [], None, "config"
    k = 0
    while k < len(args):
        arg = args[k]
        if arg in HYDRA_FLAGS_WITH_VALUE:
            value = args[k + 1]
            if arg in ("--config-dir", "-cd"):
                config_dir = value
            elif arg in ("--config-name", "-cn"):
                config_name = value
            k += 2
            continue
        if arg in ("-m", "--multirun"):
            k += 1
            continue
        assert "=" in arg and not arg.startswith("-"), f"{arg!r} is not a Hydra override"
        overrides.append(arg)
        k += 1
    return overrides, config_dir, config_name


def _is_sweep(value: str) -> bool:
    """A command-line value Hydra sweeps over: a comma list that is not a bracketed or quoted value."""
    return "," in value and value[:1] not in "[{'\""


def composed_configs(overrides: list[str], config_dir: str | None, config_name: str):
    """(overrides, config) of what the command composes: the run itself or, for a sweep, every value of each
    sweeper parameter (the other parameters at their first value)."""
    folder = ROOT / config_dir if config_dir else CONF
    search = [f"hydra.searchpath=[file://{CONF}]"] if config_dir else []
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(folder), version_base="1.3"):
            plain = [o for o in overrides if not _is_sweep(o.partition("=")[2])]
            base = compose(config_name=config_name, overrides=[*search, *plain], return_hydra_config=True)
            params = base.hydra.sweeper.get("params") if "sweeper" in base.hydra else None
            params = OmegaConf.to_container(params) if params is not None else {}
            # As Hydra's basic sweeper: the command line's value for a key replaces the sweeper's, and a
            # command-line value with commas is a sweep of its own.
            given_here = {o.partition("=")[0]: o.partition("=")[2] for o in overrides}
            params = {k: v for k, v in params.items() if k not in given_here}
            swept = {k: v for k, v in given_here.items() if _is_sweep(v)}
            params.update(swept)
            overrides = [o for o in overrides if o.partition("=")[0] not in swept]
            base = compose(config_name=config_name, overrides=[*search, *overrides], return_hydra_config=True)
            values = {key: [v.strip() for v in str(given).split(",")] for key, given in params.items()}
            cells = [{key: choices[0] for key, choices in values.items()}]
            cells += [{**cells[0], key: v} for key, choices in values.items() for v in choices[1:]]
            out = []
            for cell in cells:
                extra = [f"{key}={value}" for key, value in cell.items()]
                cfg = compose(config_name=config_name, overrides=[*search, *overrides, *extra],
                              return_hydra_config=True) if extra else base
                with open_dict(cfg):
                    del cfg["hydra"]  # the run's config, as the app receives it
                out.append(([*overrides, *extra], cfg))
            return out
    finally:
        GlobalHydra.instance().clear()


def check_module(module: str, args: list[str], options: dict) -> int:
    """Compose (or parse) one documented entry-point command; return how many configs it composed."""
    if module == "vlmablate.report":
        from vlmablate.report.__main__ import parse

        parse(args)
        return 0
    config_file = options.get("config_file")
    if config_file and not config_file.startswith("$"):
        assert (ROOT / config_file).is_file(), f"accelerate --config_file {config_file} does not exist"
    overrides, config_dir, config_name = hydra_arguments(args)
    configs = composed_configs(overrides, config_dir, config_name)
    rejected = []
    for cell_overrides, cfg in configs:
        run = to_run_config(cfg)
        if module == "vlmablate.plan":  # as plan_cell: the cell's rules; evaluation is not planned
            run = replace(run, eval=replace(run.eval, tasks=[]))
        elif module != "vlmablate":
            continue  # eval and data.check load what they are given; the typed config is their check
        try:
            validate(run, cell_overrides)
        except ConfigError as err:
            # A placeholder path such as RUN_DIR/final/projector: the rule that reads it is all that fails.
            placeholder = f"model.pretrained_projector={run.model.pretrained_projector} does not exist"
            if not (str(err).startswith(placeholder) and any(o.startswith("model.pretrained_projector=")
                                                               for o in cell_overrides)):
                rejected.append(err)
    # In a sweep a cell the rules reject writes a failed summary and the others run (4-bit full fine-tuning
    # in a QLoRA grid, as docs/sweeps.md says); a sweep none of whose cells would run is a broken command.
    if rejected and (len(configs) == 1 or len(rejected) == len(configs)):
        raise rejected[0]
    return len(configs)


def argparse_flags(script: Path) -> set[str]:
    """The option strings of every `add_argument` call in a script's source."""
    flags = set()
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            flags |= {a.value for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("-")}
    return flags


def check_script(script: str, args: list[str]) -> None:
    path = Path(script)
    assert path.is_file(), f"{path.relative_to(ROOT)} does not exist"
    flags = argparse_flags(path)
    assert flags, f"{path.name} defines no argparse flags"
    used = {arg.split("=")[0] for arg in args if arg.startswith("-")}
    unknown = sorted(used - flags - {"-h", "--help"})
    assert not unknown, f"{path.name} has no flag {', '.join(unknown)} (it has {', '.join(sorted(flags))})"


def failures(commands: list[Command], kind: str) -> tuple[list[str], int]:
    problems, checked, seen = [], 0, set()
    for command in commands:
        if command.argv in seen:  # the same line on two pages is checked once
            continue
        seen.add(command.argv)
        found, target, args, options = classify(command.argv)
        if found != kind:
            continue
        try:
            if kind == "module":
                check_module(target, args, options)
            else:
                check_script(target, args)
            checked += 1
        except Exception as err:  # every failing command is listed, not only the first
            problems.append(f"{command.where}\n    {type(err).__name__}: {err}")
    return problems, checked


COMMANDS = documented_commands()


# --- the commands ---------------------------------------------------------------------------------------------


def test_the_docs_hold_many_commands_of_every_kind():
    # A parser that finds nothing would pass every other test: count what it finds.
    kinds = Counter()
    for command in COMMANDS:
        kind, target, _, _ = classify(command.argv)
        if kind == "script":
            kinds["benchmark" if "/benchmarks/" in target else "argparse module"] += 1
        else:
            kinds[target or kind] += 1
    assert len(COMMANDS) >= 80, kinds
    assert kinds["vlmablate"] >= 40 and kinds["benchmark"] >= 20, kinds
    for entry in ("vlmablate.plan", "vlmablate.eval", "vlmablate.data.check", "vlmablate.report", "argparse module"):
        assert kinds[entry] >= 1, (entry, kinds)
    pages = {c.page for c in COMMANDS}
    assert "README.md" in pages and len(pages) >= 9, pages


@pytest.mark.slow
def test_every_documented_vlmablate_command_composes_and_validates():
    problems, checked = failures(COMMANDS, "module")
    assert not problems, "documented commands that no longer compose:\n" + "\n".join(problems)
    assert checked >= 50


def test_every_documented_script_flag_exists():
    problems, checked = failures(COMMANDS, "script")
    assert not problems, "documented script flags that do not exist:\n" + "\n".join(problems)
    assert checked >= 20


def test_the_checks_fail_on_what_does_not_exist(tmp_path):
    """The checker itself: an unknown override, option, key or flag fails, as a stale doc line would."""
    for argv in (["freeze=lora_llm", "train.no_such_key=1"], ["vision=no_such_option"],
                 ["quant=nf4", "freeze=full_llm"],  # composes, but validate rejects it
                 ["model=llava15_7b"]):  # no benchmark file for a real model
        with pytest.raises(Exception):
            check_module("vlmablate", argv, {})
    with pytest.raises(AssertionError, match="does not exist"):
        check_module("vlmablate", ["model=tiny_random"], {"config_file": "src/vlmablate/conf/accelerate/no.yaml"})
    with pytest.raises(AssertionError, match="no flag --no-such-flag"):
        check_script(str(ROOT / "benchmarks" / "padding_efficiency.py"), ["--records", "10", "--no-such-flag"])
    with pytest.raises(AssertionError, match="no known kind"):
        classify(("make", "all"))
    page = tmp_path / "page.md"
    page.write_text("```bash\npython -m vlmablate model=tiny_random \\\n    train=cpu_tiny  # comment\n"
                    "FOO=1 torchrun --nproc_per_node=2 -m vlmablate cell=full && pytest\n```\n```\nnot bash\n```\n")
    page_commands = [c.argv for c in documented_commands([page])]
    assert page_commands == [("python", "-m", "vlmablate", "model=tiny_random", "train=cpu_tiny"),
                             ("torchrun", "--nproc_per_node=2", "-m", "vlmablate", "cell=full"), ("pytest",)]


def test_a_sweep_command_composes_every_value_of_its_grid():
    runs = [to_run_config(cfg) for _, cfg in composed_configs([], "sweeps", "freeze_grid")]
    assert [(r.cell.name, r.vision.policy, r.freeze.name, r.train.seed) for r in runs] == [
        ("frozen_frozen", "frozen", "frozen_llm", 0), ("frozen_lora", "frozen", "lora_llm", 0),
        ("unfrozen_lora", "unfrozen", "lora_llm", 0), ("full", "unfrozen", "full_llm", 0),
        ("frozen_frozen", "frozen", "frozen_llm", 1), ("frozen_frozen", "frozen", "frozen_llm", 2)]
    assert {r.train.resume for r in runs} == {"auto"}


def test_the_readme_starts_with_the_two_commands_ci_runs():
    readme = (ROOT / "README.md").read_text()
    first = FENCE.search(readme)
    assert readme.startswith("# vlmablate\n\n```bash\n") and first.group(1) == "bash"
    setup, tests = first.group(2).strip().split("\n")
    assert setup == ('python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && '
                     'pip install -e ".[dev]" && python -m vlmablate')
    assert tests == "pytest"
    ci = (ROOT / ".ci" / "run").read_text()
    for step in ("pip install torch==2.13.0", 'pip install -e ".[dev]"'):
        assert step.replace("pip install", "pip install --progress-bar off") in ci, step
    assert re.search(r"^pytest$", ci, re.M)


# --- plan's documented output ---------------------------------------------------------------------------------


def documented_plan_outputs() -> list[tuple[str, tuple[str, ...], list[str]]]:
    """(page, command, lines) for every ```text block that follows a bash block holding one `plan` command."""
    out = []
    pattern = re.compile(r"^```bash\n(python -m vlmablate\.plan [^\n]*)\n```\s*\n```text\n(.*?)^```", re.M | re.S)
    for page in PAGES:
        for match in pattern.finditer(page.read_text()):
            out.append((str(page.relative_to(ROOT)), tuple(shlex.split(match.group(1))), match.group(2).splitlines()))
    return out


@contextlib.contextmanager
def logging_kept():
    """Hydra's entry point configures logging with `dictConfig`, which disables every logger that exists;
    later tests read the package's log records (caplog), so the logging state is put back afterwards."""
    loggers = [lg for lg in logging.root.manager.loggerDict.values() if isinstance(lg, logging.Logger)]
    saved = [(lg, lg.disabled, lg.level, list(lg.handlers), lg.propagate) for lg in [logging.root, *loggers]]
    try:
        yield
    finally:
        for lg, disabled, level, handlers, propagate in saved:
            lg.disabled, lg.handlers, lg.propagate = disabled, handlers, propagate
            lg.setLevel(level)


def plan_output(argv: tuple[str, ...], out_dir: Path) -> list[str]:
    """What `python -m vlmablate.plan ARGS` prints, run in this process (no download: meta device)."""
    saved = sys.argv
    sys.argv = ["vlmablate.plan", *argv[3:], f"hydra.run.dir={out_dir}", "hydra/job_logging=disabled",
                "hydra/hydra_logging=disabled"]
    printed = io.StringIO()
    GlobalHydra.instance().clear()
    try:
        with contextlib.redirect_stdout(printed), logging_kept():
            runpy.run_module("vlmablate.plan", run_name="__main__")
    finally:
        sys.argv = saved
        GlobalHydra.instance().clear()
    return [line for line in printed.getvalue().splitlines() if not line.startswith("plan written to")]


@pytest.mark.slow
def test_the_documented_plan_output_is_what_plan_prints(tmp_path):
    documented = documented_plan_outputs()
    assert {page for page, _, _ in documented} >= {"README.md", "docs/plan.md"}
    printed = {}
    for page, argv, lines in documented:
        if argv not in printed:
            printed[argv] = plan_output(argv, tmp_path / str(len(printed)))
        assert [line.rstrip() for line in lines] == [line.rstrip() for line in printed[argv]], page


# --- links ----------------------------------------------------------------------------------------------------


def _prose_lines(text: str):
    """Lines outside fenced code blocks."""
    fenced = False
    for line in text.split("\n"):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            yield line


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, repeats numbered."""
    seen: dict[str, int] = {}
    out = set()
    for line in _prose_lines(page.read_text()):
        match = re.match(r"#{1,6} (.+)", line)
        if not match:
            continue
        slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def relative_links(page: Path):
    for line in _prose_lines(page.read_text()):
        for target in re.findall(r"\]\(([^)\s]+)\)", re.sub(r"`[^`]*`", "", line)):
            if not re.match(r"[a-z]+:", target):  # http:, https:, mailto: are not checked
                yield target


def test_every_relative_link_and_anchor_resolves():
    broken, count = [], 0
    for page in PAGES:
        for target in relative_links(page):
            count += 1
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page
            if not resolved.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and (resolved.suffix != ".md" or anchor not in anchors(resolved)):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such anchor)")
    assert not broken, "\n".join(broken)
    assert count >= 40


def test_every_docs_page_is_on_the_readme_map():
    readme_links = set(relative_links(ROOT / "README.md"))
    missing = [p.name for p in PAGES[1:] if f"docs/{p.name}" not in readme_links]
    assert not missing, f"docs pages the README's map does not name: {missing}"
