"""DICOM SEG out: a mask on the source images of a CT series, as `liverseg predict` writes it
(highdicom). One segment per foreground class, coded in SNOMED CT (the `dicom` source reads
these codes back first), SegmentAlgorithmType AUTOMATIC and the model named in the
SeriesDescription, so an archive can always tell a liverseg SEG from a clinician's label."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def seg_description(model_name: str, model_version: str = "") -> str:
    """What a liverseg SEG's SeriesDescription says: the model and its registry version (the
    DICOMweb batch recognises its own SEGs by it)."""
    return f"liverseg {model_name} {model_version}".strip()[:64]


def write_seg(path: Path, datasets: list, mask: np.ndarray, classes: tuple[str, ...],
              model_name: str, description: str | None = None) -> None:
    """A DICOM SEG of `mask` [slices, rows, columns] (class indices, slices in the order of
    `datasets`): one segment per foreground class, coded in SNOMED CT. `description` (the
    SeriesDescription) names the model and its version, so an archive can tell its SEGs."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    import liverseg

    concepts = {"liver": (codes.SCT.AnatomicalStructure, codes.SCT.Liver),
                "tumour": (codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Neoplasm)}
    algorithm = hd.AlgorithmIdentificationSequence(
        name=f"liverseg {model_name}", version=liverseg.__version__,
        family=codes.cid7162.ArtificialIntelligence)
    segments = [hd.seg.SegmentDescription(
        segment_number=k, segment_label=name, segmented_property_category=concepts[name][0],
        segmented_property_type=concepts[name][1], algorithm_identification=algorithm,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC)
        for k, name in enumerate(classes[1:], start=1)]
    seg = hd.seg.Segmentation(
        source_images=datasets, pixel_array=mask.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments, series_instance_uid=hd.UID(), series_number=999,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="liverseg",
        manufacturer_model_name=model_name, software_versions=liverseg.__version__,
        device_serial_number="none",
        series_description=description or seg_description(model_name))
    _no_empty_deidentification_method(seg)
    seg.save_as(path)


def _no_empty_deidentification_method(seg) -> None:
    """DeidentificationMethod is Type 1C (PS3.3 C.7.1.1): with PatientIdentityRemoved YES
    and no DeidentificationMethodCodeSequence it needs a value. Anonymisers often leave it
    empty and highdicom copies it as found; the SEG says the source did not state it. A new
    element, not a new value: highdicom shares the source's element, whose dataset the
    caller still holds."""
    if (seg.get("PatientIdentityRemoved") == "YES" and not seg.get("DeidentificationMethod")
            and "DeidentificationMethodCodeSequence" not in seg):
        seg.add_new("DeidentificationMethod", "LO", "not stated in the source images")
