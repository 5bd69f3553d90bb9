"""A CT DICOM series written from a NIfTI volume, with the header a scanner writes.

Slices in the usual orientation (ImageOrientationPatient 1,0,0 / 0,1,0: rows run to the
patient's left, columns to posterior, in DICOM's LPS), positions and pixel spacing from the
NIfTI affine, HU stored as unsigned values with RescaleIntercept. The same voxels sit at the
same world positions as in the NIfTI, so a correct reader gives back the same volume.
File names are random-looking and unordered: a reader must sort by position, not name.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

LPS = np.diag([-1.0, -1.0, 1.0])


def _base(study: str, series: str, frame: str, number: int) -> Dataset:
    ds = Dataset()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "LiTS^117", "117", "", "O"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260101", "120000", "1", ""
    ds.ReferringPhysicianName, ds.Manufacturer = "", "liverseg tests"
    ds.Modality, ds.SeriesNumber, ds.SOPClassUID = "CT", number, CTImageStorage
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleType, ds.KVP = 1, "HU", 120
    return ds


def write_series(volume: Path, out_dir: Path, series_number: int | None = 2,
                 study_uid: str | None = None, series_uid: str | None = None,
                 tilt_degrees: float = 0.0, drop: tuple[str, ...] = ()) -> list[Path]:
    """Write `volume` (NIfTI, HU) as one DICOM file per slice along its last axis.

    `series_number` None leaves SeriesNumber out; `tilt_degrees` stacks the slices at that
    angle to their normal, as a gantry tilt does (each slice's pixels unchanged, its
    position shifted towards posterior); `drop` names attributes to leave out."""
    img = nib.as_closest_canonical(nib.load(str(volume)))  # RAS axes: x to R, y to A
    hu = np.asarray(img.dataobj).astype(np.int32)
    zooms = [float(z) for z in img.header.get_zooms()[:3]]
    intercept = min(-1024, int(hu.min()))
    study, series, frame = study_uid or generate_uid(), series_uid or generate_uid(), \
        generate_uid()
    out_dir.mkdir(parents=True, exist_ok=True)
    nx, ny, nz = hu.shape
    files = []
    rng = np.random.default_rng(series_number or 0)
    shift = np.tan(np.radians(tilt_degrees)) * zooms[2]
    for k in range(nz):
        ds = _base(study, series, frame, series_number)
        for keyword in drop + (("SeriesNumber",) if series_number is None else ()):
            delattr(ds, keyword)
        # Column index c runs to the left (-x in RAS), row index r to posterior (-y): the
        # pixel (r, c) is voxel (nx-1-c, ny-1-r, k).
        corner = LPS @ (img.affine @ [nx - 1, ny - 1, k, 1])[:3] + [0, k * shift, 0]
        ds.ImagePositionPatient = [round(float(v), 4) for v in corner]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = [zooms[1], zooms[0]], zooms[2]
        ds.Rows, ds.Columns, ds.InstanceNumber = ny, nx, k + 1
        ds.RescaleIntercept = intercept
        pixels = (hu[::-1, ::-1, k].T - intercept).astype(np.uint16)
        ds.PixelData = pixels.tobytes()
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = \
            CTImageStorage, ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = out_dir / f"IM{rng.integers(1e9):09d}"  # no extension, as PACS exports
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files
