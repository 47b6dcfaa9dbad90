"""Verification metrics against values worked out by hand on tiny arrays."""

from __future__ import annotations

import math
from math import comb

import numpy as np
import pytest
from facegate.core import metrics

# Ten scores: five genuine, five impostor.
GENUINE = [0.9, 0.8, 0.7, 0.6, 0.3]
IMPOSTOR = [0.75, 0.5, 0.4, 0.2, 0.1]
SCORES = np.array(GENUINE + IMPOSTOR)
LABELS = np.array([1] * 5 + [0] * 5)


def test_roc_curve_one_point_per_distinct_score_descending():
    far, tar, thresholds = metrics.roc_curve(SCORES, LABELS)
    # Accepting score >= t, walking the scores from the top:
    # 0.9 g, 0.8 g, 0.75 i, 0.7 g, 0.6 g, 0.5 i, 0.4 i, 0.3 g, 0.2 i, 0.1 i
    assert thresholds.tolist() == [math.inf, 0.9, 0.8, 0.75, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]
    np.testing.assert_allclose(tar, [0, 1, 2, 2, 3, 4, 4, 4, 5, 5, 5] / np.float64(5))
    np.testing.assert_allclose(far, [0, 0, 0, 1, 1, 1, 2, 3, 3, 4, 5] / np.float64(5))


def test_roc_curve_exact_on_ties():
    # Two pairs tie at 0.5 (one genuine, one impostor): one point accepts both.
    far, tar, thresholds = metrics.roc_curve([0.5, 0.5, 0.3], [1, 0, 1])
    assert thresholds.tolist() == [math.inf, 0.5, 0.3]
    assert tar.tolist() == [0.0, 0.5, 1.0]
    assert far.tolist() == [0.0, 1.0, 1.0]


def test_roc_curve_needs_both_classes():
    with pytest.raises(ValueError, match="genuine and one impostor"):
        metrics.roc_curve([0.1, 0.2], [1, 1])


def test_tar_at_far_on_ten_scores():
    # FAR <= 0.2 allows 1 of 5 impostors (0.75). Lowest threshold keeping that: 0.6,
    # which accepts genuine 0.9, 0.8, 0.7, 0.6 -> TAR 4/5.
    tar, threshold = metrics.tar_at_far(SCORES, LABELS, 0.2)
    assert tar == pytest.approx(0.8)
    assert threshold == 0.6
    # FAR <= 0.4 allows 0.75 and 0.5; the next genuine (0.3) lies below impostor 0.4,
    # so TAR stays 4/5, reached first (least FAR spent) at threshold 0.6.
    assert metrics.tar_at_far(SCORES, LABELS, 0.4) == (pytest.approx(0.8), 0.6)
    # FAR <= 0.9 allows 4 impostors (down to 0.2): all genuine accepted at 0.3.
    assert metrics.tar_at_far(SCORES, LABELS, 0.9) == (pytest.approx(1.0), 0.3)


def test_tar_at_far_is_nan_when_too_few_impostors():
    # 5 impostors cannot measure FAR = 0.1 (needs >= 10).
    tar, threshold = metrics.tar_at_far(SCORES, LABELS, 0.1)
    assert math.isnan(tar) and math.isnan(threshold)


def test_threshold_at_far_rejects_ties_and_keeps_rate():
    # 5 impostors, FAR 0.2 -> 1 accept allowed: threshold just above the 2nd highest (0.5).
    t = metrics.threshold_at_far(IMPOSTOR, 0.2)
    assert 0.5 < t < 0.5 + 1e-12
    assert np.mean(np.array(IMPOSTOR) >= t) == pytest.approx(0.2)
    # Ties: [0.9, 0.7, 0.7, 0.1], FAR 0.5 -> 2 accepts allowed, but both 0.7 tie, so
    # accepting one means accepting both (3 > 2): threshold sits just above 0.7.
    t = metrics.threshold_at_far([0.9, 0.7, 0.7, 0.1], 0.5)
    assert 0.7 < t < 0.7 + 1e-12
    assert math.isnan(metrics.threshold_at_far(IMPOSTOR, 0.01))


def test_accuracy_at():
    # Threshold 0.55: accepted 0.9 0.8 0.75 0.7 0.6 -> genuine right 4 (0.3 rejected wrongly),
    # impostor right 4 (0.75 accepted wrongly): 8/10.
    assert metrics.accuracy_at(SCORES, LABELS, 0.55) == pytest.approx(0.8)


def test_kfold_accuracy_separable_is_one():
    rng = np.random.default_rng(1)
    scores = np.concatenate([rng.uniform(0.6, 1.0, 50), rng.uniform(-0.2, 0.4, 50)])
    labels = np.array([1] * 50 + [0] * 50)
    assert metrics.kfold_accuracy(scores, labels) == (1.0, 0.0)


def test_kfold_accuracy_one_outlier():
    # 20 pairs, 10 folds of 2. One impostor (0.99) sits above every genuine score; every
    # training split still prefers the threshold separating the rest, so the fold holding
    # the outlier scores 1/2 and the other nine 1: mean 0.95,
    # std = sqrt((9 * 0.05^2 + 0.45^2) / 10) = sqrt(0.0225) = 0.15.
    genuine = np.linspace(0.6, 0.9, 10)
    impostor = np.append(np.linspace(0.0, 0.3, 9), 0.99)
    scores = np.concatenate([genuine, impostor])
    labels = np.array([1] * 10 + [0] * 10)
    mean, std = metrics.kfold_accuracy(scores, labels, folds=10, seed=3)
    assert mean == pytest.approx(0.95)
    assert std == pytest.approx(0.15)


def test_f1_utility_by_hand():
    genuine, impostor = [0.8, 0.6], [0.7, 0.2]
    # d=0.1: TP 2, FP 2, FN 0 -> 4/6;  d=0.65: TP 1, FP 1, FN 1 -> 2/4;
    # d=0.9: TP 0, FP 0, FN 2 -> 0/2.
    f1 = metrics.f1_utility(genuine, impostor, [0.1, 0.65, 0.9])
    np.testing.assert_allclose(f1, [2 / 3, 0.5, 0.0])


def test_f1_utility_undefined_is_zero():
    # No genuine pairs: at 0.9 nothing is accepted (0/0 -> 0); at 0.1 one FP -> 0/1.
    assert metrics.f1_utility([], [0.5], [0.1, 0.9]).tolist() == [0.0, 0.0]


def test_opis_identical_identities_is_zero():
    u = np.tile([0.2, 0.9, 0.5, 0.1], (4, 1))
    assert metrics.opis(u, [0.1, 0.2, 0.3, 0.4]) == 0.0


def test_opis_two_step_utilities_by_hand():
    # U1 = [1, 1, 0], U2 = [1, 0, 0] at d = [0.2, 0.4, 0.6]; mean = [1, .5, 0].
    # Squared gap for either identity: [0, .25, 0]; trapezoid: .2*(0+.25)/2 + .2*(.25+0)/2
    # = 0.05; divided by the range 0.4 -> 0.125; mean over the two identities 0.125.
    u = np.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert metrics.opis(u, [0.2, 0.4, 0.6]) == pytest.approx(0.125)
    # Threshold order does not matter.
    assert metrics.opis(u[:, ::-1], [0.6, 0.4, 0.2]) == pytest.approx(0.125)


def test_epsilon_opis_by_hand():
    # T = 3, epsilon 0.1 -> n = ceil(0.3) = 1: best minus worst per threshold.
    # d=0: 1 - .5 = .5 -> .25;  d=.5: 1 - 0 -> 1;  d=1: .5 - 0 -> .25.
    # Trapezoid: .5*(.25+1)/2 + .5*(1+.25)/2 = .625, range 1 -> .625.
    u = np.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.5, 0.5, 0.5]])
    assert metrics.epsilon_opis(u, [0.0, 0.5, 1.0]) == pytest.approx(0.625)


def test_epsilon_opis_group_size_is_ceil_of_exact_fraction():
    # T = 30 constant utilities i/29: epsilon 0.1 -> n = 3 (not 4 from 0.1*30 rounding up).
    # Best 3 mean 28/29, worst 3 mean 1/29: gap 27/29, constant -> score (27/29)^2.
    u = np.repeat((np.arange(30) / 29.0)[:, None], 5, axis=1)
    assert metrics.epsilon_opis(u, np.linspace(0, 1, 5)) == pytest.approx((27 / 29) ** 2)


def test_per_identity_utilities_rows_follow_genuine_ids():
    thresholds = [0.1, 0.65, 0.9]
    ids, u = metrics.per_identity_utilities(
        {"a": [0.8, 0.6], "b": [0.95]},
        {"a": [0.7, 0.2], "c": [0.3]},
        thresholds,
    )
    assert ids == ["a", "b"]
    np.testing.assert_allclose(u[0], [2 / 3, 0.5, 0.0])
    # b: one genuine (0.95), no impostors: accepted at every threshold -> F1 1.
    np.testing.assert_allclose(u[1], [1.0, 1.0, 1.0])
    assert u.shape == (2, 3)


def test_verification_pairs_all_positives_and_equal_seeded_negatives():
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 3])
    i, j, same = metrics.verification_pairs(labels, seed=0)
    positives = comb(3, 2) + comb(2, 2) + comb(4, 2)
    assert same.sum() == positives and (~same).sum() == positives
    assert np.all(i < j)
    np.testing.assert_array_equal(labels[i] == labels[j], same)
    assert len(set(zip(i.tolist(), j.tolist(), strict=True))) == len(i)
    again = metrics.verification_pairs(labels, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip((i, j, same), again, strict=True))
    other = metrics.verification_pairs(labels, seed=1)
    assert not np.array_equal(i[~same], other[0][~other[2]]) or not np.array_equal(
        j[~same], other[1][~other[2]]
    )

    i3, _, same3 = metrics.verification_pairs(labels, seed=0, negatives_per_positive=3)
    assert (~same3).sum() == 3 * positives
    # Capped by the different-identity pairs that exist.
    _, _, capped = metrics.verification_pairs(
        np.array([0, 0, 0, 0, 1]), seed=0, negatives_per_positive=5
    )
    assert capped.sum() == 6 and (~capped).sum() == 4


def test_verification_pairs_take_identity_names():
    names = np.array(["a", "a", "b", "b", "c"])
    i, j, same = metrics.verification_pairs(names, seed=0)
    assert same.sum() == 2 and (~same).sum() == 2  # (0, 1), (2, 3) + as many impostors
    np.testing.assert_array_equal(names[i] == names[j], same)


def test_pair_cosines_of_unit_rows():
    e = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]], dtype=np.float32)
    scores = metrics.pair_cosines(e, np.array([0, 0, 1]), np.array([1, 2, 2]))
    assert scores.dtype == np.float64
    np.testing.assert_allclose(scores, [0.6, 0.0, 0.8], atol=1e-7)


def test_opis_summary_integrates_over_the_given_range():
    genuine = {"a": [0.8, 0.6], "b": [0.95], "c": [0.4, 0.5]}
    impostor = {"a": [0.7, 0.2], "b": [0.3], "c": [0.45]}
    summary = metrics.opis_summary(genuine, impostor, (0.2, 0.9), points=15)
    grid = np.linspace(0.2, 0.9, 15)
    _, u = metrics.per_identity_utilities(genuine, impostor, grid)
    assert summary.opis == pytest.approx(metrics.opis(u, grid)) and summary.opis > 0
    assert summary.epsilon_opis == pytest.approx(metrics.epsilon_opis(u, grid, epsilon=0.1))
    assert (summary.identities, summary.threshold_range, summary.points) == (3, (0.2, 0.9), 15)
    assert (summary.epsilon, summary.utility) == (0.1, "f1")
    # Another range, another number: the range is part of what OPIS says.
    assert metrics.opis_summary(genuine, impostor, (0.0, 1.0), points=15).opis != summary.opis


def test_opis_summary_is_none_without_identities_or_range():
    genuine, impostor = {"a": [0.8]}, {"a": [0.3]}
    empty_range = metrics.opis_summary(genuine, impostor, (0.5, 0.5))
    assert empty_range.opis is None and empty_range.epsilon_opis is None
    assert empty_range.identities == 1 and empty_range.points == metrics.OPIS_POINTS
    nobody = metrics.opis_summary({}, {}, (0.0, 1.0))
    assert nobody.opis is None and nobody.identities == 0
    assert metrics.opis_summary(genuine, impostor, (0.2, math.nan)).opis is None
