"""The audit's arithmetic on hand-built numbers: exposure, ROC figures, epsilon lower bounds."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

from fedslm.audit.metrics import (
    best_epsilon_lower_bound,
    clopper_pearson_upper,
    epsilon_lower_bound,
    epsilon_lower_bound_ci,
    exposure,
    exposure_from_rank,
    mia_figures,
    roc_auc,
    tpr_at_fpr,
)

CANDIDATES = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]  # |R| = 8 with the canary


@pytest.mark.parametrize(("canary_nll", "expected"), [
    (0.5, 3.0),   # most likely of 8: rank 1, log2(8) - log2(1)
    (1.5, 2.0),   # rank 2
    (3.5, 1.0),   # rank 4
    (3.0, 1.0),   # a tie ranks the candidate first: rank 4, not 3
    (6.5, 3.0 - math.log2(7)),
    (9.0, 0.0),   # least likely: rank 8
])
def test_exposure_on_a_hand_built_ranking(canary_nll, expected):
    assert exposure(canary_nll, CANDIDATES) == pytest.approx(expected, abs=1e-12)


def test_exposure_from_rank_rejects_a_rank_outside_the_space():
    assert exposure_from_rank(1, 1024) == 10.0
    with pytest.raises(ValueError, match="rank must be in 1..8"):
        exposure_from_rank(9, 8)


MEMBERS = [0.9, 0.8, 0.4]
NON_MEMBERS = [0.7, 0.3, 0.2, 0.1]


def _sklearn(member, non_member):
    labels = np.r_[np.ones(len(member)), np.zeros(len(non_member))]
    return labels, np.r_[member, non_member]


def test_auc_is_the_pair_count_and_sklearns():
    assert roc_auc(MEMBERS, NON_MEMBERS) == pytest.approx(11 / 12, abs=1e-15)
    assert roc_auc(MEMBERS, NON_MEMBERS) == roc_auc_score(*_sklearn(MEMBERS, NON_MEMBERS))
    assert roc_auc([0.5, 0.5], [0.5]) == 0.5  # ties: chance


# 100 non-members at 0.00 .. 0.99; one of them (0.99) outscores the member at 0.985
LOW_FPR_NON_MEMBERS = [i / 100 for i in range(100)]
LOW_FPR_MEMBERS = [1.5, 1.2, 0.985, 0.5]


def test_tpr_at_1pct_fpr_on_hand_built_scores():
    assert tpr_at_fpr(LOW_FPR_MEMBERS, LOW_FPR_NON_MEMBERS, max_fpr=0.01) == 0.75
    assert tpr_at_fpr(LOW_FPR_MEMBERS, LOW_FPR_NON_MEMBERS, max_fpr=0.0) == 0.5
    assert tpr_at_fpr(LOW_FPR_MEMBERS, LOW_FPR_NON_MEMBERS, max_fpr=0.02) == 0.75
    fpr, tpr, _ = roc_curve(*_sklearn(LOW_FPR_MEMBERS, LOW_FPR_NON_MEMBERS))
    assert tpr_at_fpr(LOW_FPR_MEMBERS, LOW_FPR_NON_MEMBERS) == tpr[fpr <= 0.01].max()


def test_roc_figures_need_both_classes():
    with pytest.raises(ValueError, match="at least one member and one non-member"):
        roc_auc([], [0.1])


@pytest.mark.parametrize(("tpr", "fpr", "delta", "expected"), [
    (0.5, 0.05, 0.0, math.log(10.0)),       # log(TPR / FPR) beats log(0.95 / 0.5)
    (0.5, 0.05, 0.01, math.log(9.8)),       # log((TPR - delta) / FPR)
    (0.3, 0.1, 0.0, math.log(3.0)),         # on the (ln 3, 0) boundary: recovers ln 3
    (0.9, 0.5, 0.0, math.log(5.0)),         # log((1 - FPR) / FNR) = log(0.5 / 0.1)
    (0.3, 0.3, 0.0, 0.0),                   # chance
    (0.2, 0.5, 0.0, 0.0),                   # worse than chance: no evidence
    (1.0, 0.1, 0.0, math.inf),              # never missed a member
    (0.5, 0.0, 0.0, math.inf),              # never accused a non-member
    (0.5, 0.0, 0.5, 0.0),                   # delta explains it all
])
def test_epsilon_lower_bound_on_known_rates(tpr, fpr, delta, expected):
    assert epsilon_lower_bound(tpr, fpr, delta=delta) == pytest.approx(expected, rel=1e-12)


def test_epsilon_lower_bound_rejects_rates_outside_0_1():
    with pytest.raises(ValueError, match="fpr must be in"):
        epsilon_lower_bound(0.5, 1.5, delta=0.0)


def test_clopper_pearson_upper_with_no_errors_is_closed_form():
    assert clopper_pearson_upper(0, 10, alpha=0.05) == pytest.approx(1 - 0.05 ** 0.1, rel=1e-12)
    assert clopper_pearson_upper(10, 10, alpha=0.05) == 1.0


def test_confident_bound_for_a_perfect_attack_is_finite_and_closed_form():
    upper = 1 - 0.025 ** (1 / 100)  # each rate's 97.5% upper bound with 0 errors in 100
    expected = math.log((1 - upper) / upper)
    got = epsilon_lower_bound_ci(false_negatives=0, members=100, false_positives=0,
                                 non_members=100, delta=0.0, confidence=0.95)
    assert got == pytest.approx(expected, rel=1e-12)
    separated_m, separated_nm = list(np.linspace(2, 3, 100)), list(np.linspace(0, 1, 100))
    assert best_epsilon_lower_bound(separated_m, separated_nm, delta=0.0) == pytest.approx(expected)
    assert best_epsilon_lower_bound(separated_m, separated_nm, delta=0.0, confidence=None) == math.inf


def test_best_point_bound_is_the_best_roc_point():
    # a member alone above every non-member: (TPR, FPR) = (2/3, 0) -> no finite epsilon
    assert best_epsilon_lower_bound(MEMBERS, NON_MEMBERS, delta=0.0, confidence=None) == math.inf
    # members 0.6 0.4 0.1, non-members 0.8 0.5 0.3 0.2; "score >= t" gives (TPR, FPR):
    # t=0.6 (1/3, 1/4): log(4/3); t=0.4 (2/3, 1/2): log(0.5 / (1/3)) = log(1.5), the best;
    # every other threshold gives 0
    got = best_epsilon_lower_bound([0.6, 0.4, 0.1], [0.8, 0.5, 0.3, 0.2], delta=0.0,
                                   confidence=None)
    assert got == pytest.approx(math.log(1.5), rel=1e-12)


def test_mia_figures_names_each_attack_and_takes_the_best_bound():
    """members 0.6 0.4 0.1 vs non-members 0.8 0.5 0.3 0.2: AUC = 5/12 pairs won, no
    threshold passes 1% FPR with a hit; the reversed attack wins 7/12 pairs."""
    members, non_members = np.array([0.6, 0.4, 0.1]), np.array([0.8, 0.5, 0.3, 0.2])
    got = mia_figures({"a": (members, non_members), "b": (-members, -non_members)}, delta=0.0,
                      tag="_personal")
    assert set(got) == {"audit_mia_personal_a_auc", "audit_mia_personal_a_tpr_at_1pct_fpr",
                        "audit_mia_personal_b_auc", "audit_mia_personal_b_tpr_at_1pct_fpr",
                        "audit_eps_lower_bound_personal", "audit_eps_lower_bound_personal_ceiling"}
    assert got["audit_mia_personal_a_auc"] == pytest.approx(5 / 12)
    assert got["audit_mia_personal_b_auc"] == pytest.approx(7 / 12)
    assert got["audit_mia_personal_a_tpr_at_1pct_fpr"] == 0.0
    assert got["audit_mia_personal_b_tpr_at_1pct_fpr"] == pytest.approx(1 / 3)  # 0.1 alone above all
    assert got["audit_eps_lower_bound_personal"] == max(
        best_epsilon_lower_bound(m, nm, delta=0.0) for m, nm in ((members, non_members),
                                                                  (-members, -non_members)))
    assert got["audit_eps_lower_bound_personal_ceiling"] == epsilon_lower_bound_ci(
        false_negatives=0, members=3, false_positives=0, non_members=4, delta=0.0)
    plain = mia_figures({"loss": (members, non_members)}, delta=0.0)
    assert set(plain) == {"audit_mia_loss_auc", "audit_mia_loss_tpr_at_1pct_fpr",
                          "audit_eps_lower_bound", "audit_eps_lower_bound_ceiling"}


def test_auc_statistic_is_sklearns_auc_on_every_resample():
    """The bootstrap's vectorised statistic: row k of a batch is roc_auc_score of row k."""
    from fedslm.audit.metrics import _auc_statistic

    members = np.array([[0.9, 0.8, 0.4], [0.6, 0.4, 0.1], [0.5, 0.5, 0.5]])
    non_members = np.array([[0.7, 0.3, 0.2, 0.1], [0.8, 0.5, 0.3, 0.2], [0.5, 0.5, 0.5, 0.5]])
    got = _auc_statistic(members, non_members, axis=-1)
    np.testing.assert_allclose(got, [11 / 12, 5 / 12, 0.5], rtol=0, atol=1e-15)
    assert got[0] == roc_auc_score(*_sklearn(members[0], non_members[0]))
    # the statistic along axis 0 (samples down the columns) gives the same numbers
    np.testing.assert_allclose(_auc_statistic(members.T, non_members.T, axis=0), got, rtol=0, atol=1e-15)


def test_auc_interval_on_hand_built_scores():
    from fedslm.audit.metrics import auc_interval

    assert auc_interval([3.0, 4.0, 5.0], [0.0, 1.0, 2.0]) == (1.0, 1.0)  # every resample separates
    assert auc_interval([0.5, 0.5], [0.5, 0.5, 0.5]) == (0.5, 0.5)  # every resample ties
    # The exact bootstrap distribution of AUC 11/12 (all 3^3 x 4^4 = 6912 resamples
    # enumerated): P(AUC* <= 1/2) = 0.021, P(AUC* <= 2/3) = 0.070, P(AUC* = 1) = 0.52, so
    # its 2.5th and 97.5th percentiles are 2/3 and 1; 20,000 draws land there (the count
    # below 2/3 is ~420 of the 500 that would move the lower end, 4 standard deviations off).
    assert auc_interval(MEMBERS, NON_MEMBERS, resamples=20_000) == (pytest.approx(2 / 3, abs=1e-15), 1.0)
    # more texts, narrower: 300 + 300 draws of shifted normals give an interval of about
    # +-1.96 x 0.024 around the AUC
    rng = np.random.default_rng(0)
    member, non_member = rng.normal(0.3, 1, 300), rng.normal(0, 1, 300)
    low, high = auc_interval(member, non_member)
    assert low < roc_auc(member, non_member) < high and 0.08 < high - low < 0.11
    assert auc_interval(member, non_member) == (low, high)  # seeded: a report can be re-derived
    assert auc_interval(member, non_member, seed=1) != (low, high)
    with pytest.raises(ValueError, match="at least one member and one non-member"):
        auc_interval([], [0.1])


@pytest.mark.parametrize(("member", "non_member", "expected"), [
    ([3.0, 4.0, 5.0], [0.0, 1.0, 2.0], 1 / 20),   # the one order of C(6, 3) = 20 with U = 9
    (MEMBERS, NON_MEMBERS, 2 / 35),               # U = 11 or 12: 2 of C(7, 3) = 35 orders
    ([0.0, 1.0, 2.0], [3.0, 4.0, 5.0], 1.0),      # U = 0: every order has U >= 0
])
def test_auc_p_value_is_the_exact_mann_whitney_tail(member, non_member, expected):
    from fedslm.audit.metrics import auc_p_value, auc_summary

    assert auc_p_value(member, non_member) == pytest.approx(expected, abs=1e-15)
    summary = auc_summary(member, non_member)
    assert summary["p"] == auc_p_value(member, non_member)
    assert summary["auc"] == roc_auc(member, non_member)
