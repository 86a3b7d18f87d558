"""The audit's arithmetic on plain arrays: exposure, ROC figures, the epsilon lower bound.

Scores follow one convention: higher means "more likely a member". ROC figures come
from ``sklearn.metrics`` so they match what a reader would compute with it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve


def exposure(canary_nll: float, candidate_nll: Sequence[float]) -> float:
    """Exposure of one canary (Carlini et al., "The Secret Sharer", USENIX Security 2019).

    ``exposure = log2(|R|) - log2(rank)``, where ``R`` is the canary plus the candidate
    secrets drawn from the same template and ``rank`` (1 = most likely) is the canary's
    position when all of ``R`` are sorted by the model's negative log-likelihood. With
    ``M`` sampled candidates this is the paper's sampling estimate (``|R| = M + 1``): 0
    when the canary is the least likely, ``log2(M + 1)`` when it is the most likely.
    Ties count against the canary (a candidate as likely as the canary ranks before it),
    so an untrained model that scores everything alike has exposure 0.
    """
    others = np.asarray(candidate_nll, dtype=float)
    rank = 1 + int(np.sum(others <= canary_nll))
    return exposure_from_rank(rank, len(others) + 1)


def exposure_from_rank(rank: int, space_size: int) -> float:
    """``log2(space_size) - log2(rank)`` for a 1-based ``rank`` in ``1..space_size``."""
    if not 1 <= rank <= space_size:
        raise ValueError(f"rank must be in 1..{space_size}, got {rank}")
    return math.log2(space_size) - math.log2(rank)


def _labels_scores(member: Sequence[float], non_member: Sequence[float]):
    if len(member) == 0 or len(non_member) == 0:
        raise ValueError("need at least one member and one non-member score")
    labels = np.r_[np.ones(len(member)), np.zeros(len(non_member))]
    return labels, np.r_[np.asarray(member, float), np.asarray(non_member, float)]


def roc_auc(member: Sequence[float], non_member: Sequence[float]) -> float:
    """Area under the ROC curve of "score above threshold => member" (0.5 = chance)."""
    labels, scores = _labels_scores(member, non_member)
    return float(roc_auc_score(labels, scores))


def tpr_at_fpr(member: Sequence[float], non_member: Sequence[float], *,
               max_fpr: float = 0.01) -> float:
    """Highest true-positive rate over thresholds whose false-positive rate is <= ``max_fpr``.

    The low-FPR figure Carlini et al. ("Membership Inference Attacks From First
    Principles", S&P 2022) argue for: an attack is dangerous if it is sure about a few.
    Read off ``sklearn.metrics.roc_curve`` without interpolation.
    """
    labels, scores = _labels_scores(member, non_member)
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    return float(np.max(tpr[fpr <= max_fpr]))


def epsilon_lower_bound(tpr: float, fpr: float, *, delta: float) -> float:
    """The epsilon any (epsilon, delta)-DP training must have for an attack to reach (TPR, FPR).

    A DP mechanism bounds every membership test by ``TPR <= e^eps * FPR + delta`` and
    ``1 - FPR <= e^eps * (1 - TPR) + delta`` (Kairouz, Oh, Viswanath, "The Composition
    Theorem for Differential Privacy", ICML 2015; as used for auditing by Jagielski,
    Ullman, Oprea, NeurIPS 2020, and Nasr et al., S&P 2021). Solving for epsilon::

        eps_lb = max(log((1 - delta - FPR) / FNR), log((TPR - delta) / FPR), 0)

    with ``FNR = 1 - TPR``; the second term is the same inequality as
    ``log((1 - delta - FNR) / FPR)``. A zero denominator under a positive numerator
    gives ``inf`` (the attack was never wrong in that direction: no finite epsilon
    explains it); a non-positive numerator drops that term. This is a point estimate:
    ``epsilon_lower_bound_ci`` is the version that holds with a stated confidence.
    """
    for name, value in (("tpr", tpr), ("fpr", fpr), ("delta", delta)):
        if not 0 <= value <= 1:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    fnr = 1.0 - tpr
    return max(0.0, _log_ratio(1.0 - delta - fpr, fnr), _log_ratio(tpr - delta, fpr))


def _log_ratio(numerator: float, denominator: float) -> float:
    if numerator <= 0:
        return 0.0
    if denominator <= 0:
        return math.inf
    return math.log(numerator / denominator)


def clopper_pearson_upper(errors: int, trials: int, *, alpha: float) -> float:
    """One-sided ``1 - alpha`` Clopper-Pearson upper bound on a rate seen as errors/trials."""
    from scipy.stats import beta

    if errors >= trials:
        return 1.0
    return float(beta.ppf(1 - alpha, errors + 1, trials - errors))


def epsilon_lower_bound_ci(*, false_negatives: int, members: int, false_positives: int,
                           non_members: int, delta: float, confidence: float = 0.95) -> float:
    """``epsilon_lower_bound`` with FNR and FPR replaced by their Clopper-Pearson upper
    bounds, so the result is a lower bound on the true epsilon with probability at least
    ``confidence`` (Jagielski et al. 2020; each rate gets half of ``1 - confidence``)."""
    alpha = (1.0 - confidence) / 2
    fnr = clopper_pearson_upper(false_negatives, members, alpha=alpha)
    fpr = clopper_pearson_upper(false_positives, non_members, alpha=alpha)
    return epsilon_lower_bound(1.0 - fnr, fpr, delta=delta)


def best_epsilon_lower_bound(member: Sequence[float], non_member: Sequence[float], *,
                             delta: float, confidence: float | None = 0.95) -> float:
    """The largest lower bound over every threshold of the attack's ROC curve.

    ``confidence=None`` uses the point rates (``epsilon_lower_bound``); otherwise the
    Clopper-Pearson bound at each threshold (``epsilon_lower_bound_ci``). Choosing the
    threshold on the same scores makes the confident figure slightly optimistic; with
    the few hundred records an audit has here it is a diagnostic, not a certificate.
    """
    labels, scores = _labels_scores(member, non_member)
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    n_pos, n_neg = int(labels.sum()), int(len(labels) - labels.sum())
    best = 0.0
    for f, t in zip(fpr, tpr):
        if confidence is None:
            eps = epsilon_lower_bound(float(t), float(f), delta=delta)
        else:
            eps = epsilon_lower_bound_ci(
                false_negatives=n_pos - round(t * n_pos), members=n_pos,
                false_positives=round(f * n_neg), non_members=n_neg,
                delta=delta, confidence=confidence)
        best = max(best, eps)
    return best


def mia_figures(attacks: Mapping[str, tuple[np.ndarray, np.ndarray]], *, delta: float,
                tag: str = "") -> dict[str, float]:
    """Every attack's ROC AUC and TPR at 1% FPR, and the best 95% epsilon lower bound over
    them with the bound a perfect attack would reach on this many records (the audit's
    reach). ``attacks``: name -> (member scores, non-member scores); ``tag`` goes after
    ``audit_mia`` / ``audit_eps_lower_bound`` in the names ("" for the global model)."""
    out: dict[str, float] = {}
    bounds = []
    for name, (member, non_member) in attacks.items():
        out[f"audit_mia{tag}_{name}_auc"] = roc_auc(member, non_member)
        out[f"audit_mia{tag}_{name}_tpr_at_1pct_fpr"] = tpr_at_fpr(member, non_member, max_fpr=0.01)
        bounds.append(best_epsilon_lower_bound(member, non_member, delta=delta, confidence=0.95))
    member, non_member = next(iter(attacks.values()))
    out[f"audit_eps_lower_bound{tag}"] = max(bounds)
    out[f"audit_eps_lower_bound{tag}_ceiling"] = epsilon_lower_bound_ci(
        false_negatives=0, members=len(member), false_positives=0, non_members=len(non_member),
        delta=delta, confidence=0.95)
    return out


def _auc_statistic(member: np.ndarray, non_member: np.ndarray, axis: int = -1) -> np.ndarray:
    """ROC AUC along ``axis`` by the Mann-Whitney rank sum (ties count half, as
    ``roc_auc_score``): what ``scipy.stats.bootstrap`` evaluates on each resample."""
    from scipy.stats import rankdata

    member, non_member = np.moveaxis(member, axis, -1), np.moveaxis(non_member, axis, -1)
    k, j = member.shape[-1], non_member.shape[-1]
    ranks = rankdata(np.concatenate([member, non_member], axis=-1), axis=-1)
    return (ranks[..., :k].sum(-1) - k * (k + 1) / 2) / (k * j)


def auc_interval(member: Sequence[float], non_member: Sequence[float], *, confidence: float = 0.95,
                 resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Two-sided ``confidence`` interval of the ROC AUC: the percentile bootstrap of
    ``scipy.stats.bootstrap``, members and non-members resampled separately (their
    counts fixed, as in the audit), seeded so a report can be re-derived.

    Texts are treated as independent draws; pooled over clients with one model each, the
    interval ignores the clustering by client (it is slightly too narrow when clients'
    models differ in how much they leak).
    """
    from scipy.stats import bootstrap

    _labels_scores(member, non_member)
    res = bootstrap((np.asarray(member, float), np.asarray(non_member, float)), _auc_statistic,
                    paired=False, vectorized=True, n_resamples=resamples, confidence_level=confidence,
                    method="percentile", rng=np.random.default_rng(seed))
    low, high = res.confidence_interval
    return float(low), float(high)


def auc_p_value(member: Sequence[float], non_member: Sequence[float]) -> float:
    """One-sided p-value of "members score higher" against chance (AUC = 0.5), by the
    Mann-Whitney U test (``scipy.stats.mannwhitneyu``; its U / (members x non-members)
    is the AUC): exact for small samples without ties, the normal approximation otherwise."""
    from scipy.stats import mannwhitneyu

    _labels_scores(member, non_member)
    return float(mannwhitneyu(np.asarray(member, float), np.asarray(non_member, float),
                              alternative="greater").pvalue)


def auc_summary(member: Sequence[float], non_member: Sequence[float], *, seed: int = 0
                ) -> dict[str, float]:
    """AUC, its 95% bootstrap interval and the one-sided p-value against chance."""
    low, high = auc_interval(member, non_member, seed=seed)
    return {"auc": roc_auc(member, non_member), "auc_low": low, "auc_high": high,
            "p": auc_p_value(member, non_member)}
