"""The PACS batch over DICOMweb: every CT series of some studies fetched, predicted as a local
series, and its SEG stored back into its study (the archive client: `liverseg.dicom.web`).
A series that already holds a SEG from the same model (its SeriesDescription, which
`seg_writer.write_seg` writes as `liverseg <model> <version>`) is skipped.
"""

from __future__ import annotations

from pathlib import Path

from liverseg.boundary import Refused, safe_name
from liverseg.dicom.web import RemoteSeries, connect, ct_studies, fetch, segmented, series_of, store
from liverseg.redact import redact


def run(model_ref: str, url: str, studies: list[str], out_dir: str | Path,
        since: str | None = None, policy=None) -> dict:
    """The CT series of `studies` (or of every CT study since `since`) from a DICOMweb
    archive, each predicted as a local series and its SEG stored back into its study; a
    series already holding a SEG from this model version is skipped. The archive down:
    `ArchiveUnavailable`, naming it."""
    import tempfile

    from liverseg.serving import predict
    from liverseg.serving.inputs import outcome

    policy, out_dir = policy or predict.Policy(), Path(out_dir)
    client = connect(url)
    studies = list(studies) or ct_studies(client, url, since)
    predictor, outcomes = predict.start(model_ref, out_dir)
    public = redact(url)  # once: the URL is the only part that can hold a credential
    for study in studies:
        remote = series_of(client, url, study)
        done_before = segmented(client, url, remote, predictor.seg_description)
        for series in remote:
            where = f"{public} study {study} series {series.uid}"
            if series.modality != "CT":
                why = (f"modality {series.modality!r}, not CT (rule: modality CT)"
                       if series.modality != "SEG" else "a segmentation, not an image")
                outcomes.add(outcome(where, "skipped", why, "dicomweb"))
            elif series.uid in done_before:
                outcomes.add(outcome(where, "skipped", f"already holds a SEG from "
                                                    f"{predictor.seg_description!r}", "dicomweb"))
            else:
                with tempfile.TemporaryDirectory(prefix=".dicomweb-", dir=out_dir) as folder:
                    for row in _predict_remote(client, url, series, Path(folder), predictor,
                                               out_dir, policy):
                        outcomes.add(row | {"input": where})
    return predict.summary(model_ref, outcomes) | {"studies": studies}


def _predict_remote(client, url: str, series: RemoteSeries, folder: Path, predictor,
                    out_dir: Path, policy) -> list[dict]:
    """One fetched series: its rows (the caller names their input), the SEG stored back."""
    from liverseg.dicom import series as dicom
    from liverseg.serving import predict
    from liverseg.serving.inputs import Item, outcome

    try:
        files = fetch(client, url, series, folder, policy.limits)
    except Refused as exc:
        return [outcome("", "refused", str(exc), "dicom")]
    found = dicom.find_series(files, policy.limits)
    rows = [outcome("", "skipped", why, "dicom") for _, why in found.skipped]
    rows += [outcome("", "refused", why, "dicom") for _, why in found.refused]
    for s in found.series:
        name = f"{safe_name(series.study_uid)}/{safe_name(f'series-{s.number or s.uid}')}"
        row = predict.predict_item(predictor, Item(s, name), out_dir, policy)
        if row["status"] == "done":
            row["seg_sop_uid"] = store(client, url, out_dir / row["seg"])
        rows.append(row)
    return rows
