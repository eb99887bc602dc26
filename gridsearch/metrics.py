"""Tracking metrics of one exported result against Cell Tracking Challenge ground truth.

Why py-ctcmetrics: it computes the official CTC measures (TRA, DET, LNK from the AOGM, plus CHOTA)
in well under a second per trial, which matters when a sweep scores thousands of trials.
It is imported lazily so that modules which only plan or inspect a sweep do not pay for it.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

BASE_METRICS = ("TRA", "DET", "LNK", "CHOTA")
"""Always computed: they only need the TRA ground truth (markers + lineage)."""

AOGM_KEYS = ("AOGM", "AOGM_0", "AOGM_NS", "AOGM_FN", "AOGM_FP", "AOGM_ED", "AOGM_EA", "AOGM_EC")
"""Raw error counts behind TRA, reported too: they explain a score better than the score does."""


def available_metrics(gt_dir: Path) -> list[str]:
    """Metrics the ground truth supports: SEG only when ``gt_dir/SEG`` exists (else ctc_metrics fails)."""
    metrics = list(BASE_METRICS)
    if (Path(gt_dir) / "SEG").is_dir():
        metrics.append("SEG")
    return metrics


def score(res_dir: Path, gt_dir: Path) -> dict[str, float]:
    """Score a CTC result folder (mask*.tif + res_track.txt, as ``ultrack ... to_ctc`` writes it).

    Returns the CTC metric names (TRA, DET, LNK, CHOTA, SEG when available), the AOGM error counts,
    and ``Valid`` (1.0 or 0.0). A result the CTC rules call invalid (e.g. labels missing from the
    masks, or no tracks at all) scores 0.0 on every metric, as in the challenge.
    """
    from ctc_metrics import evaluate_sequence  # lazy: see module docstring

    res_dir, gt_dir = Path(res_dir), Path(gt_dir)
    if not (res_dir / "res_track.txt").is_file():
        raise FileNotFoundError(res_dir / "res_track.txt")
    if not (gt_dir / "TRA" / "man_track.txt").is_file():
        raise FileNotFoundError(gt_dir / "TRA" / "man_track.txt")
    metrics = available_metrics(gt_dir)
    if not (res_dir / "res_track.txt").read_text().strip():
        # ctc_metrics crashes on an empty track table instead of calling it invalid
        return _invalid(metrics)

    # evaluate_sequence prints its whole result dict; keep the caller's stdout clean
    with contextlib.redirect_stdout(io.StringIO()):
        raw = evaluate_sequence(res=str(res_dir), gt=str(gt_dir), metrics=list(metrics), threads=1)
    if not raw.get("Valid", 1):
        return _invalid(metrics)
    result = {name: float(raw[name]) for name in metrics}
    result.update({key: float(raw[key]) for key in AOGM_KEYS if key in raw})
    result["Valid"] = 1.0
    return result


def _invalid(metrics: list[str]) -> dict[str, float]:
    result = dict.fromkeys(metrics, 0.0)
    result["Valid"] = 0.0
    return result
