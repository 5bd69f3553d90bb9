"""Serving: models applied to scans as hospitals send them (DESIGN rule 9).

`predict` (the `liverseg predict` batch), `inputs` (what it was given, named safely), `dicom`
(CT series in, DICOM SEG out), `dicomweb` (a PACS over QIDO/WADO/STOW-RS), `boundary`
(what the boundary refuses: names made safe, limits read from headers, intensities that
cannot be CT), `mlflow_pyfunc` (the REST contract) and `export` (ONNX).
"""
