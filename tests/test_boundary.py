"""The serving boundary (DESIGN rule 9): safe names, limits from headers, intensities that
cannot be CT, the pyfunc's REST contract, secrets and a crash-safe register."""

from __future__ import annotations

import json
import os
import resource
import secrets
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml

from liverseg import tracking
from liverseg.boundary import Limits, Refused, check_grey_batch, check_hu, safe_name
from liverseg.serving import predict
from tests.helpers import copy_workspace, free_port, record_failure, wait_for_http

CHAMPION = "models:/liverseg@champion"

# ----------------------------------------------------------------------------- names


@pytest.mark.parametrize("hostile", ["../../etc/passwd", "1.2.3/../../../escaped", "..", ".",
                                     "", "a\\b", "C:\\x", "séries 201", "x" * 300, "a\x00b",
                                     "/abs/path", ".hidden"])
def test_safe_name_is_one_bounded_component_that_cannot_escape(hostile):
    name = safe_name(hostile)
    assert name and len(name) <= 64 and not name.startswith(".")
    assert "/" not in name and "\\" not in name and "\x00" not in name
    assert set(name) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")
    assert safe_name(hostile) == name  # stable


def test_safe_names_keep_clean_names_and_never_merge_two_inputs():
    assert safe_name("S2010_series-201") == "S2010_series-201"
    assert safe_name("1.2.840.113619.2.55") == "1.2.840.113619.2.55"
    assert safe_name("a/b") != safe_name("a_b") and safe_name("a/b") != safe_name("a:b")
    assert safe_name("x" * 300) != safe_name("x" * 301)


# ----------------------------------------------------------------------------- limits


def test_limits_come_from_the_environment_and_name_the_rule(monkeypatch):
    monkeypatch.setenv("LIVERSEG_MAX_VOXELS", "1e6")
    limits = Limits.from_env()
    assert limits.max_voxels == 1_000_000 and limits.max_slices == Limits().max_slices
    with pytest.raises(Refused, match=r"x\.nii: declares 2,097,152 voxels, above the limit "
                                      r"max_voxels=1,000,000 .*LIVERSEG_MAX_VOXELS"):
        limits.check_volume("x.nii", (128, 128, 128), 2)
    with pytest.raises(Refused, match="max_side"):
        Limits().check_volume("x.nii", (8192, 8192, 2048), 2)
    monkeypatch.setenv("LIVERSEG_MAX_SLICES", "many")
    with pytest.raises(Refused, match="LIVERSEG_MAX_SLICES='many': not a number"):
        Limits.from_env()


def test_hu_check_refuses_what_cannot_be_ct_and_passes_real_ct():
    rng = np.random.default_rng(0)
    for values, rule in [(rng.random((8, 8, 4)), "span under 50 HU"),
                         (np.full((8, 8, 4), 40.0), "span under 50 HU"),
                         (rng.integers(0, 4096, (8, 8, 4)), "none below 0 HU")]:
        with pytest.raises(Refused, match=rule):
            check_hu("v.nii", values)
    ct = rng.normal(40, 60, (8, 8, 4))
    ct[:2] = -3024  # the padding outside a scanner's field of view
    check_hu("ct.nii", ct)


def test_rest_contract_refuses_each_rule_by_name():
    ok = np.full((2, 1, 64, 64), 100.0, np.float32)
    check_grey_batch(ok, 1, Limits())
    nan = ok.copy()
    nan[0, 0, 0, 0] = np.nan
    for x, rule in [(nan, "1 NaN or infinite"), (ok * 20 - 1000, "outside 0..255"),
                    (ok[:, :, :1, :1], "height and width must be 16..2048"),
                    (np.zeros((1, 1, 4096, 4096), np.float32), "16..2048"),
                    (np.zeros((65, 1, 32, 32), np.float32), "1..64 per request"),
                    (np.zeros((1, 3, 32, 32), np.float32), "takes 1 per image"),
                    (np.zeros((32, 32), np.float32), r"expected \[N, C, H, W\]")]:
        with pytest.raises(Refused, match=rule):
            check_grey_batch(x, 1, Limits())


# ----------------------------------------------------------------------------- volumes


@pytest.fixture
def model_dir(registered_template) -> str:
    return str(registered_template / "models/enhanced_pan")


def _volume(tmp_path: Path, name: str, data: np.ndarray) -> Path:
    path = tmp_path / name
    nib.save(nib.Nifti1Image(data, np.diag([0.8, 0.8, 2.5, 1.0])), str(path))
    return path


def _ct(shape=(48, 40, 3)) -> np.ndarray:
    return np.random.default_rng(1).normal(40, 120, shape).astype(np.float32)


def test_nan_and_non_hu_volumes_are_refused_each_in_its_row(model_dir, tmp_path):
    nan = _ct()
    nan[3:6, 4:9, 1] = np.nan
    nan[0, 0, 0] = np.inf
    inputs = [_volume(tmp_path, "nan.nii.gz", nan),
              _volume(tmp_path, "unit.nii.gz", np.random.default_rng(2).random((48, 40, 3))),
              _volume(tmp_path, "flat.nii.gz", np.full((48, 40, 3), 7, np.int16)),
              _volume(tmp_path, "ct.nii.gz", _ct())]
    summary = predict.run(model_dir, inputs, tmp_path / "out")
    rows = pd.read_csv(tmp_path / "out/predictions.csv").set_index("input")
    assert (summary["done"], summary["refused"]) == (1, 3)
    assert "16 NaN or infinite voxel(s)" in rows.loc[str(inputs[0]), "reason"]
    assert "span under 50 HU" in rows.loc[str(inputs[1]), "reason"]
    assert "span under 50 HU" in rows.loc[str(inputs[2]), "reason"]
    assert rows.loc[str(inputs[3]), "status"] == "done"
    assert not (tmp_path / "out/nan_mask.nii.gz").exists()  # no mask from impossible values


def test_allow_nonfinite_counts_them_and_never_makes_them_foreground(model_dir, tmp_path):
    nan = _ct()
    nan[:, :, 1] = np.nan  # a whole slice: the model would otherwise see it as -1024 HU
    path = _volume(tmp_path, "nan.nii.gz", nan)
    policy = predict.Policy(allow_nonfinite=True, hu_check=False)
    predict.run(model_dir, [path], tmp_path / "out", policy)
    row = pd.read_csv(tmp_path / "out/predictions.csv").iloc[0]
    mask = np.asarray(nib.load(str(tmp_path / "out/nan_mask.nii.gz")).dataobj)
    assert row["status"] == "done" and row["nonfinite_voxels"] == 48 * 40
    assert mask[:, :, 1].sum() == 0


def _declaring(path: Path, shape: tuple[int, ...]) -> Path:
    """A NIfTI whose header declares `shape` int16 but whose file holds almost nothing."""
    small = nib.Nifti1Image(np.zeros((2, 2, 2), np.int16), np.eye(4))
    header = small.header.copy()
    header.set_data_shape(shape)
    raw = header.binaryblock + b"\0" * (352 - len(header.binaryblock)) + b"\0" * 64
    path.write_bytes(raw)
    return path


def _cap_address_space(gib: int):
    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (gib << 30, gib << 30))
    return cap


def test_an_impossible_header_is_refused_before_allocating(model_dir, tmp_path):
    """8192x8192x2048 int16 declared (256 GiB): refused by name from the header, in a
    `liverseg predict` whose address space is capped at 16 GiB (room for torch, none for
    the volume); the batch's other input is done and the exit code says one was refused."""
    bomb = _declaring(tmp_path / "bomb.nii", (8192, 8192, 2048))
    good = _volume(tmp_path, "ct.nii.gz", _ct())
    cli = Path(sys.executable).parent / "liverseg"
    proc = subprocess.run([str(cli), "predict", "--model", model_dir, str(bomb), str(good),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True,
                          preexec_fn=_cap_address_space(16), timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "MemoryError" not in proc.stderr
    rows = pd.read_csv(tmp_path / "out/predictions.csv").set_index("status")
    assert "declares 8192x8192 per slice, above the limit max_side=4,096" in \
        rows.loc["refused", "reason"]
    assert rows.loc["done", "input"] == str(good)


# ----------------------------------------------------------------------------- the pyfunc


def test_pyfunc_refuses_outside_its_contract_and_serves_inside(registry):
    from mlflow.exceptions import MlflowException

    served = tracking.mlflow().pyfunc.load_model(CHAMPION)
    grey = np.full((1, 1, 40, 56), 120.0, np.float32)
    assert served.predict(grey).shape == (1, 1, 40, 56)
    with pytest.raises(MlflowException, match="outside 0..255") as err:
        served.predict(grey * 0 - 1000)
    assert err.value.get_http_status_code() == 400
    with pytest.raises(MlflowException, match="NaN"):
        served.predict(np.where(grey > 0, np.nan, grey))


def test_a_normal_predict_prints_no_third_party_warning(registry, tmp_path):
    images = sorted((registry / "slices").glob("*.png"))[:2]
    cli = Path(sys.executable).parent / "liverseg"
    proc = subprocess.run([str(cli), "predict", "--model", CHAMPION, *map(str, images),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True,
                          cwd=registry, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Warning" not in proc.stderr and "warn" not in proc.stderr.lower(), proc.stderr


# ----------------------------------------------------------------------------- secrets


def test_no_command_prints_the_tracking_password(registered, tmp_path):
    """evaluate, register, predict and lineage against a tracking server whose URI holds a
    password and that is down: each fails naming the server, and the password is nowhere."""
    root = registered
    secret = f"pw-{secrets.token_hex(8)}"  # made here: this file is copied into the repo
    env = os.environ | {"MLFLOW_TRACKING_URI": f"http://user:{secret}@127.0.0.1:"
                                               f"{free_port()}",
                        "LIVERSEG_TRACKING_TIMEOUT": "2"}
    cli = str(Path(sys.executable).parent / "liverseg")
    image = next((root / "slices").glob("*.png"))
    for args in (["evaluate", "enhanced_pan"], ["register"], ["lineage", CHAMPION],
                 ["predict", "--model", CHAMPION, str(image), "--out", str(tmp_path / "o")]):
        proc = subprocess.run([cli, *args], cwd=root, env=env, capture_output=True,
                              text=True, timeout=300)
        output = proc.stdout + proc.stderr
        assert proc.returncode != 0, output
        assert secret not in output and "127.0.0.1" in output, output
        assert "Traceback" not in output, output
    for path in root.rglob("*"):  # nor in anything a command wrote
        if path.is_file() and path.stat().st_size < 5_000_000 and ".git" not in path.parts:
            assert secret.encode() not in path.read_bytes(), path


@pytest.mark.slow  # the real DvcResource runs `dvc repro register` in repo_copy
def test_a_dagster_materialisation_keeps_the_password_out_of_its_trail(repo_copy, tmp_path,
                                                                       monkeypatch):
    """register materialised through Dagster (the real DvcResource: `dvc repro`) against the
    down server: the step fails, and the password is in no event, failure metadata, run
    tag or the failure sensor's failures.jsonl."""
    import dagster as dg

    from pipeline.assets import asset_key, build_assets
    from pipeline.resources import DvcResource, MlflowResource

    root = tmp_path / "repo"
    copy_workspace(repo_copy[0], root)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["register"]["min_dice"] = 0.001  # a changed param: DVC reruns register
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    secret = f"pw-{secrets.token_hex(8)}"
    for key, value in repo_copy[1].items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    monkeypatch.setenv("LIVERSEG_TRACKING_TIMEOUT", "2")
    uri = f"http://user:{secret}@127.0.0.1:{free_port()}"
    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize(build_assets(root), selection=[asset_key("register")],
                            instance=instance, raise_on_error=False,
                            resources={"dvc": DvcResource(repo_root=str(root)),
                                       "mlflow": MlflowResource(tracking_uri=uri)})
    assert not result.success
    record_failure(instance, result)
    trail = [str(e) for e in instance.all_logs(result.run_id)]
    trail += [str(result.dagster_run.tags), (tmp_path / "failures.jsonl").read_text()]
    assert any("127.0.0.1" in t for t in trail)  # the failure names the server ...
    assert not [t for t in trail if secret in t]  # ... and never its password


# ----------------------------------------------------------------------------- register


def test_register_survives_a_crash_between_history_and_alias(registered, monkeypatch):
    """A fault after the history is written and before the alias moves, then a rerun: one
    version for the training run, one event in alias_history, the alias moved."""
    from mlflow import MlflowClient

    from liverseg.config import load_params
    from liverseg.stages import register

    root = registered
    params = load_params(root / "params.yaml")
    params = params.model_copy(update={"register_": params.register_.model_copy(
        update={"model_name": "liverseg_crash_test"})})
    real = MlflowClient.set_registered_model_alias

    def crash(*args, **kwargs):
        raise RuntimeError("injected: killed before the alias moved")

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", crash)
    with pytest.raises(RuntimeError, match="injected"):
        register.run(params)
    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", real)
    register.run(params)
    register.run(params)  # and a plain rerun changes nothing
    client = tracking.mlflow().MlflowClient()
    versions = client.search_model_versions("name='liverseg_crash_test'")
    assert len(versions) == 1
    model = client.get_registered_model("liverseg_crash_test")
    history = json.loads(model.tags["alias_history"])
    assert [(e["alias"], e["from_version"], e["to_version"]) for e in history] == [
        ("champion", None, 1)]
    assert model.aliases == {"champion": 1}


# ----------------------------------------------------------------------------- REST


@pytest.mark.slow
def test_rest_server_answers_a_bounded_load_and_refuses_the_bad_corpus(registry, tmp_path):
    """`mlflow models serve` of the champion on 127.0.0.1: 200 requests, 4 at a time, all
    200 and equal to `liverseg predict`'s masks; each bad request 400 with its rule."""
    import concurrent.futures
    import urllib.request

    from PIL import Image

    port = free_port()
    mlflow_cli = Path(sys.executable).parent / "mlflow"
    server = subprocess.Popen(
        [str(mlflow_cli), "models", "serve", "-m", CHAMPION, "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port), "-w", "2"],
        env=os.environ | {"MLFLOW_TRACKING_URI": os.environ["MLFLOW_TRACKING_URI"]},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/ping", server, 180)

        def post(body: bytes) -> tuple[int, bytes]:
            request = urllib.request.Request(f"{url}/invocations", body,
                                             {"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    return response.status, response.read()
            except urllib.error.HTTPError as exc:
                return exc.code, exc.read()

        images = sorted((registry / "slices").glob("*.png"))[:4]
        predict.run(CHAMPION, images, tmp_path / "pred")
        rows = pd.read_csv(tmp_path / "pred/predictions.csv")
        bodies = [json.dumps({"inputs": np.asarray(Image.open(p), np.float32)[None, None]
                              .tolist()}).encode() for p in images]
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(post, [bodies[i % 4] for i in range(200)]))
        assert [status for status, _ in answers] == [200] * 200
        for i, (_, body) in enumerate(answers[:4]):
            probs = np.asarray(json.loads(body)["predictions"])[0, 0]
            mask = np.asarray(Image.open(tmp_path / "pred" / rows["mask"][i])) > 127
            np.testing.assert_array_equal(probs > 0.5, mask)
            assert all(b == answers[i][1] for _, b in answers[i::4])

        grey = np.full((1, 1, 32, 32), 100.0)
        # each bad request, and the rule its 400 must name (SERVING's boundary table): the
        # pyfunc's own check ("liverseg: ...") or, for a shape the logged signature already
        # excludes, MLflow's schema enforcement, which names the expected shape
        schema = "does not match expected shape (-1, 1, -1, -1)"
        bad = [(np.where(grey > 0, np.nan, grey), ("liverseg: 1024 NaN or infinite",)),
               (grey * 20 - 1000, ("liverseg: ", "outside 0..255")),
               ([[[[100.0]]]], ("liverseg: ", "height and width must be 16..2048")),
               (np.zeros((1, 1, 4096, 4096), np.uint8), ("liverseg: ", "16..2048")),
               (np.full((65, 1, 16, 16), 100.0), ("liverseg: ", "1..64 per request")),
               (np.zeros((1, 3, 32, 32)), (schema,)),
               (np.full((16, 16), 100.0), ("Shape of input (16, 16)",))]
        for inputs, rule in bad:
            status, text = post(json.dumps({"inputs": np.asarray(inputs).tolist()}).encode())
            assert status == 400, (rule, status, text[:300])
            message = json.loads(text)["message"]
            assert all(part in message for part in rule), (rule, message[-300:])
        status, text = post(b"{not json")  # refused by MLflow's parser, before the pyfunc
        assert status == 400 and json.loads(text)["error_code"] == "BAD_REQUEST", text[:300]
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


def test_max_bytes_refuses_a_volume_by_its_declared_pixel_bytes(model_dir, tmp_path,
                                                                monkeypatch):
    """LIVERSEG_MAX_BYTES bounds voxels x bytes per voxel, read from the header: with a
    limit of 20,000 bytes a 48x40x3 float32 volume (23,040 bytes) is refused naming the
    rule and the variable, the same voxels as int16 (11,520 bytes) are predicted."""
    from typer.testing import CliRunner

    from liverseg.cli import app

    wide = _volume(tmp_path, "float32.nii.gz", _ct())
    narrow = _volume(tmp_path, "int16.nii.gz", _ct().round().astype(np.int16))
    monkeypatch.setenv("LIVERSEG_MAX_BYTES", "20000")
    result = CliRunner().invoke(app, ["predict", "--model", model_dir, str(wide), str(narrow),
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    rows = pd.read_csv(tmp_path / "out/predictions.csv").set_index("status")
    assert rows.loc["refused", "input"] == str(wide)
    assert "above the limit max_bytes=20,000" in rows.loc["refused", "reason"]
    assert "LIVERSEG_MAX_BYTES" in rows.loc["refused", "reason"]
    assert rows.loc["done", "input"] == str(narrow)
