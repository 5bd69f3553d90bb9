"""Serving: models applied to scans as hospitals send them (DESIGN rule 9).

`predict` (the `liverseg predict` batch), `dicom` (CT series in, DICOM SEG out), `boundary`
(what the boundary refuses: names made safe, limits read from headers, intensities that
cannot be CT), `mlflow_pyfunc` (the REST contract) and `export` (ONNX).
"""
