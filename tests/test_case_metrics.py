"""The LiTS challenge's per-case 3D metrics against values computed by hand on small volumes
with known spacing, and the spacing ingest records for them."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pytest

from liverseg.case_metrics import case_row, lesions, overlap, summary, surface_distances
from liverseg.config import parse_params
from liverseg.data.layout import read_index
from liverseg.stages import ingest
from liverseg.stages.evaluate import CaseVolumes
from tests.helpers import SHARED_DATA, tiny_raw_params

SPACING = (2.0, 1.0, 0.5)  # between slices, rows, columns (mm)


def _voxels(*points, shape=(6, 6, 6)) -> np.ndarray:
    out = np.zeros(shape, bool)
    for p in points:
        out[p] = True
    return out


def test_overlap_and_volume_errors_of_a_shifted_cube():
    truth = np.zeros((8, 8, 8), bool)
    truth[2:6, 2:6, 2:6] = True  # 64 voxels
    pred = np.roll(truth, 1, axis=0)  # 48 of them shared
    assert overlap(pred, truth) == pytest.approx({"dice": 96 / 128, "voe": 1 - 48 / 80,
                                                  "rvd": 0.0})
    bigger = truth.copy()
    bigger[6, 2:6, 2:6] = True  # 80 voxels
    assert overlap(bigger, truth)["rvd"] == pytest.approx(16 / 64)


@pytest.mark.parametrize("offset, mm", [((2, 0, 0), 4.0), ((0, 3, 0), 3.0), ((0, 0, 3), 1.5),
                                        ((1, 0, 2), (2.0 ** 2 + 1.0 ** 2) ** 0.5)])
def test_surface_distances_are_in_mm_along_each_axis(offset, mm):
    """Two single voxels: every surface distance is their distance, spacing applied per
    axis (slices 2 mm, rows 1 mm, columns 0.5 mm)."""
    truth, pred = _voxels((0, 0, 0)), _voxels(offset)
    assert surface_distances(pred, truth, SPACING) == pytest.approx(
        {"assd": mm, "mssd": mm, "hd95": mm})


def test_the_maximum_and_the_average_differ_as_defined():
    """Truth: one voxel; prediction: it and a voxel 5 slices away (10 mm). Distances of the
    prediction's surface voxels: 0 and 10; of the truth's: 0. ASSD = (0 + 10 + 0) / 3;
    HD95 = the larger of each direction's 95th percentile (numpy's linear rule: 9.5, 0)."""
    truth, pred = _voxels((0, 0, 0)), _voxels((0, 0, 0), (5, 0, 0))
    got = surface_distances(pred, truth, SPACING)
    assert got["mssd"] == pytest.approx(10.0) and got["assd"] == pytest.approx(10 / 3)
    assert got["hd95"] == pytest.approx(9.5)


@pytest.mark.parametrize("seed", [0, 1])
def test_distances_in_the_foreground_box_are_monai_s_on_the_whole_volume(seed):
    """surface_distances crops to the masks' box before MONAI: the same figures as MONAI on
    the uncropped volumes, masks touching the volume's edge included."""
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

    rng = np.random.default_rng(seed)
    pred, truth = np.zeros((2, 12, 20, 16), bool)
    pred[3:7, 0:5, 4:9] = truth[4:9, 2:6, 5:11] = True  # pred on the edge of the volume
    pred[rng.random(pred.shape) < 0.002] = True
    whole = [np.stack([~m, m])[None].astype(np.float32) for m in (pred, truth)]
    assert surface_distances(pred, truth, SPACING) == pytest.approx({
        "assd": float(compute_average_surface_distance(*whole, symmetric=True,
                                                       spacing=list(SPACING))[0, 0]),
        "mssd": float(compute_hausdorff_distance(*whole, spacing=list(SPACING))[0, 0]),
        "hd95": float(compute_hausdorff_distance(*whole, percentile=95,
                                                 spacing=list(SPACING))[0, 0])}, abs=1e-6)


def test_a_case_s_volumes_are_freed_once_its_metrics_are_released():
    """MONAI's surface distances leave a cycle (a failed optional import's traceback) that
    holds the frames above them with their volumes; evaluate's per-case `heap.release`
    must free them, or its memory grows with the number of cases."""
    import gc
    import weakref

    from liverseg import heap

    refs = []

    def score_a_case():
        pred, truth = np.zeros((2, 12, 20, 16), np.uint8)
        pred[3:7, 2:6, 4:9] = truth[4:9, 2:6, 5:11] = 1
        refs.extend([weakref.ref(pred), weakref.ref(truth)])
        case_row(pred, truth, ("background", "liver"), SPACING)

    heap.trim()  # glibc's function looked up before the collector is held
    enabled = gc.isenabled()
    gc.disable()  # as between the collector's own runs
    try:
        score_a_case()
        held = [r() is not None for r in refs]
        heap.release()
        freed = [r() is None for r in refs]  # before the collector may run again
    finally:
        if enabled:
            gc.enable()
    assert held == [True, True], "MONAI no longer leaves the cycle: release's collect may go"
    assert freed == [True, True]


def test_empty_masks_follow_the_stated_rule():
    empty, one = _voxels(), _voxels((1, 1, 1))
    assert overlap(empty, empty) == {"dice": 1.0, "voe": 0.0, "rvd": 0.0}
    assert surface_distances(empty, empty, SPACING) == {"assd": 0.0, "mssd": 0.0, "hd95": 0.0}
    assert overlap(empty, one) == {"dice": 0.0, "voe": 1.0, "rvd": -1.0}
    assert overlap(one, empty)["rvd"] is None
    assert surface_distances(empty, one, SPACING) == {"assd": None, "mssd": None, "hd95": None}


def test_lesions_detected_missed_and_false_positive():
    """Truth: two lesions (one of two diagonal voxels: 26-connected, one lesion); prediction
    overlaps the first and adds one elsewhere."""
    truth = _voxels((0, 0, 0), (1, 1, 1), (4, 4, 4))
    pred = _voxels((1, 1, 1), (3, 0, 5))
    assert lesions(pred, truth) == {"lesions": 2, "lesions_detected": 1, "predicted_lesions": 2,
                                    "false_positive_lesions": 1}


def test_three_classes_score_the_liver_with_its_tumours_and_pool_globally():
    truth = np.zeros((4, 4, 4), np.uint8)
    truth[1:3, 1:3, 1:3] = 1
    truth[1, 1, 1] = 2
    pred = truth.copy()
    pred[1, 1, 1] = 1  # tumour called liver: the liver (1 or 2) is still whole
    row = case_row(pred, truth, ("background", "liver", "tumour"), SPACING)
    assert row["liver_dice"] == 1.0 and row["tumour_dice"] == 0.0 and row["lesions"] == 1
    other = case_row(truth, truth, ("background", "liver", "tumour"), SPACING)
    pooled = summary([row, other], ("background", "liver", "tumour"))
    assert pooled["tumour_global_dice"] == pytest.approx(2 * 1 / (0 + 1 + 1 + 1))
    assert pooled["tumour_dice_per_case"] == pytest.approx(0.5)
    assert pooled["lesion_recall"] == pytest.approx(0.5)


def test_evaluate_puts_each_case_back_together_in_slice_order():
    """Slices arrive in any order, a case without spacing keeps per-slice figures only."""
    truth = np.zeros((3, 4, 4), np.uint8)
    truth[0:2, 1:3, 1:3] = 1
    pred = np.roll(truth, 1, axis=0)
    rows = [{"slice_id": f"a{k}", "case": "a", "slice_index": k, "spacing": "2,1,0.5"}
            for k in range(3)] + [{"slice_id": "b0", "case": "b", "slice_index": 0,
                                   "spacing": ""}]
    volumes = CaseVolumes(rows, ("background", "tumour"))
    for k in (2, 0, 1):
        volumes.add(f"a{k}", pred[k], truth[k])
    volumes.add("b0", pred[0], truth[0])
    result = volumes.finish()
    assert [c["case"] for c in result["cases"]] == ["a"]
    assert result["cases"][0] | {} == {"case": "a", "slices": 3, "spacing_mm": [2.0, 1.0, 0.5]} \
        | case_row(pred, truth, ("background", "tumour"), (2.0, 1.0, 0.5))


def test_a_whole_case_at_once_scores_and_watches_as_its_slices_one_by_one():
    """evaluate hands a grid case over whole (`add_case`, no second copy of its slices):
    the same 3D row and the same monitoring row as slice by slice."""
    from liverseg.monitoring.facts import Confidence
    from liverseg.serving.watch import CaseWatches

    classes = ("background", "liver", "tumour")
    rng = np.random.default_rng(0)
    pred, truth = rng.integers(0, 3, (2, 5, 16, 16)).astype(np.uint8)
    grey = rng.integers(0, 256, (5, 16, 16)).astype(np.uint8)
    confidence = []
    for _ in range(5):
        confidence.append(Confidence())
        confidence[-1].update(rng.random((1, 3, 16, 16)))
    rows = [{"slice_id": f"a{k}", "case": "a", "slice_index": k, "spacing": "2,1,0.5"}
            for k in range(5)]
    by_slice, whole = CaseVolumes(rows, classes), CaseVolumes(rows, classes)
    watched, watched_whole = CaseWatches(classes, {}), CaseWatches(classes, {})
    for k in range(5):
        by_slice.add(f"a{k}", pred[k], truth[k])
        watched.add("a", grey[k], confidence[k], pred[k])
    whole.add_case("a0", pred, truth)
    watched_whole.add_case(grey, confidence, pred)
    assert whole.finish() == by_slice.finish()
    (one,), (other,) = watched.finish(), watched_whole.finish()
    assert {k: v for k, v in one.items() if k != "time"} == \
        {k: v for k, v in other.items() if k != "time"}
    assert one["kind"] == "volume"


def test_ingest_records_the_spacing_of_the_stored_slices(tmp_path):
    """A LiTS crop stored as LPS with 0.7 x 0.8 x 2.5 mm voxels: its rows say 2.5 mm between
    slices, 0.8 between rows, 0.7 between columns (the canonical slices' axes)."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data not present") if not os.environ.get(
            "LIVERSEG_REQUIRE_SHARED_DATA") else pytest.fail("../shared/data is missing")
    affine = np.diag([-0.7, -0.8, 2.5, 1.0])
    folder = tmp_path / "nifti"
    folder.mkdir()
    for name in ("volume-117.nii.gz", "segmentation-117.nii.gz"):
        data = np.asarray(nib.load(str(SHARED_DATA / "lits-117" / name)).dataobj)[:, :, 88:92]
        nib.save(nib.Nifti1Image(data, affine), str(folder / name))
    ingest.run(parse_params(tiny_raw_params(data={"source": "nifti", "path": str(folder)})),
               tmp_path)
    index = read_index(tmp_path / "data/raw")
    assert set(index["spacing"]) == {"2.5,0.8,0.7"} and len(index) == 4
