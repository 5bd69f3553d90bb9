"""The label reader (liverseg.dicom.labels): a CT series written from lits-117 with its label
volume written as SEG by highdicom (BINARY, FRACTIONAL, LABELMAP) and by dcmqi, and as
RTSTRUCT by rt-utils, read back onto the series' frames; who made each label; and bad labels,
each refused with the file, the segment or ROI and the rule."""

from __future__ import annotations

import os
import re
from pathlib import Path
from types import SimpleNamespace

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest

from liverseg.dicom import labels
from liverseg.dicom import series as dicom
from liverseg.dicom.labels import ClassMapping, LabelError, describe, read_labels
from liverseg.dicom.seg_writer import write_seg
from tests import dicom_labels_data as data
from tests.dicom_series import write_series
from tests.helpers import SHARED_DATA

SLAB = slice(88, 104)  # 16 slices with liver and tumour on every one


@pytest.fixture(scope="module")
def lits(tmp_path_factory) -> SimpleNamespace:
    """The series, its datasets in load_series' order, the label volume on them, and every
    label object the tests read (written once)."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data not present") if not os.environ.get(
            "LIVERSEG_REQUIRE_SHARED_DATA") else pytest.fail("../shared/data is missing")
    root = tmp_path_factory.mktemp("labels")
    for name, out in (("volume-117", "crop"), ("segmentation-117", "crop-label")):
        img = nib.load(str(SHARED_DATA / f"lits-117/{name}.nii.gz"))
        nib.save(img.slicer[:, :, SLAB], str(root / f"{out}.nii.gz"))
    files = write_series(root / "crop.nii.gz", root / "ct")
    series = dicom.find_series(files).series[0]
    _, datasets = dicom.load_series(series)
    truth = data.label_on_frames(root / "crop-label.nii.gz", datasets)
    assert all({1, 2} <= set(np.unique(f)) for f in truth)  # liver and tumour on every frame
    ns = SimpleNamespace(root=root, series=series, datasets=datasets, truth=truth)
    for kind in ("BINARY", "FRACTIONAL", "LABELMAP"):
        setattr(ns, kind.lower(), data.write_seg_highdicom(datasets, truth,
                                                           root / f"{kind}.dcm", kind=kind))
    ns.dcmqi = data.write_seg_dcmqi(root / "ct", root / "crop-label.nii.gz", root / "dcmqi.dcm")
    ns.rtstruct = data.write_rtstruct(root / "ct", datasets, truth, root / "rt.dcm")
    ns.rt_unsaid = data.write_rtstruct(root / "ct", datasets, truth, root / "rt-unsaid.dcm",
                                       generation_algorithm="")
    ns.vendor_ai = data.write_seg_highdicom(datasets, truth, root / "vendor-ai.dcm",
                                            algorithm="AUTOMATIC", manufacturer="OtherAI Inc",
                                            model_name="LiverNet", description="AI liver")
    ns.liverseg = root / "liverseg.dcm"
    write_seg(ns.liverseg, datasets, truth, ("background", "liver", "tumour"), "enhanced_pan")
    return ns


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / max(1, int(a.sum() + b.sum()))


@pytest.mark.parametrize("name", ["binary", "dcmqi", "fractional", "labelmap"])
def test_seg_gives_the_label_volumes_voxels_on_every_frame(lits, name):
    """(a) highdicom BINARY (liver segment with the tumour inside it: tumour over liver),
    (b) dcmqi (its frames in the NIfTI's axes, flipped against the series': put back),
    (d) FRACTIONAL at its 0.5 threshold, and LABELMAP: exactly the label volume."""
    label = describe(getattr(lits, name))
    assert (label.kind, label.referenced_series_uid) == ("SEG", lits.series.uid)
    # (a LABELMAP also describes its background, segment 0, which maps to nothing)
    assert [(s.name, s.target) for s in label.mapped] == [("Liver", 1), ("Tumour", 2)]
    got = read_labels(label, lits.datasets)
    assert got.dtype == np.uint8 and got.shape == lits.truth.shape
    np.testing.assert_array_equal(got, lits.truth)


def test_a_seg_omits_empty_frames_and_they_read_as_background(lits):
    """highdicom writes no frame where a segment is empty, and some writers reference only
    the instances they wrote frames for: the series' other instances are background."""
    empty = np.zeros_like(lits.truth)
    empty[3:5] = lits.truth[3:5]
    path = data.write_seg_highdicom(lits.datasets, empty, lits.root / "two-frames.dcm")
    ds = pydicom.dcmread(path)
    assert int(ds.NumberOfFrames) == 4
    referenced = ds.ReferencedSeriesSequence[0]
    labelled = {str(d.SOPInstanceUID) for d in lits.datasets[3:5]}
    referenced.ReferencedInstanceSequence = [
        r for r in referenced.ReferencedInstanceSequence
        if r.ReferencedSOPInstanceUID in labelled]
    ds.save_as(path)
    np.testing.assert_array_equal(read_labels(describe(path), lits.datasets), empty)


def test_the_fractional_threshold_is_the_callers(lits):
    """Background pixels hold fractions up to 0.49: a lower threshold counts them."""
    label = describe(lits.fractional)
    assert label.facts["SegmentationType"] == "FRACTIONAL"
    assert (read_labels(label, lits.datasets, fractional_threshold=0.25) > 0).sum() > \
        (lits.truth > 0).sum()


def test_rtstruct_contours_rasterise_onto_each_frame(lits):
    """(c) rt-utils' RTSTRUCT: Dice >= 0.98 per slice for liver and tumour (exact here: its
    contours run through the boundary pixels' centres), with the ROIs placed by their
    ContourImageSequence and, without it, by their plane."""
    label = describe(lits.rtstruct)
    assert (label.kind, label.referenced_series_uid) == ("RTSTRUCT", lits.series.uid)
    assert [(s.name, s.target) for s in label.segments] == [("Liver", 1), ("Tumour", 2)]
    unreferenced = data.edit_rtstruct(lits.rtstruct, lits.root / "rt-planes.dcm", "Liver",
                                      drop_references=True)
    for path in (lits.rtstruct, unreferenced):
        got = read_labels(describe(path), lits.datasets)
        for k in range(len(got)):
            for cls in (1, 2):
                assert _dice(got[k] == cls, lits.truth[k] == cls) >= 0.98, (path, k, cls)


def test_who_made_each_label(lits):
    """liverseg's own SEG and another vendor's AUTOMATIC segments are "model"; MANUAL is
    "human"; an RTSTRUCT with an empty ROIGenerationAlgorithm is "unknown"."""
    own = describe(lits.liverseg)
    assert (own.by_liverseg, own.algorithm) == (True, "model")
    assert [s.target for s in own.segments] == [1, 2]  # by code: SCT Liver, Neoplasm
    np.testing.assert_array_equal(read_labels(own, lits.datasets), lits.truth)
    vendor = describe(lits.vendor_ai)
    assert (vendor.by_liverseg, vendor.algorithm) == (False, "model")
    assert vendor.facts["Manufacturer"] == "OtherAI Inc"
    assert vendor.facts["SegmentAlgorithmType"] == "AUTOMATIC"
    manual = describe(lits.binary)
    assert manual.algorithm == "human"
    assert (manual.facts["ContentCreatorName"], manual.facts["SeriesDescription"]) == \
        ("Doe^Jane", "Liver (manual)")
    assert (manual.time, manual.time_from) == ("20260102101500.000000",
                                               "ContentDate/ContentTime")
    assert describe(lits.rtstruct).algorithm == "human"
    unsaid = describe(lits.rt_unsaid)
    assert unsaid.algorithm == "unknown" and unsaid.facts["ROIGenerationAlgorithm"] == ""
    assert unsaid.time_from == "StructureSetDate/StructureSetTime"
    assert re.fullmatch(r"\d{14}\.\d{6}", unsaid.time)


def test_class_mapping_codes_first_then_names():
    mapping = ClassMapping.from_dict({"liver": ["LIVER_GTV"], "tumour": ["GTV"]})
    assert mapping.target("liver gtv", None) == 1 and mapping.target("Liver-GTV", None) == 1
    assert mapping.target("TUMOR", None) == 2 and mapping.target("gtv", None) == 2
    assert mapping.target("Bone", ("SCT", "10200004", "Liver")) == 1  # the code decides
    assert mapping.target("Liver", ("SCT", "272673000", "Bone")) == 1  # unknown code: name
    assert mapping.target("Bone", ("SCT", "272673000", "Bone")) is None
    assert ClassMapping().target("LIVER_GTV", None) is None
    with pytest.raises(ValueError, match="unknown class 'spleen'"):
        ClassMapping.from_dict({"spleen": ["spleen"]})


def _refused(path: Path, datasets: list, *fragments: str) -> str:
    with pytest.raises(LabelError) as caught:
        read_labels(describe(path), datasets)
    message = str(caught.value)
    assert str(path) in message and "(rule: " in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_a_seg_referencing_frames_not_in_the_series_is_refused(lits):
    """The CT instance of one labelled frame is missing (an incomplete export)."""
    gone = lits.datasets[5]
    _refused(lits.binary, lits.datasets[:5] + lits.datasets[6:], "segment 1 'Liver'",
             f"references instance {gone.SOPInstanceUID}, which is not in series",
             "a label's frames are frames of its series")


def test_a_segment_that_maps_to_no_class_is_refused(lits):
    path = data.write_seg_highdicom(lits.datasets, lits.truth, lits.root / "bone.dcm",
                                    segments=[("Bone", data.BONE_CODE, lits.truth >= 1)])
    assert [s.target for s in describe(path).segments] == [None]
    _refused(path, lits.datasets, "segment 1 'Bone'", "none maps to liver or tumour")


def test_unmapped_segments_beside_a_mapped_one_are_ignored(lits):
    path = data.write_seg_highdicom(
        lits.datasets, lits.truth, lits.root / "liver-and-bone.dcm",
        segments=[("Bone", data.BONE_CODE, lits.truth == 0),
                  *data.default_segments(lits.truth)])
    np.testing.assert_array_equal(read_labels(describe(path), lits.datasets), lits.truth)


@pytest.mark.parametrize("contours,said", [("point", "only POINT contours"),
                                           ("none", "no contour data")])
def test_an_rtstruct_roi_without_closed_contours_is_refused(lits, contours, said):
    path = data.edit_rtstruct(lits.rtstruct, lits.root / f"rt-{contours}.dcm", "Tumour",
                              contours=contours)
    _refused(path, lits.datasets, "ROI 2 'Tumour'", said, "CLOSED_PLANAR")


@pytest.mark.parametrize("referenced", [True, False])
def test_rtstruct_contours_off_every_frame_are_refused(lits, referenced):
    """Contours 40 mm above the slab: off the frame they reference, or (no reference) off
    every frame of the series."""
    path = data.edit_rtstruct(lits.rtstruct, lits.root / f"rt-off-{referenced}.dcm", "Liver",
                              shift_mm=40.0, drop_references=not referenced)
    _refused(path, lits.datasets, "ROI 1 'Liver', contour 1",
             "off the plane of instance" if referenced else "lies off every frame of series",
             "a contour lies on a frame")


def test_a_seg_on_another_pixel_grid_is_refused(lits):
    """A SEG drawn on a 64x64 resampling of the series (same instances): its rows and
    columns are not the series'."""
    small = data.downsampled(lits.datasets)
    path = data.write_seg_highdicom(small, lits.truth[:, ::2, ::2], lits.root / "small.dcm")
    _refused(path, lits.datasets, "segment 1 'Liver'", "the SEG's frames are 64x64, the "
             "series' 128x128", "Rows x Columns equal")


def test_a_seg_frame_off_its_source_frame_is_refused(lits):
    """One frame's plane position moved 3 mm along the row direction."""
    ds = pydicom.dcmread(lits.binary)
    position = ds.PerFrameFunctionalGroupsSequence[0].PlanePositionSequence[0]
    position.ImagePositionPatient = [float(position.ImagePositionPatient[0]) + 3,
                                     *position.ImagePositionPatient[1:]]
    ds.save_as(lits.root / "moved.dcm")
    _refused(lits.root / "moved.dcm", lits.datasets, "segment 1 'Liver', frame 1",
             "3.00 mm off instance", "pixel grid")


def test_not_a_label_and_no_referenced_series(lits, tmp_path):
    with pytest.raises(LabelError, match=r"is not a DICOM SEG or RTSTRUCT \(rule: "):
        describe(lits.series.files[0])
    assert not labels.is_label(pydicom.dcmread(lits.series.files[0], stop_before_pixels=True))
    assert labels.is_label(hd.seg.segread(lits.binary))
    ds = pydicom.dcmread(lits.binary)
    del ds.ReferencedSeriesSequence
    ds.save_as(tmp_path / "orphan.dcm")
    with pytest.raises(LabelError, match=r"orphan\.dcm: SEG names no referenced series"):
        describe(tmp_path / "orphan.dcm")
