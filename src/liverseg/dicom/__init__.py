"""DICOM reading and writing below both serving and `data/` (DESIGN's layers): CT series
(`series`), SEG out (`seg_writer`), labels in (SEG and RTSTRUCT: `labels`), and a DICOMweb
archive (`web`)."""
