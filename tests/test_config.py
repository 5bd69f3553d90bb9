import subprocess
import sys

import pytest
import yaml

from liverseg.config import ConfigError, load_params, parse_params
from tests.helpers import REPO


def test_repository_params_parse():
    params = load_params(REPO / "params.yaml")
    assert params.data.source == "phantom"
    assert "enhanced_pan" in params.models
    limit = params.validate_.max_quarantine_fraction
    assert params.dump()["validate"]["max_quarantine_fraction"] == limit


@pytest.mark.parametrize(
    ("raw", "named"),
    [
        ({"train": {"epochz": 3}}, "train.epochz"),
        ({"train": {"epochs": "many"}}, "train.epochs"),
        ({"models": ["enhanced_pan", "segformer9000"]}, "segformer9000"),
        ({"data": {"source": "ftp"}}, "data.source"),
        ({"surprise": 1}, "surprise"),
        ({"train": {"batch_size": 1}}, "train.batch_size"),
    ],
)
def test_bad_params_fail_naming_the_key(raw, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        parse_params(raw)


def test_cli_rejects_bad_params_at_once(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump({"train": {"epochz": 3}}))
    proc = subprocess.run([sys.executable, "-m", "liverseg.cli", "ingest", "-p", str(bad)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "train.epochz" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "data").exists()


def test_cli_lists_every_model_with_its_parameter_count():
    from liverseg.models import MODEL_NAMES

    proc = subprocess.run([sys.executable, "-m", "liverseg.cli", "models", "-p",
                           str(REPO / "params.yaml")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert [line.split()[0] for line in lines] == list(MODEL_NAMES)
    assert all(int(line.split()[1].replace(",", "")) > 1_000_000 for line in lines)
