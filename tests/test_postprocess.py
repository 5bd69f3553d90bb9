"""Post-processing and mirroring (liverseg.postprocess, served.Served): each step's
exact effect on small masks, nnU-Net's keep-if-not-lower rule, and the mirrored answer as
the mean of the flipped passes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from liverseg.labels import to_classes
from liverseg.postprocess import Choice, Inference
from liverseg.preprocess import Preprocessing
from liverseg.served import Served

THREE = ("background", "liver", "tumour")
LIVER = ("background", "liver")


def liver_with_island() -> tuple[np.ndarray, np.ndarray]:
    """(prediction, truth) [4, 16, 16]: a liver block with a tumour inside, a tumour
    outside it, and a stray 2-voxel liver island far away (not in the truth)."""
    truth = np.zeros((4, 16, 16), np.uint8)
    truth[:, 2:10, 2:10] = 1
    truth[1:3, 4:6, 4:6] = 2  # a tumour inside the liver (8 voxels)
    pred = truth.copy()
    pred[0, 14, 14:16] = 1  # stray liver island
    pred[2, 12, 2] = 2  # a one-voxel tumour outside the liver
    return pred, truth


def test_each_step_removes_exactly_its_components():
    pred, truth = liver_with_island()
    lcc = Inference(largest_foreground=True).apply(pred, THREE, grid=True)
    expected = pred.copy()
    expected[0, 14, 14:16] = 0
    expected[2, 12, 2] = 0  # not connected to the liver: not the largest component either
    np.testing.assert_array_equal(lcc, expected)

    inside = Inference(tumour_in_liver=True).apply(pred, THREE, grid=True)
    expected = pred.copy()
    expected[2, 12, 2] = 0
    np.testing.assert_array_equal(inside, expected)

    small = Inference(min_tumour=10).apply(pred, THREE, grid=True)
    expected = pred.copy()
    expected[pred == 2] = 0  # both tumours are below 10 voxels
    np.testing.assert_array_equal(small, expected)
    assert (Inference(min_tumour=5).apply(pred, THREE, grid=True) == 2).sum() == 8


def test_components_are_3d_on_a_grid_and_2d_per_slice_without_one():
    mask = np.zeros((2, 8, 8), np.uint8)
    mask[0, 0:4, 0:4] = 1  # 16 pixels on slice 0
    mask[1, 0:2, 0:2] = 1  # 4 pixels touching it through the slices: one 3D component of 20
    mask[1, 5:8, 5:8] = 1  # 9 pixels: the largest component of slice 1 alone
    step = Inference(largest_foreground=True)
    in_3d = step.apply(mask, LIVER, grid=True)
    assert in_3d[1, 5:8, 5:8].sum() == 0 and in_3d[1, 0:2, 0:2].all()
    per_slice = step.apply(mask, LIVER, grid=False)
    assert per_slice[1, 5:8, 5:8].all() and per_slice[1, 0:2, 0:2].sum() == 0
    assert per_slice[0].sum() == 16


def noisy_case(seed: int = 0) -> tuple[dict[bool, np.ndarray], np.ndarray]:
    """Two answers ({mirror: mask}) and a truth [6, 24, 24]: the liver block of
    `liver_with_island` in a larger volume, random islands of both classes around it, and a
    tumour no answer finds in a corner (outside the answers' box)."""
    pred, truth = liver_with_island()
    big = np.zeros((6, 24, 24), np.uint8)
    big[1:5, 4:20, 4:20] = truth
    big[2:4, 21:, 21:] = 2
    rng, masks = np.random.default_rng(seed), {}
    for mirror in (False, True):
        masks[mirror] = np.zeros_like(big)
        masks[mirror][1:5, 4:20, 4:20] = pred
        noise = np.zeros(big.shape, bool)
        noise[:, :20, :20] = rng.random((6, 20, 20)) < 0.01
        masks[mirror][noise] = rng.integers(1, 3, noise.sum())
    return masks, big


@pytest.mark.parametrize("grid", [True, False])
def test_the_choice_counts_every_candidate_as_it_serves(grid):
    """The choice's pooled counts (computed in the foreground's box, shared steps reused)
    equal each candidate applied to the whole answer and counted voxel by voxel."""
    from liverseg.metrics import pooled_confusion
    from liverseg.postprocess import STEPS

    masks, truth = noisy_case()
    choice = Choice(THREE, (False, True), postprocess=True)
    choice.add(masks, truth, grid)
    assert len(choice.variants) == 24
    for v in choice.variants:
        served = v.apply(masks[v.mirror], THREE, grid)
        np.testing.assert_array_equal(choice.counts[v], pooled_confusion(served, truth, 3))
        if grid:  # no box: each step on the whole volume
            whole = masks[v.mirror]
            for name, value in v.steps():
                whole = STEPS[name](whole, value, THREE)
            np.testing.assert_array_equal(served, whole)
    assert len({choice.counts[v].tobytes() for v in choice.variants}) > 4  # the steps bite


def test_a_step_is_kept_only_when_it_does_not_lower_the_validation_score():
    pred, truth = liver_with_island()
    choice = Choice(THREE, (False,), postprocess=True)
    choice.add({False: pred}, truth, grid=True)
    decision, record = choice.choose("fg_iou", "none")
    # The island and the outside tumour are false positives: every step that drops them helps.
    assert decision.largest_foreground and record["gain_postprocessing"] > 0
    assert decision.min_tumour == 0  # dropping the true 8-voxel tumour (10, 50) lowers it

    # A second, true liver component (a truth the size of the island): keeping only the
    # largest would remove a true positive, so the step is refused.
    truth_two = truth.copy()
    truth_two[0, 14, 14:16] = 1
    truth_two[2, 12, 2] = 2
    choice = Choice(THREE, (False,), postprocess=True)
    choice.add({False: pred}, truth_two, grid=True)
    decision, record = choice.choose("fg_iou", "none")
    assert decision == Inference() and record["gain_postprocessing"] == 0


def test_a_step_that_changes_nothing_is_kept_as_nnunet_keeps_it():
    """Not lowering is enough: with one liver component, keeping the largest changes no
    voxel and is kept (mirroring, by contrast, must raise the score)."""
    _, truth = liver_with_island()
    liver = np.minimum(truth, 1)
    choice = Choice(LIVER, (False, True), postprocess=True)
    choice.add({False: liver, True: liver}, liver, grid=True)
    decision, record = choice.choose("fg_iou", "auto")
    assert decision == Inference(largest_foreground=True)
    assert record["gain_postprocessing"] == 0 and record["gain_mirror"] == 0


def test_mirroring_is_kept_only_when_it_raises_the_score():
    pred, truth = liver_with_island()
    worse = np.zeros_like(pred)
    for mirrored, expect in ((worse, False), (truth, True)):
        choice = Choice(THREE, (False, True), postprocess=False)
        choice.add({False: pred, True: mirrored}, truth, grid=True)
        decision, record = choice.choose("fg_iou", "auto")
        assert decision.mirror is expect
        assert (record["gain_mirror"] > 0) is expect


def test_forced_mirroring_is_kept_and_its_gain_still_reported():
    pred, truth = liver_with_island()
    choice = Choice(THREE, (False, True), postprocess=False)
    choice.add({False: pred, True: np.zeros_like(pred)}, truth, grid=True)
    decision, record = choice.choose("fg_iou", "flip")
    assert decision == Inference(mirror=True) and record["gain_mirror"] < 0


def test_an_undefined_score_keeps_the_raw_output():
    empty = np.zeros((2, 8, 8), np.uint8)
    choice = Choice(THREE, (False, True), postprocess=True)
    choice.add({False: empty, True: empty}, empty, grid=True)
    decision, record = choice.choose("fg_iou", "auto")
    assert decision == Inference() and record["gain_mirror"] is None


class Lopsided(torch.nn.Module):
    """A tiny model that is not flip-symmetric (its kernel weighs one corner), so the
    mirrored mean differs from the plain answer."""

    def __init__(self, channels: int = 1):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, channels, 3, padding=1)
        torch.manual_seed(0)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn_like(self.conv.weight))

    def forward(self, x):
        return self.conv(x)


def test_mirroring_averages_exactly_the_four_flipped_passes():
    prep = Preprocessing(image_size=16, in_channels=1, mean=0.2, std=0.3, classes=LIVER)
    model = Lopsided().eval()
    raw = torch.rand(2, 1, 16, 16) * 255
    plain = Served(model, prep).eval()
    x = (raw / prep.scale - prep.mean) / prep.std  # at the trained size: no resize
    by_hand = torch.stack([model(x.flip(d)).sigmoid().flip(d)
                           for d in ((), (-1,), (-2,), (-2, -1))]).mean(0)
    with torch.no_grad():
        mirrored = Served(model, prep, mirror=True).eval()(raw)
        torch.testing.assert_close(mirrored, by_hand, rtol=0, atol=1e-6)
        assert not torch.allclose(mirrored, plain(raw), atol=1e-3)  # the flips did change it
        both = plain.mirrored(raw)
    torch.testing.assert_close(both[0], plain(raw), rtol=0, atol=0)
    torch.testing.assert_close(both[1], mirrored, rtol=0, atol=0)


@pytest.mark.parametrize("classes", [LIVER, THREE])
def test_post_processed_probabilities_give_the_post_processed_mask(classes):
    """REST's answer: thresholding (or argmax of) the returned probabilities gives exactly
    the mask post-processing makes of the raw answer, image by image."""
    pred, _ = liver_with_island()
    pred = np.minimum(pred, len(classes) - 1)
    k = len(classes)
    onehot = np.eye(k, dtype=np.float32)[pred].transpose(0, 3, 1, 2)  # [N, K, H, W]
    probs = torch.from_numpy(0.1 + 0.8 * onehot)
    if k == 2:
        probs = probs[:, 1:]
    decision = Inference(largest_foreground=True, min_tumour=2)
    out = decision.apply_to_probabilities(probs, classes, threshold=0.5)
    raw = to_classes(probs, 0.5).numpy().astype(np.uint8)
    np.testing.assert_array_equal(to_classes(out, 0.5).numpy(),
                                  decision.apply(raw, classes, grid=False))
    assert (to_classes(out, 0.5).numpy() != raw).any()


def test_only_a_whole_case_with_a_spacing_is_post_processed_in_3d(tmp_path):
    """evaluate's grid: every slice ingest stored for the case, in order, and a spacing. A
    slab of a case (split.group_by slab), a case missing a slice and a 2D source are
    post-processed per slice, as predict serves slices without a grid. A case id that reads
    as a number (LiTS's "3") is the same case in the index and in the split's rows."""
    from liverseg.data.layout import INDEX_COLUMNS
    from liverseg.stages.evaluate import grid_cases

    stored = [("whole", 4, "2.5,0.7,0.7"), ("slab", 6, "2.5,0.7,0.7"), ("gap", 3, "1,1,1"),
              ("flat", 2, "")]
    index = [{**dict.fromkeys(INDEX_COLUMNS, "x"), "slice_id": f"{c}_{k}", "slice_index": k,
              "case": c, "spacing": sp} for c, n, sp in stored for k in range(n)]
    pd.DataFrame(index).to_csv(tmp_path / "slices.csv", index=False)
    val = [r for r in index if r["case"] == "whole"
           or (r["case"] == "slab" and r["slice_index"] < 3)
           or (r["case"] == "gap" and r["slice_index"] != 1) or r["case"] == "flat"]
    assert grid_cases(val, tmp_path) == {"whole"}

    numbered = [{**row, "case": "3", "slice_id": f"3_{row['slice_index']}"}
                for row in index if row["case"] == "whole"]  # every id in the index a number
    pd.DataFrame(numbered).to_csv(tmp_path / "slices.csv", index=False)
    assert grid_cases(numbered, tmp_path) == {"3"}
