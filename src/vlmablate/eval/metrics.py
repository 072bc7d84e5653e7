"""MMBench scores from extracted answers: CircularEval and vanilla accuracy, bootstrap intervals, paired tests.

CircularEval (MMBench; VLMEvalKit's `mcq_circular_eval`): a question counts as correct only if every
one of its copies is answered correctly; an unparsed copy is wrong. Vanilla accuracy scores copy 0
alone. Both are means over main questions (never over rows), overall and per l2-category and
per leaf category, as fractions in [0, 1]. Rows without a ground-truth answer (the test split)
cannot be scored and are left out; the result says how many.

Intervals are 95% percentile bootstraps over questions (numpy, deterministic for a seed). Two cells
evaluated on the same questions are compared with `paired_difference`: a paired bootstrap interval
for the difference in accuracy and a sign-flip permutation p-value.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

CI_LEVEL = 0.95
_RESAMPLE_CELLS = 1 << 22  # entries per resampling chunk: bounds memory on large sets


@dataclass
class Record:
    """One scored row: copy k of question q, the extracted letter (None: unparsed) and the truth."""

    q: int
    k: int
    category: str
    l2_category: str
    prediction: str | None
    answer: str | None


def circular_metrics(records: list[Record], *, n_boot: int = 1000, seed: int = 0) -> dict:
    """CircularEval and vanilla accuracy over questions, with bootstrap CIs and per-group breakdowns."""
    scored = [r for r in records if r.answer is not None]
    n_unscored = len(records) - len(scored)
    if n_unscored:
        log.info("circular_metrics: %d of %d rows have no answer and are not scored", n_unscored, len(records))
    groups = _group_by_question(scored)
    main = [group[0] for group in groups.values()]
    circular = np.array([all(r.prediction == r.answer for r in group.values()) for group in groups.values()],
                        dtype=float)
    vanilla = np.array([r.prediction == r.answer for r in main], dtype=float)
    n_unparsed = sum(r.prediction is None for r in scored)
    # Two-option questions pass CircularEval about half the time on a fixed prior (the same answer in every
    # order), so the blank-image score is read on the questions with three or more options as well.
    many = np.array([len(group) >= 3 for group in groups.values()], dtype=bool)
    return {
        "circular_acc": _mean(circular),
        "vanilla_acc": _mean(vanilla),
        "circular_ci": bootstrap_ci(circular, n_boot=n_boot, seed=seed),
        "vanilla_ci": bootstrap_ci(vanilla, n_boot=n_boot, seed=seed),
        "n_questions": len(groups),
        "n_rows": len(scored),
        "n_unscored_rows": n_unscored,
        "n_unparsed": n_unparsed,
        "unparsed_rate": n_unparsed / len(scored) if scored else None,
        "per_l2": _breakdown([r.l2_category for r in main], circular, vanilla),
        "per_category": _breakdown([r.category for r in main], circular, vanilla),
        "per_n_options": _breakdown([str(len(group)) for group in groups.values()], circular, vanilla),
        "circular_acc_3plus_options": _mean(circular[many]),
        "n_questions_3plus_options": int(many.sum()),
    }


def paired_difference(a: dict[int, bool], b: dict[int, bool], *, n_boot: int = 1000, seed: int = 0) -> dict:
    """Accuracy of `a` minus that of `b` on the same questions, a paired bootstrap CI and a p-value.

    The p-value is two-sided, from a sign-flip permutation test: under "no difference" each
    question's difference is as likely to have either sign. It is (1 + #{|flipped sum| >= |observed
    sum|}) / (1 + n_boot), so it is never 0 and is exactly 1 when the two cells agree everywhere.
    """
    if set(a) != set(b):
        only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        raise ValueError(f"paired_difference needs the same questions: {len(only_a)} only in a "
                         f"(e.g. {only_a[:5]}), {len(only_b)} only in b (e.g. {only_b[:5]})")
    if not a:
        raise ValueError("paired_difference: no questions to compare")
    keys = sorted(a)
    wins_a = np.array([bool(a[q]) for q in keys], dtype=np.int64)
    wins_b = np.array([bool(b[q]) for q in keys], dtype=np.int64)
    diff = wins_a - wins_b
    return {
        "diff": float(diff.mean()),
        "ci": bootstrap_ci(diff, n_boot=n_boot, seed=seed),
        "p_value": _sign_flip_p(diff, n_perm=n_boot, seed=seed),
        "n": len(keys),
        "acc_a": float(wins_a.mean()),
        "acc_b": float(wins_b.mean()),
        "a_only": int((diff == 1).sum()),  # questions a gets right and b wrong
        "b_only": int((diff == -1).sum()),
        "n_boot": n_boot,
    }


def bootstrap_ci(values, *, n_boot: int = 1000, seed: int = 0) -> list[float | None]:
    """95% percentile bootstrap interval of the mean: resample the values with replacement."""
    values = np.asarray(values, dtype=float)
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    if values.size == 0:
        return [None, None]
    rng = np.random.default_rng(seed)
    means = np.concatenate([values[rng.integers(0, values.size, size=(m, values.size))].mean(axis=1)
                            for m in _chunks(n_boot, values.size)])
    tail = 100 * (1 - CI_LEVEL) / 2
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return [float(lo), float(hi)]


def _sign_flip_p(diff: np.ndarray, *, n_perm: int, seed: int) -> float:
    # Questions where both cells agree (difference 0) do not change under a flip; leave them out.
    moving = diff[diff != 0]
    observed = abs(int(diff.sum()))
    # A stream of its own, so the p-value does not reuse the bootstrap's draws.
    rng = np.random.default_rng([seed, 1])
    extreme = 0
    for m in _chunks(n_perm, max(moving.size, 1)):
        signs = rng.choice(np.array([-1, 1]), size=(m, moving.size))
        extreme += int((np.abs(signs @ moving) >= observed).sum())
    return (extreme + 1) / (n_perm + 1)


def _chunks(total: int, width: int):
    """Row counts that add up to `total`, each chunk holding at most ~_RESAMPLE_CELLS entries."""
    step = max(1, _RESAMPLE_CELLS // width)
    for start in range(0, total, step):
        yield min(step, total - start)


def _group_by_question(records: list[Record]) -> dict[int, dict[int, Record]]:
    groups: dict[int, dict[int, Record]] = defaultdict(dict)
    for r in records:
        if r.k in groups[r.q]:
            raise ValueError(f"two records for question {r.q} copy {r.k}")
        groups[r.q][r.k] = r
    headless = sorted(q for q, group in groups.items() if 0 not in group)
    if headless:
        raise ValueError(f"{len(headless)} question(s) have no copy 0 (needed for vanilla accuracy "
                         f"and the categories), e.g. {headless[:5]}")
    return dict(sorted(groups.items()))


def _breakdown(labels: list[str], circular: np.ndarray, vanilla: np.ndarray) -> dict[str, dict]:
    out = {}
    for label in sorted(set(labels)):
        mask = np.array([x == label for x in labels])
        out[label] = {"circular_acc": _mean(circular[mask]), "vanilla_acc": _mean(vanilla[mask]),
                      "n": int(mask.sum())}
    return out


def _mean(values: np.ndarray) -> float | None:
    return float(values.mean()) if values.size else None
