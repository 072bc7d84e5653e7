"""Words: the freeze table the grid reproduces is "the reference freeze table"; "seed" means a random seed only."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ("README.md", "docs/*.md", "src/**/*.py", "src/vlmablate/conf/**/*.yaml", "sweeps/*.yaml")
# "seed" standing for the reference table, its grid or its numbers; SEED_GRID was the reference grid's old name
NOT_A_SEED = re.compile(r"seed'?s\s+(grid|table|freeze|cells?|numbers?|figures?)|seed[\s_-]*000|\bseed_grid\b",
                        re.IGNORECASE)


def test_seed_means_a_random_seed_only():
    files = sorted({p for pattern in TEXTS for p in ROOT.glob(pattern)})
    assert len(files) > 50  # the globs found the project's texts
    found = [f"{p.relative_to(ROOT)}:{n}: {line.strip()}" for p in files
             for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if NOT_A_SEED.search(line)]
    assert found == []


def test_the_pattern_catches_what_it_is_for():
    for phrase in ("the seed's grid", "Seed 000's table", "the seed's freeze table", "SEED_GRID", "seed000"):
        assert NOT_A_SEED.search(phrase), phrase
    for phrase in ("train.seed=0", "one seed's row", "seeds 0,1,2", "the seed and the epoch", "world.seed"):
        assert not NOT_A_SEED.search(phrase), phrase
