"""metrics.score against tiny hand-made CTC folders, with expected values worked out from the AOGM.

Ground truth used throughout (4 frames, static squares):

    track 1: frames 0-3                     4 nodes, 3 track links
    track 2: frames 0-1, divides into       2 nodes, 1 track link
    track 3: frames 2-3 (parent 2)          2 nodes, 1 track link + 1 parent link
    track 4: frames 2-3 (parent 2)          2 nodes, 1 track link + 1 parent link

10 nodes, 8 edges, so AOGM_0 = 10 * 10 (FN node) + 8 * 1.5 (FN edge) = 112 and TRA = 1 - AOGM / 112;
DET = 1 - AOGM_D / (10 * 10) and LNK = 1 - AOGM_A / (8 * 1.5).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from gridsearch.metrics import available_metrics, score

N_FRAMES = 4
SHAPE = (24, 24)
BOXES = {  # label -> (rows, cols) of its square
    1: (slice(2, 6), slice(2, 6)),
    2: (slice(12, 18), slice(12, 18)),
    3: (slice(10, 14), slice(10, 14)),
    4: (slice(16, 20), slice(16, 20)),
}
GT_TRACKS = [(1, 0, 3, 0), (2, 0, 1, 0), (3, 2, 3, 2), (4, 2, 3, 2)]
AOGM_0 = 10 * 10 + 8 * 1.5


def _write(
    directory: Path,
    prefix: str,
    tracks: list[tuple[int, int, int, int]],
    boxes: dict[int, tuple[slice, slice]],
) -> Path:
    """A CTC folder: {prefix}TTT.tif label images plus the L B E P table."""
    directory.mkdir(parents=True, exist_ok=True)
    frames = np.zeros((N_FRAMES, *SHAPE), dtype=np.uint16)
    for label, begin, end, _ in tracks:
        frames[begin : end + 1][(slice(None), *boxes[label])] = label
    for t, frame in enumerate(frames):
        tifffile.imwrite(directory / f"{prefix}{t:03d}.tif", frame)
    table = "res_track.txt" if prefix == "mask" else "man_track.txt"
    (directory / table).write_text("".join(f"{lab} {b} {e} {p}\n" for lab, b, e, p in tracks))
    return directory


@pytest.fixture
def gt(tmp_path: Path) -> Path:
    _write(tmp_path / "gt" / "TRA", "man_track", GT_TRACKS, BOXES)
    return tmp_path / "gt"


def _result(
    tmp_path: Path,
    tracks: list[tuple[int, int, int, int]],
    extra_boxes: dict[int, tuple[slice, slice]] | None = None,
) -> Path:
    return _write(tmp_path / "res", "mask", tracks, {**BOXES, **(extra_boxes or {})})


def test_identical_result_scores_one(tmp_path: Path, gt: Path) -> None:
    s = score(_result(tmp_path, GT_TRACKS), gt)
    assert s["TRA"] == s["DET"] == s["LNK"] == s["CHOTA"] == 1.0
    assert s["Valid"] == 1.0
    assert s["AOGM"] == 0.0 and s["AOGM_0"] == AOGM_0


def test_removed_link_costs_one_missing_edge(tmp_path: Path, gt: Path) -> None:
    # track 1 broken in two after frame 1 (new label 5, no parent): one track link is missing
    tracks = [(1, 0, 1, 0), (5, 2, 3, 0), *GT_TRACKS[1:]]
    s = score(_result(tmp_path, tracks, {5: BOXES[1]}), gt)
    assert s["AOGM_EA"] == 1
    assert s["TRA"] == pytest.approx(1 - 1.5 / AOGM_0)
    assert s["DET"] == 1.0
    assert s["LNK"] == pytest.approx(1 - 1.5 / 12)


def test_link_with_wrong_semantics(tmp_path: Path, gt: Path) -> None:
    # same break, but the second piece names track 1 as its parent: the edge exists as a parent
    # link where the ground truth has a track link -> one edge-semantics error (weight 1)
    tracks = [(1, 0, 1, 0), (5, 2, 3, 1), *GT_TRACKS[1:]]
    s = score(_result(tmp_path, tracks, {5: BOXES[1]}), gt)
    assert (s["AOGM_EC"], s["AOGM_EA"], s["AOGM_ED"]) == (1, 0, 0)
    assert s["TRA"] == pytest.approx(1 - 1 / AOGM_0)
    assert s["LNK"] == pytest.approx(1 - 1 / 12)


def test_missed_cell_costs_a_node_and_its_edge(tmp_path: Path, gt: Path) -> None:
    # daughter 4 not detected in frame 3: one false-negative node (10) and its link (1.5)
    tracks = [*GT_TRACKS[:3], (4, 2, 2, 2)]
    s = score(_result(tmp_path, tracks), gt)
    assert (s["AOGM_FN"], s["AOGM_EA"]) == (1, 1)
    assert s["TRA"] == pytest.approx(1 - (10 + 1.5) / AOGM_0)
    assert s["DET"] == pytest.approx(1 - 10 / 100)
    assert s["LNK"] == pytest.approx(1 - 1.5 / 12)


def test_false_positive_detection(tmp_path: Path, gt: Path) -> None:
    tracks = [*GT_TRACKS, (6, 1, 1, 0)]
    s = score(_result(tmp_path, tracks, {6: (slice(20, 23), slice(2, 5))}), gt)
    assert s["AOGM_FP"] == 1
    assert s["TRA"] == pytest.approx(1 - 1 / AOGM_0)
    assert s["DET"] == pytest.approx(1 - 1 / 100)
    assert s["LNK"] == 1.0


def test_invalid_result_scores_zero(tmp_path: Path, gt: Path) -> None:
    # the table names label 7, which no mask contains: invalid by CTC rules
    res = _result(tmp_path, GT_TRACKS)
    with (res / "res_track.txt").open("a") as f:
        f.write("7 0 0 0\n")
    s = score(res, gt)
    assert s["Valid"] == 0.0
    assert s["TRA"] == s["DET"] == s["LNK"] == s["CHOTA"] == 0.0


def test_empty_result_scores_zero(tmp_path: Path, gt: Path) -> None:
    res = _result(tmp_path, [])
    s = score(res, gt)
    assert s["Valid"] == 0.0 and s["TRA"] == 0.0


def test_seg_only_with_seg_ground_truth(tmp_path: Path, gt: Path) -> None:
    res = _result(tmp_path, GT_TRACKS)
    assert "SEG" not in available_metrics(gt)
    assert "SEG" not in score(res, gt)
    _write(gt / "SEG", "man_seg", GT_TRACKS, BOXES)
    (gt / "SEG" / "man_track.txt").unlink()
    assert available_metrics(gt) == ["TRA", "DET", "LNK", "CHOTA", "SEG"]
    assert score(res, gt)["SEG"] == 1.0


def test_score_prints_nothing(tmp_path: Path, gt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    score(_result(tmp_path, GT_TRACKS), gt)
    assert capsys.readouterr().out == ""


def test_missing_files_raise(tmp_path: Path, gt: Path) -> None:
    with pytest.raises(FileNotFoundError):
        score(tmp_path / "nowhere", gt)
