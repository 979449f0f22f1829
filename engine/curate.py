"""Layout realism filter: keep the sampled nuclei layouts that look like the training data's.

A small structure model trained briefly draws too many, too irregular nuclei (docs/benchmarks.md §6).
This module corrects the *set* of layouts after sampling, by discriminator rejection sampling (Azadi et
al. 2019) on five layout statistics:

* a logistic regression (quadratic terms, balanced classes) tells reference layouts (the real tiles the
  structure model was trained on) from sampled ones; its odds estimate the density ratio
  r(x) = p_real(x) / p_sampled(x);
* each candidate is accepted with probability min(1, r / M), M chosen so that the expected number kept is
  the number asked for. Accepted layouts follow the real distribution of the statistics more closely than
  the raw samples do, without collapsing onto the single most typical layout (as keeping the top-ranked
  would).

Mode ``"sample"`` (the default, for building a training set) is that rejection sampling; mode ``"top"``
keeps the candidates with the highest ratio, deterministically: what a person previewing a handful of
layouts expects from "keep the most realistic" (the studio's Structures tab), at the cost of diversity
in a large set.

Sampling ``oversample`` times more structures than needed and keeping the accepted ones is cheap next to
image synthesis, which runs only on the kept layouts (engine.pipeline.generate_pairs).

The reference is stored in a structure checkpoint (tensor ``reference.layout``, (N, 5) float32) when it
is trained or exported with a data folder, so sampling needs no access to the training data.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from engine.errors import NuDiffError
from engine.morphology import nuclei, solidities, tile_measures

__all__ = ["LAYOUT_FEATURES", "layout_features", "realism_ratio", "curate", "CURATE_MODES", "REFERENCE_KEY",
           "reference_from_insts", "reference_from_folder"]

#: Per-layout statistics, all independent of the tile size (so a reference of 64 px training tiles can
#: judge 128 px samples): nuclei per 100x100 px (log1p), foreground fraction, log mean nucleus area (px),
#: mean solidity, fraction of nuclei with solidity < 0.85 (irregular blobs, merged or fragmented nuclei).
LAYOUT_FEATURES = ("log_density", "fg_fraction", "log_mean_area", "mean_solidity", "irregular_fraction")
REFERENCE_KEY = "reference.layout"  # checkpoint tensor name


def layout_features(insts: Sequence[np.ndarray]) -> np.ndarray:
    """(N, 5) float32 layout statistics (LAYOUT_FEATURES) of N (H, W) integer instance maps."""
    rows = []
    for inst in insts:
        inst, regions = nuclei(inst, NuDiffError)
        _, density, fg = tile_measures(inst, regions)
        if not regions:
            rows.append((np.log1p(density), fg, 0.0, 1.0, 0.0))
            continue
        area = np.array([r.area for r in regions], np.float64)
        sol = solidities(regions)
        rows.append((np.log1p(density), fg, np.log(area.mean()), sol.mean(), float((sol < 0.85).mean())))
    return np.asarray(rows, np.float32).reshape(-1, len(LAYOUT_FEATURES))


def reference_from_insts(insts: Sequence[np.ndarray], max_tiles: int = 1000, seed: int = 0) -> np.ndarray:
    """(N, 5) float32 layout features of at most max_tiles of the given instance maps (a seeded choice)."""
    idx = np.arange(len(insts))
    if len(idx) > max_tiles:
        idx = np.sort(np.random.default_rng(seed).choice(idx, max_tiles, replace=False))
    return layout_features([insts[i] for i in idx])


def reference_from_folder(folder: str, size: int, max_tiles: int = 1000, seed: int = 0) -> np.ndarray:
    """Layout reference of a folder of real labeled images, cut into size x size tiles (stride size/2)."""
    from engine.data import load_tiles

    tiles, _ = load_tiles(folder, size=size, stride=max(1, size // 2))
    return reference_from_insts([t.inst for t in tiles], max_tiles, seed)


def realism_ratio(reference: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Estimated density ratio p_reference / p_candidates at each candidate, (M,) float64 >= 0.

    reference: (N, 5) and candidates: (M, 5) layout_features. Features are standardised by the
    reference; the classifier is a logistic regression on them and their pairwise products.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import PolynomialFeatures

    ref = np.asarray(reference, np.float64)
    cand = np.asarray(candidates, np.float64)
    if ref.ndim != 2 or cand.ndim != 2 or ref.shape[1] != cand.shape[1]:
        raise NuDiffError(f"reference {ref.shape} and candidates {cand.shape} must be (N, F) with the same F")
    if len(ref) < 2 or len(cand) < 2:
        raise NuDiffError("the realism filter needs at least 2 reference layouts and 2 candidates")
    mu, sd = ref.mean(0), ref.std(0)
    sd[sd == 0] = 1.0
    poly = PolynomialFeatures(2, include_bias=False)
    x = poly.fit_transform(np.concatenate([(ref - mu) / sd, (cand - mu) / sd]))
    y = np.r_[np.ones(len(ref)), np.zeros(len(cand))]
    clf = LogisticRegression(C=1.0, max_iter=5000, class_weight="balanced").fit(x, y)
    logit = clf.decision_function(x[len(ref):])
    return np.exp(np.clip(logit, -30, 30))  # balanced classes: odds = density ratio


#: Ways of choosing the kept candidates: rejection sampling, or the highest realism ratios.
CURATE_MODES = ("sample", "top")


def curate(reference: np.ndarray, candidates: np.ndarray, keep: int, seed: int = 0,
           mode: str = "sample") -> np.ndarray:
    """Indices (sorted, int64, length keep) of the candidates kept by the realism filter.

    mode "sample" (discriminator rejection sampling): candidate i is accepted with probability
    a_i = min(1, r_i / M), with M such that sum(a) = keep; if the draw accepts more than keep, a random
    subset of them is kept, if fewer, the rejected candidates with the highest ratio fill the gap.
    Deterministic for a given seed. mode "top": the keep candidates with the highest ratio r_i (ties: the
    earlier candidate), independent of the seed.
    """
    if mode not in CURATE_MODES:
        raise NuDiffError(f"unknown realism filter mode {mode!r}; choose one of {', '.join(CURATE_MODES)}")
    n = len(candidates)
    if not 1 <= keep <= n:
        raise NuDiffError(f"cannot keep {keep} of {n} candidates")
    if keep == n:
        return np.arange(n, dtype=np.int64)
    r = realism_ratio(reference, candidates)
    if mode == "top":
        return np.sort(np.argsort(-r, kind="stable")[:keep]).astype(np.int64)
    r = np.maximum(r, 1e-12)
    lo, hi = 0.0, float(r.max()) * n / keep + 1.0  # sum(min(1, r/M)) decreases in M
    for _ in range(100):
        m = 0.5 * (lo + hi)
        if np.minimum(1.0, r / m).sum() > keep:
            lo = m
        else:
            hi = m
    accept_p = np.minimum(1.0, r / hi)
    rng = np.random.default_rng(seed)
    accepted = np.nonzero(rng.random(n) < accept_p)[0]
    if len(accepted) > keep:
        accepted = rng.choice(accepted, keep, replace=False)
    elif len(accepted) < keep:
        rest = np.setdiff1d(np.arange(n), accepted)
        accepted = np.concatenate([accepted, rest[np.argsort(-r[rest], kind="stable")[: keep - len(accepted)]]])
    return np.sort(accepted).astype(np.int64)
