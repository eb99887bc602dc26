"""Which parameters matter: optuna's fANOVA where it can say something, a variance split otherwise.

Computed on the results table's completed trials (not the study's), so it follows whatever objective
the person asks about, not only the one the study recorded."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    import optuna

FANOVA_MAX_TRIALS = 1000


def label(v: Any) -> str:
    if isinstance(v, np.generic):
        v = v.item()
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "None"
    return str(v)


def completed(df: pd.DataFrame, objective: str) -> pd.DataFrame:
    """Trials the table calls done, with a finite objective as `_y`."""
    done = df[df["state"] == "done"] if "state" in df.columns else df
    values = pd.to_numeric(done[objective], errors="coerce").astype(float)
    ok = np.isfinite(values.to_numpy(dtype=float))
    return done.loc[ok].assign(_y=values.loc[ok])


def _optuna_importance(
    study: optuna.Study | None, done: pd.DataFrame, keys: Sequence[str]
) -> tuple[dict[str, float], str]:
    """optuna's evaluator on exactly the trials the table calls completed (the study may hold
    retried or out-of-grid trials, and -inf values an evaluator cannot rank), each valued by the
    table's `objective` column, which need not be the one the study recorded."""
    import optuna

    if study is None:
        raise ValueError("no optuna study given")
    y = dict(zip(done["trial"], done["_y"], strict=True))
    latest: dict[str, optuna.trial.FrozenTrial] = {}
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        key = t.user_attrs.get("key")
        if key in y and all(k in t.params for k in keys):
            latest[key] = t
    trials = [
        optuna.trial.create_trial(
            params={k: t.params[k] for k in keys},
            distributions={k: t.distributions[k] for k in keys},
            value=float(y[key]),
        )
        for key, t in latest.items()
    ]
    if len(trials) < 2:
        raise ValueError(f"{len(trials)} usable optuna trial(s)")
    used = len(trials)
    if used > FANOVA_MAX_TRIALS:  # fANOVA grows fast (tens of seconds on 10,000): a seeded sample
        pick = np.random.default_rng(0).choice(used, FANOVA_MAX_TRIALS, replace=False)
        trials = [trials[i] for i in sorted(pick)]
    copy = optuna.create_study(direction="maximize")
    copy.add_trials(trials)
    # fANOVA splits the objective's variance between parameters, which is what a grid asks; the
    # default PED-ANOVA only looks at the top quantile (1-2 trials of a small grid) and credited a
    # parameter without any effect on a synthetic 10,000-trial check. Seeded: same picture twice.
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        imp = optuna.importance.get_param_importances(copy, evaluator=evaluator, params=list(keys))
    sample = f" (a seeded sample of {used})" if used > len(trials) else ""
    return {k: float(v) for k, v in imp.items()}, f"optuna fANOVA on {len(trials)} trials{sample}"


def variance_importance(done: pd.DataFrame, keys: Sequence[str]) -> dict[str, float]:
    """Share of the objective's variance explained by each parameter's own means (main effects,
    eta squared), normalised to sum to 1: crude, but defined for any grid with two trials."""
    y = done["_y"].to_numpy(dtype=float) if "_y" in done else np.array([])
    total = float(np.var(y)) if len(y) > 1 else 0.0
    out: dict[str, float] = {}
    for k in keys:
        if total == 0:
            out[k] = 0.0
            continue
        labels = done[k].map(label)
        means = done.groupby(labels)["_y"].transform("mean").to_numpy(dtype=float)
        out[k] = float(np.mean((means - y.mean()) ** 2)) / total
    s = sum(out.values())
    return {k: v / s for k, v in out.items()} if s > 0 else out


def importances(
    df: pd.DataFrame, study: optuna.Study | None, grid_keys: Sequence[str], objective: str
) -> tuple[dict[str, float], str]:
    """(importance per parameter, how it was computed). optuna when it can say something; the
    variance split otherwise, with the reason in the method string."""
    done = completed(df, objective)
    varying = [k for k in grid_keys if done[k].map(label).nunique() > 1] if not done.empty else []
    fixed = [k for k in grid_keys if k not in varying]
    if len(done) < 2:
        reason = f"{len(done)} completed trial(s)"
    elif len(varying) < 2:
        reason = "fewer than 2 varying parameters"
    else:
        try:
            imp, how = _optuna_importance(study, done, varying)
            return {**imp, **dict.fromkeys(fixed, 0.0)}, how
        except Exception as e:  # any evaluator failure: still give the person a picture
            reason = (str(e).splitlines() or [type(e).__name__])[0][:80]
    imp = variance_importance(done, varying)
    return {**imp, **dict.fromkeys(fixed, 0.0)}, f"variance of per-value means (not optuna: {reason})"
