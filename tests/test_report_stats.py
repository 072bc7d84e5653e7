"""The crossed seeds × questions test, Holm's correction and the power figures, on crafted matrices whose
answers are worked out by hand; and the simulated grid that shows which test holds its α."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vlmablate.report import stats


def t2_two_sided(t: float) -> float:
    """Student's t with 2 degrees of freedom has a closed form: P(|T| > t) = 1 − t / sqrt(t² + 2)."""
    return 1 - t / math.sqrt(t * t + 2)


def test_a_seed_effect_alone_is_a_t_test_over_seeds():
    # every question moves with its seed: three runs, one of them wrong everywhere
    y = np.array([[1.0] * 10, [0.0] * 10, [1.0] * 10])
    r = stats.cell_accuracy(y)
    assert r["mean"] == pytest.approx(2 / 3) and r["se"] == pytest.approx(1 / 3) and r["df"] == pytest.approx(2)
    assert r["ci"] == [0.0, 1.0]  # 2/3 ± 4.30 / 3, clipped to [0, 1]
    d = stats.compare(y, np.zeros_like(y), paired=True)
    assert d["diff"] == pytest.approx(2 / 3) and d["se"] == pytest.approx(1 / 3) and d["df"] == pytest.approx(2)
    assert d["p_value"] == pytest.approx(t2_two_sided(2.0))  # 0.1835: three runs cannot tell
    assert d["design"] == "paired" and d["seeds"] == (3, 3) and d["training_noise"]


def test_a_question_effect_alone_is_a_t_test_over_questions():
    y = np.array([[1.0, 0.0, 1.0, 0.0]] * 3)  # the same answers from every seed
    r = stats.cell_accuracy(y)
    assert r["mean"] == 0.5 and r["se"] == pytest.approx(math.sqrt(1 / 12)) and r["df"] == pytest.approx(3)


def test_the_pair_level_test_calls_one_outlying_run_a_difference_and_the_crossed_test_does_not():
    from vlmablate.eval.metrics import paired_difference

    rng = np.random.default_rng(0)
    b = (rng.random((3, 300)) < 0.5).astype(float)
    a = b.copy()
    a[0] = 1.0  # one run of `a` got lucky on every question
    flat = lambda m: dict(enumerate(m.ravel().astype(bool)))  # noqa: E731
    assert paired_difference(flat(a), flat(b), n_boot=500)["p_value"] < 0.01
    crossed = stats.compare(a, b, paired=True)
    assert crossed["diff"] == pytest.approx((1 - b[0]).sum() / 900) and crossed["p_value"] > 0.2


def test_identical_cells_and_a_clean_sweep():
    y = np.array([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    same = stats.compare(y, y.copy(), paired=True)
    assert same["diff"] == 0.0 and same["p_value"] == 1.0 and same["ci"] == [0.0, 0.0]
    ones, zeros = np.ones((3, 5)), np.zeros((3, 5))
    clean = stats.compare(ones, zeros, paired=True)  # no noise at all: certain
    assert clean["diff"] == 1.0 and clean["p_value"] == 0.0 and clean["seeds_for_power"] == 2


def test_an_unpaired_comparison_counts_each_cells_seed_effect():
    # A/A-like: disjoint seeds, each cell's runs shift all questions together
    a = np.array([[1.0] * 6 + [0.0] * 4, [1.0] * 4 + [0.0] * 6, [1.0] * 5 + [0.0] * 5])
    b = np.array([[1.0] * 5 + [0.0] * 5, [1.0] * 6 + [0.0] * 4, [1.0] * 5 + [0.0] * 5])
    r = stats.compare(a, b, paired=False)
    assert r["design"] == "unpaired" and r["diff"] == pytest.approx(-0.1 / 3)
    # by hand: Σ MS_seed/(S·Q) + (V_question − Σ MS_residual/S)/Q over the two cells
    def ms(y):
        s, q = y.shape
        rows, cols, g = y.mean(1), y.mean(0), y.mean()
        resid = y - rows[:, None] - cols[None, :] + g
        return q * ((rows - g) ** 2).sum() / (s - 1), (resid ** 2).sum() / ((s - 1) * (q - 1))
    (sa, ea), (sb, eb) = ms(a), ms(b)
    v_q = (a.mean(0) - b.mean(0)).var(ddof=1)
    assert r["se"] ** 2 == pytest.approx(sa / 30 + sb / 30 + (v_q - ea / 3 - eb / 3) / 10)
    with pytest.raises(ValueError, match="same seeds"):
        stats.compare(a, b[:2], paired=True)
    with pytest.raises(ValueError, match="same questions"):
        stats.compare(a, b[:, :5], paired=False)


def test_one_seed_cannot_measure_training_noise():
    r = stats.compare(np.array([[1.0, 1.0, 0.0, 1.0]]), np.array([[0.0, 1.0, 0.0, 0.0]]), paired=True)
    assert not r["training_noise"] and r["mde"] is None and r["seeds_for_power"] is None


def test_holm():
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([0.5, 0.9]) == [1.0, 1.0] and stats.holm([]) == []


def test_power_and_the_seeds_a_difference_needs():
    # seed variance only (one run's accuracy has SD 0.03 in both cells), 300 questions
    c = stats.Components(question=0.0, seed=(2 * 0.03 ** 2,), residual=(0.0,), questions=300, paired=True)
    t = lambda p, df: __import__("scipy.stats").stats.t.ppf(p, df)  # noqa: E731
    assert stats.power(c, 0.1, 3)["mde"] == pytest.approx((t(0.975, 2) + t(0.8, 2)) * 0.03 * math.sqrt(2 / 3))
    few, many = stats.power(c, 0.1, 3)["seeds_for_power"], stats.power(c, 0.03, 3)["seeds_for_power"]
    assert 2 <= few < many
    # the seeds found are the fewest that reach 80% power
    mde = lambda s: (t(0.975, s - 1) + t(0.8, s - 1)) * 0.03 * math.sqrt(2 / s)  # noqa: E731
    assert mde(many) <= 0.03 < mde(many - 1)
    # a question part larger than the effect: no number of seeds is enough
    c = stats.Components(question=0.3, seed=(0.001,), residual=(0.1,), questions=30, paired=True)
    assert stats.power(c, 0.05, 3)["seeds_for_power"] is None


def test_the_simulated_world_has_the_measured_noise():
    rng = np.random.default_rng(0)
    questions = stats.world_like_questions(rng=rng)
    binomial = math.sqrt((questions * (1 - questions)).sum()) / questions.size
    assert questions.mean() == pytest.approx(0.53, abs=0.04) and binomial == pytest.approx(0.017, abs=0.002)
    run_sd = stats.run_sd_for(0.028, questions)
    accuracies = [stats.simulate_null(rng, questions=questions, seeds=3, run_sd=run_sd)[0].mean(axis=1)
                  for _ in range(400)]
    assert np.std(np.concatenate(accuracies)) == pytest.approx(0.028, abs=0.003)


@pytest.mark.slow
def test_the_crossed_test_holds_alpha_where_the_pair_level_test_does_not():
    # two identical cells, 3 seeds each, a run effect of the size measured on the world (SD 0.028)
    crossed = stats.null_rejection_rates(2000, pair_level_boot=0, seed=1)
    limit = stats.ALPHA + 3 * crossed["binomial_sd"]  # never above α beyond binomial noise
    assert crossed["rates"]["crossed_paired"] <= limit and crossed["rates"]["crossed_unpaired"] <= limit
    assert crossed["rates"]["crossed_paired"] >= 0.02 and crossed["rates"]["crossed_unpaired"] >= 0.02
    old = stats.null_rejection_rates(300, pair_level_boot=200, seed=2)
    assert old["rates"]["pair_level"] > 0.15  # pairs counted as independent: about one false alarm in four
