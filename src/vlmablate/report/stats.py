"""Comparing cells with training noise in the test: a crossed seeds × questions model, Holm, power.

A sweep's cell is a matrix of CircularEval correctness, one row per training seed and one column per
benchmark question. Two kinds of noise move its accuracy:

- *training noise*: a run as a whole lands higher or lower (another batch order, another init), an
  effect every question of that run shares;
- *question noise*: another benchmark of the same kind would have other questions.

The test treats both as random effects of a crossed design (seeds × questions, as psycholinguistics
treats subjects × items): for the difference between two cells,

    Var(d) = σ²_question / Q + σ²_seed / S + σ²_residual / (S·Q)

estimated from the two-way ANOVA mean squares (method of moments; the power figures set a negative
component to zero, the test itself does not), with Satterthwaite's degrees of freedom. With seeds shared
by both cells the design is paired (one difference matrix); with disjoint seeds (an A/A comparison of one
cell under two sets of seeds) each cell brings its own seed component. p and the 95% CI come from
Student's t on those degrees of freedom, so with three seeds and a real seed effect they behave like a
t-test over three runs; without one the test is conservative, since three runs cannot show there is none.

A test that pools (seed, question) pairs as if independent (`eval.metrics.paired_difference`) counts
question noise only, and counts the same questions S times: `null_rejection_rates` measures how often
each test rejects a true null on a simulated grid with a per-run effect. `holm` corrects a family of
p-values; `power` says how large a difference the design can see, and how many seeds a difference
would need.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps

ALPHA = 0.05
POWER = 0.80
MAX_SEEDS = 1000  # past this the questions alone limit what more seeds can show


@dataclass(frozen=True)
class Components:
    """Variance components of a difference (or of one cell): per question, per seed and residual.

    `seed` and `residual` are per cell for an unpaired comparison (a tuple of two), one value paired.
    """

    question: float
    seed: tuple[float, ...]
    residual: tuple[float, ...]
    questions: int
    paired: bool

    def variance(self, seeds: int) -> float:
        """Var of the mean difference with `seeds` seeds per cell and this many questions."""
        q = self.questions
        return self.question / q + sum(u / seeds + e / (seeds * q) for u, e in zip(self.seed, self.residual))

    def dof(self, seeds: int) -> float:
        """Satterthwaite's degrees of freedom of `variance(seeds)` estimated from such a design."""
        q = self.questions
        terms = [(self.question / q, q - 1)]
        terms += [((u + e / q) / seeds, seeds - 1) for u, e in zip(self.seed, self.residual)]
        return _satterthwaite(terms)


def _satterthwaite(terms: list[tuple[float, float]]) -> float:
    """Degrees of freedom of a sum of independent mean-square terms (value, its dof)."""
    total = sum(v for v, _ in terms)
    spread = sum(v * v / d for v, d in terms if d > 0)
    return float(total * total / spread) if spread > 0 else math.inf


def _anova(y: np.ndarray) -> tuple[float, float, float]:
    """Two-way ANOVA without replication of a seeds × questions matrix: (MS_seed, MS_question, MS_residual)."""
    s, q = y.shape
    grand = y.mean()
    rows, cols = y.mean(axis=1), y.mean(axis=0)
    ms_seed = q * float(((rows - grand) ** 2).sum()) / (s - 1) if s > 1 else 0.0
    ms_question = s * float(((cols - grand) ** 2).sum()) / (q - 1) if q > 1 else 0.0
    resid = y - rows[:, None] - cols[None, :] + grand
    ms_resid = float((resid ** 2).sum()) / ((s - 1) * (q - 1)) if s > 1 and q > 1 else 0.0
    return ms_seed, ms_question, ms_resid


def _estimate(mats: list[np.ndarray], paired: bool) -> tuple[float, float, float, Components]:
    """(mean difference or mean, its variance, dof, components) for one matrix (a cell, or a paired
    difference) or two matrices (unpaired: the first minus the second).

    Var = Σ_cells MS_seed / (S·Q) + (V_question − Σ_cells MS_residual / S) / Q, where MS_seed / Q is the
    variance of one run's mean (training noise plus the run's own binomial noise) and V_question the
    variance over questions of the seed-averaged difference, whose residual share is counted once. The
    question part is not clipped at zero: clipping it biases the degrees of freedom upward, and the
    test then rejects a true null 5.4% of the time at α = 0.05 (simulated, three seeds).
    """
    q = mats[0].shape[1]
    question_means = mats[0].mean(axis=0) - (mats[1].mean(axis=0) if len(mats) == 2 else 0.0)
    estimate = float(question_means.mean())
    v_question = float(question_means.var(ddof=1)) if q > 1 else 0.0
    seed_terms, resid_terms, seed_parts, resid_parts = [], [], [], []
    for y in mats:
        s = y.shape[0]
        ms_seed, _, ms_resid = _anova(y)
        if s > 1:
            seed_terms.append((ms_seed / (s * q), s - 1))
            resid_terms.append((-ms_resid / (s * q), (s - 1) * (q - 1)))
        seed_parts.append(max(0.0, ms_seed - ms_resid) / q)  # E[MS_seed] = σ²_e + Q·σ²_seed
        resid_parts.append(ms_resid)
    question_excess = v_question / q + sum(v for v, _ in resid_terms)  # E = σ²_question / Q, may be < 0
    terms = seed_terms + [(v_question / q, q - 1)] + resid_terms
    variance = sum(v for v, _ in terms)
    if variance <= 0 or not seed_terms:  # one seed, or a question part below zero by chance
        terms = seed_terms or [(v_question / q, q - 1)]
        variance = sum(v for v, _ in terms)
    spread = sum(v * v / d for v, d in terms if d > 0)  # Satterthwaite, negative terms squared in
    dof = variance * variance / spread if variance > 0 and spread > 0 else math.inf
    components = Components(question=max(0.0, question_excess) * q, seed=tuple(seed_parts),
                            residual=tuple(resid_parts), questions=q, paired=paired)
    return estimate, variance, max(1.0, dof), components


def _t_result(estimate: float, variance: float, dof: float, *, null: float = 0.0) -> dict:
    se = math.sqrt(max(variance, 0.0))
    if se == 0:
        return {"se": 0.0, "df": dof, "ci": [estimate, estimate], "p_value": 1.0 if estimate == null else 0.0}
    half = float(sps.t.ppf(1 - ALPHA / 2, dof)) * se
    p = float(2 * sps.t.sf(abs(estimate - null) / se, dof))
    return {"se": se, "df": dof, "ci": [estimate - half, estimate + half], "p_value": p}


def cell_accuracy(y: np.ndarray) -> dict:
    """One cell's accuracy (mean over seeds and questions) with a 95% CI that carries both noises."""
    y = np.asarray(y, dtype=float)
    if y.ndim != 2 or y.size == 0:
        raise ValueError(f"cell_accuracy needs a seeds × questions matrix, got shape {y.shape}")
    estimate, variance, dof, _ = _estimate([y], paired=True)
    result = _t_result(estimate, variance, dof)
    result["ci"] = [max(0.0, result["ci"][0]), min(1.0, result["ci"][1])]
    return {"mean": estimate, **result, "seeds": y.shape[0], "questions": y.shape[1]}


def compare(a: np.ndarray, b: np.ndarray, *, paired: bool, with_power: bool = True) -> dict:
    """Accuracy of cell `a` minus cell `b`, each a seeds × questions matrix over the same questions.

    `paired`: row s of both is the same seed (same data order), and the test works on the difference
    matrix; else the seeds are independent (an A/A comparison), and each cell's seed effect counts.
    With one seed in a cell the training noise cannot be measured: the result says so
    (`training_noise: False`), and its p covers question noise alone. `with_power` adds the minimum
    detectable effect at these seeds and the seeds the observed difference would need (`power`).
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or a.shape[1] == 0:
        raise ValueError(f"compare needs two seeds × questions matrices over the same questions, "
                         f"got {a.shape} and {b.shape}")
    if paired and a.shape != b.shape:
        raise ValueError(f"a paired comparison needs the same seeds in both cells, got {a.shape} and {b.shape}")
    mats = [a - b] if paired else [a, b]
    estimate, variance, dof, components = _estimate(mats, paired)
    result = {"diff": estimate, **_t_result(estimate, variance, dof), "acc_a": float(a.mean()),
              "acc_b": float(b.mean()), "seeds": (a.shape[0], b.shape[0]), "questions": a.shape[1],
              "design": "paired" if paired else "unpaired", "training_noise": min(a.shape[0], b.shape[0]) > 1,
              "components": {"question": components.question, "seed": list(components.seed),
                             "residual": list(components.residual)}}
    if with_power:
        seeds_now = min(a.shape[0], b.shape[0])
        result.update(power(components, abs(estimate), seeds_now) if result["training_noise"] else
                      {"mde": None, "seeds_for_power": None})
    return result


def power(components: Components, effect: float, seeds: int, *, alpha: float = ALPHA,
          target: float = POWER) -> dict:
    """The minimum detectable effect at `seeds` seeds (two-sided `alpha`, `target` power), and the seeds
    per cell that `effect` would need for that power (None: zero effect, or not reachable by seeds)."""

    def mde(s: int) -> float:
        dof = max(1.0, components.dof(s))
        return float(sps.t.ppf(1 - alpha / 2, dof) + sps.t.ppf(target, dof)) * math.sqrt(components.variance(s))

    needed = None
    if effect > 0 and mde(MAX_SEEDS) <= effect:
        lo, hi = 2, MAX_SEEDS  # mde falls with seeds: the smallest s with mde(s) <= effect
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if mde(mid) <= effect else (mid + 1, hi)
        needed = lo
    return {"mde": mde(max(2, seeds)), "seeds_for_power": needed}


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values for one family, in the input order."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def simulate_null(rng: np.random.Generator, *, questions: np.ndarray, seeds: int, run_sd: float) -> tuple:
    """Two cells with no difference: every run (cell, seed) shifts every question's log-odds by its own
    draw from N(0, run_sd²), then answers each question right with that probability."""
    logit = np.log(questions) - np.log1p(-questions)
    shifts = rng.normal(0.0, run_sd, size=(2, seeds, 1))
    p = 1 / (1 + np.exp(-(logit[None, None, :] + shifts)))
    y = (rng.random(p.shape) < p).astype(float)
    return y[0], y[1]


def world_like_questions(n: int = 300, *, mean: float = 0.53, question_sd: float = 0.017,
                         rng: np.random.Generator | None = None) -> np.ndarray:
    """Per-question rates with the tiny world's spread: mean accuracy `mean`, and a binomial SD of one
    run's accuracy of `question_sd` (most questions are nearly always or nearly never right), from a Beta."""
    rng = rng or np.random.default_rng(0)
    spread = question_sd ** 2 * n / (mean * (1 - mean))  # E[p(1-p)] / (m(1-m)) = k / (k + 1)
    k = spread / (1 - spread)
    p = rng.beta(mean * k, (1 - mean) * k, size=n)
    return np.clip(p, 1e-4, 1 - 1e-4)


def run_sd_for(per_seed_sd: float, questions: np.ndarray) -> float:
    """The log-odds SD of a run effect that gives one run's accuracy a seed-to-seed SD of `per_seed_sd`
    beside the questions' own binomial noise."""
    binomial = float(np.sqrt((questions * (1 - questions)).sum())) / questions.size
    shared = math.sqrt(max(per_seed_sd ** 2 - binomial ** 2, 0.0))
    return shared / float((questions * (1 - questions)).mean())  # d accuracy / d log-odds


def null_rejection_rates(draws: int, *, seeds: int = 3, questions: np.ndarray | None = None,
                         per_seed_sd: float = 0.028, alpha: float = ALPHA, seed: int = 0,
                         pair_level_boot: int = 200) -> dict:
    """How often each test rejects at `alpha` over `draws` simulated grids of two identical cells.

    The crossed test is run paired (rows are matched seeds, as in a grid) and unpaired (A/A). The
    pair-level test is the one the report used before: every (seed, question) pair independent, a
    sign-flip p over `pair_level_boot` flips (0 skips it).
    """
    from vlmablate.eval.metrics import paired_difference

    rng = np.random.default_rng(seed)
    questions = world_like_questions(rng=rng) if questions is None else questions
    run_sd = run_sd_for(per_seed_sd, questions)
    hits = {"crossed_paired": 0, "crossed_unpaired": 0, "pair_level": 0}
    for k in range(draws):
        a, b = simulate_null(rng, questions=questions, seeds=seeds, run_sd=run_sd)
        hits["crossed_paired"] += compare(a, b, paired=True, with_power=False)["p_value"] < alpha
        hits["crossed_unpaired"] += compare(a, b, paired=False, with_power=False)["p_value"] < alpha
        if pair_level_boot:
            flat_a, flat_b = dict(enumerate(a.ravel().astype(bool))), dict(enumerate(b.ravel().astype(bool)))
            hits["pair_level"] += paired_difference(flat_a, flat_b, n_boot=pair_level_boot, seed=k)["p_value"] < alpha
    rates = {name: n / draws for name, n in hits.items() if name != "pair_level" or pair_level_boot}
    return {"draws": draws, "seeds": seeds, "questions": int(questions.size), "per_seed_sd": per_seed_sd,
            "run_sd_logit": run_sd, "alpha": alpha, "rates": rates,
            "binomial_sd": math.sqrt(alpha * (1 - alpha) / draws)}
