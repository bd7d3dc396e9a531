"""The learned router: a logistic regression over the oriented signals, fit on the
calibration split, predicting "the student is at least as good as the teacher on this
row" (``q_s >= q_t``); its probability is the score.

scikit-learn fits it (``StandardScaler`` then ``LogisticRegression``, L2 with C = 1,
lbfgs): a well-kept library rather than a hand-rolled optimiser. What it learned goes
into ``router.LearnedModel`` as plain numbers, so ``router.json`` is used without
scikit-learn. Not covered: interactions between signals, and class weighting (a split
where the student is almost always fine gives a model that says so).
"""

from __future__ import annotations

import numpy as np

from datagen.route.metrics import Metric, need_sklearn
from datagen.route.router import LearnedModel


def fit(x: np.ndarray, ok: np.ndarray, features: list[str], *, seed: int = 0) -> LearnedModel | Metric:
    """``x``: [rows, features] oriented signals; ``ok``: the label. A Metric with the reason
    when it cannot be fit."""
    ok = np.asarray(ok, dtype=bool)
    if ok.all() or not ok.any():
        return Metric(None, f"the student is {'never' if not ok.any() else 'always'} as good as the teacher on "
                            "the calibration split: nothing to learn")
    need_sklearn("the learned router")
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x)
    scale = np.where(scaler.scale_ > 0, scaler.scale_, 1.0)  # a constant signal: weight on 0
    model = LogisticRegression(C=1.0, random_state=seed).fit((x - scaler.mean_) / scale, ok)
    return LearnedModel(features=list(features), mean=scaler.mean_.tolist(), scale=scale.tolist(),
                        coef=model.coef_[0].tolist(), intercept=float(model.intercept_[0]))
