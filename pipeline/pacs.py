"""The PACS round trip in Dagster: a sensor polls the archive (DICOMweb QIDO-RS) for CT
studies and requests one run per study of the job `segment_study`, partitioned by
StudyInstanceUID (dynamic partitions), which runs `liverseg predict --dicomweb` on it: the
registry's champion at run time, each SEG stored back into the study (STOW-RS).

A study is requested again only while it has no successful or ongoing run: a run that failed
(the archive went down) is retried on the next tick after the archive is back, and a new
champion does not re-segment old studies (backfill them from the UI to do that). The
archive's URL and the poll interval are configuration: `LIVERSEG_DICOMWEB_URL` (the `pacs`
resource) and `LIVERSEG_PACS_POLL_SECONDS`.
"""

# No `from __future__ import annotations`: Dagster inspects the `context` type hint at runtime.
import json
import os
import sys
from pathlib import Path

import dagster as dg

from liverseg import runner
from liverseg.boundary import safe_name
from liverseg.dicom import web as dicomweb
from liverseg.redact import redact
from pipeline.metadata import csv_rows
from pipeline.resources import MlflowResource, PacsResource

POLL_SECONDS = int(os.environ.get("LIVERSEG_PACS_POLL_SECONDS", "60"))
ct_studies = dg.DynamicPartitionsDefinition(name="ct_studies")


@dg.op(description="liverseg predict --dicomweb on one study: SEGs stored back into it.")
def segment_one_study(context: dg.OpExecutionContext, pacs: PacsResource,
                  mlflow: MlflowResource) -> dict:
    study = context.partition_key
    out = Path(pacs.out_dir) / safe_name(study)
    cli = Path(sys.executable).parent / "liverseg"
    proc = runner.run([str(cli), "predict", "--model", pacs.model, "--dicomweb", pacs.url,
                       "--study", study, "--out", str(out)], env=os.environ | mlflow.env(),
                      timeout=None)
    if proc.returncode not in (0, 2):  # 2: a series refused, the others done (its rows say)
        raise dg.Failure(description=redact(proc.stderr.strip().splitlines()[-1]
                                            if proc.stderr.strip() else "liverseg failed"),
                         metadata={"stderr": dg.MetadataValue.text(redact(proc.stderr[-4000:]))})
    rows = csv_rows(out / "predictions.csv")
    done = [r for r in rows if r["status"] == "done"]
    metadata = {"study": study, "model": pacs.model,
                "model_version": next((r["model_version"] for r in rows), ""),
                "series": [r.get("series_uid", "") for r in done],
                "seg_sop_instance_uids": [r.get("seg_sop_uid", "") for r in done],
                "outcomes": [f"{r['status']}: {r['input']} {r['reason']}".strip() for r in rows]}
    context.add_output_metadata({k: dg.MetadataValue.json(v) if isinstance(v, list) else v
                                 for k, v in metadata.items()})
    return metadata


@dg.job(name="segment_study", partitions_def=ct_studies,
        description="Segment one CT study from the archive.")
def segment_study_job():
    segment_one_study()


def _settled(instance: dg.DagsterInstance) -> set[str]:
    """Studies with a run that succeeded or is under way: nothing to request (one query)."""
    runs = instance.get_runs(filters=dg.RunsFilter(
        job_name=segment_study_job.name,
        statuses=[dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.STARTED,
                  dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED,
                  dg.DagsterRunStatus.STARTING]))
    return {run.tags.get("dagster/partition") for run in runs}


@dg.sensor(job=segment_study_job, minimum_interval_seconds=POLL_SECONDS,
           default_status=dg.DefaultSensorStatus.STOPPED,
           description="Polls the archive for CT studies; one run per study not yet done.")
def new_ct_studies(context: dg.SensorEvaluationContext, pacs: PacsResource):
    if not pacs.url:
        return dg.SkipReason("no archive configured (LIVERSEG_DICOMWEB_URL)")
    try:
        studies = dicomweb.ct_studies(dicomweb.connect(pacs.url), pacs.url)
    except dicomweb.ArchiveUnavailable as exc:
        return dg.SkipReason(str(exc))  # the cursor stays: the next tick tries again
    known = set(json.loads(context.cursor or "[]"))
    new = [s for s in studies if s not in known]
    settled = _settled(context.instance)
    wanted = [s for s in studies if s not in settled]
    if not wanted and not new:
        return dg.SkipReason(f"no new CT study among {len(studies)}")
    return dg.SensorResult(
        run_requests=[dg.RunRequest(partition_key=s, tags={"liverseg/study": s})
                      for s in wanted],
        dynamic_partitions_requests=[ct_studies.build_add_request(new)] if new else [],
        cursor=json.dumps(sorted(known | set(studies))))
