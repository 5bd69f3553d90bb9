"""The Dagster UI in a real browser: dagster-webserver on 127.0.0.1, headless Chromium.

Saves reports/screenshots/{dagster-assets,dagster-monitoring,report-top,report-visual}.png;
the copies the README shows (docs/images/) are taken from a full `make repro` run, not from
this tiny one (docs/MONITORING.md's dagster-monitoring.png is this tiny one's, saying so).
Skips (saying why) where Chromium is not installed, unless
LIVERSEG_REQUIRE_CHROMIUM is set (CI installs Debian's `chromium` package and sets it).
"""

import json
import os
import shutil
import subprocess
import time
import urllib.request

import pytest

from liverseg.fanout.dvc_graph import load_stages
from liverseg.monitoring import drift
from liverseg.monitoring.store import ServedCaseStore
from pipeline.assets import asset_key
from tests.helpers import REPO, free_port, sh, slice_pngs, stop_process_group

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOT = REPO / "reports/screenshots/dagster-assets.png"


def _graphql(url: str, query: str) -> dict:
    request = urllib.request.Request(f"{url}/graphql", json.dumps({"query": query}).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())["data"]


def _wait_loaded(url: str, proc: subprocess.Popen, timeout: float = 150) -> None:
    """Until the code location has loaded (the server answers before it has)."""
    query = "{ workspaceOrError { ... on Workspace { locationEntries { loadStatus } } } }"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "dagster-webserver exited"
        try:
            entries = _graphql(url, query)["workspaceOrError"]["locationEntries"]
            if entries and all(e["loadStatus"] == "LOADED" for e in entries):
                return
        except OSError:
            pass
        time.sleep(1)
    pytest.fail(f"dagster-webserver at {url} did not load the code location in {timeout}s")


def _chromium(*args: str) -> str:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--hide-scrollbars", "--window-size=1600,1000", "--virtual-time-budget=15000", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


# CI that installs Chromium sets LIVERSEG_REQUIRE_CHROMIUM, which turns the skip into a failure.
REQUIRED = bool(os.environ.get("LIVERSEG_REQUIRE_CHROMIUM"))
MISSING = "headless Chromium is not installed (apt-get install -y --no-install-recommends chromium)"


@pytest.fixture
def chromium() -> str:
    """Before repo_copy in a test's arguments: the skip is decided before that runs."""
    if CHROMIUM is None:
        if REQUIRED:
            pytest.fail(f"LIVERSEG_REQUIRE_CHROMIUM is set but {MISSING}")
        pytest.skip(MISSING)
    return CHROMIUM


def _webserver(root, env: dict, home, log) -> tuple[subprocess.Popen, str]:
    """dagster-webserver on `home` (a Dagster home), in its own session (process group), so
    stopping it stops its code-server child too; returns it and its URL."""
    port = free_port()
    proc = subprocess.Popen(
        ["dagster-webserver", "-m", "pipeline.definitions", "-h", "127.0.0.1", "-p", str(port)],
        cwd=root, env=env | {"DAGSTER_HOME": str(home)}, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)
    return proc, f"http://127.0.0.1:{port}"


def test_asset_graph_in_a_browser(chromium, repo_copy, tmp_path):
    root, env = repo_copy
    # A copy of the run storage: the UI shows the copy's runs, the copy itself stays as it is.
    home = tmp_path / "dagster_home"
    shutil.copytree(root / ".dagster_home", home)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (tmp_path / "webserver.log").open("w")
    # Its own session (process group), so stopping it stops its code-server child too.
    proc = subprocess.Popen(
        ["dagster-webserver", "-m", "pipeline.definitions", "-h", "127.0.0.1", "-p", str(port)],
        cwd=root, env=env | {"DAGSTER_HOME": str(home)}, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)
    try:
        _wait_loaded(url, proc)
        # The first visit from 127.0.0.1 opens a "join the community" dialog over the graph.
        _graphql(url, "mutation { setNuxSeen }")
        page = f"{url}/asset-groups"
        dom = _chromium("--dump-dom", page)
        for name in load_stages(root):
            assert f">{asset_key(name).to_user_string()}<" in dom, name
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        SCREENSHOT.unlink(missing_ok=True)
        _chromium(f"--screenshot={SCREENSHOT}", page)
        assert SCREENSHOT.stat().st_size > 20_000  # a rendered graph, not a blank page
    finally:
        stop_process_group(proc, timeout=20)
        log.close()


# Headless screenshots ignore #anchors (they capture a blank viewport), so the visual
# section is shot from a copy of the page that hides the other sections.
ONLY_VISUAL = "<style>section:not(#visual), nav, h1 {display: none}</style></head>"


def test_report_in_a_browser(chromium, repo_copy, tmp_path):
    """The pipeline's report.html opens offline; its table carries the metrics files' numbers."""
    root, _ = repo_copy
    report = root / "reports/report.html"
    html = report.read_text()
    comparison = html[html.index('id="comparison"'):html.index('id="visual"')]
    for metrics_file in (root / "reports/metrics").glob("*.json"):
        metrics = json.loads(metrics_file.read_text())
        if metrics["fg_iou"] is not None:
            assert f"{metrics['fg_iou']:.4f}" in comparison, metrics_file.name
    visual_only = tmp_path / "report-visual.html"
    visual_only.write_text(html.replace("</head>", ONLY_VISUAL, 1))
    for name, page in {"report-top.png": report, "report-visual.png": visual_only}.items():
        shot = SCREENSHOT.parent / name
        shot.unlink(missing_ok=True)
        shot.parent.mkdir(parents=True, exist_ok=True)
        _chromium(f"--screenshot={shot}", page.as_uri())
        assert shot.stat().st_size > 20_000, name  # rendered content, not a blank page


MONITORING_SHOT = SCREENSHOT.parent / "dagster-monitoring.png"
CHECKS = [f"{group}_drift" for group in drift.GROUPS] + ["corrections"]  # pipeline/monitoring.py


def test_monitoring_asset_and_checks_in_a_browser(chromium, repo_copy, tmp_path):
    """The champion serves every stored slice with a served-case store set; the `monitor`
    job materialises `served_cases` and its checks into a copy of the Dagster home; the
    asset's Checks tab names the asset and every check (docs/MONITORING.md's screenshot)."""
    root, env = repo_copy
    home = tmp_path / "dagster_home"
    shutil.copytree(root / ".dagster_home", home)
    store = tmp_path / "monitoring"
    env = env | {"DAGSTER_HOME": str(home), "LIVERSEG_MONITORING_DIR": str(store)}
    images = slice_pngs(root / "data/raw", tmp_path / "slices")
    sh(["liverseg", "predict", "--model", "models:/liverseg@champion", *map(str, images),
        "--out", str(tmp_path / "served")], root, env)
    assert len(ServedCaseStore(store).read()) == len(images) >= drift.MIN_CURRENT_ROWS
    out = sh(["dagster", "job", "execute", "-m", "pipeline.definitions", "-j", "monitor"],
             root, env)
    assert "RUN_SUCCESS" in out
    assert (store / "status.json").is_file()
    log = (tmp_path / "webserver.log").open("w")
    proc, url = _webserver(root, env, home, log)
    try:
        _wait_loaded(url, proc)
        _graphql(url, "mutation { setNuxSeen }")
        page = f"{url}/assets/served_cases?view=checks"
        dom = _chromium("--virtual-time-budget=30000", "--dump-dom", page)
        assert ">served_cases<" in dom
        missing = [name for name in CHECKS if f">{name}<" not in dom]
        assert not missing, f"the Checks tab does not name {missing}"
        MONITORING_SHOT.parent.mkdir(parents=True, exist_ok=True)
        MONITORING_SHOT.unlink(missing_ok=True)
        _chromium("--virtual-time-budget=30000", f"--screenshot={MONITORING_SHOT}", page)
        assert MONITORING_SHOT.stat().st_size > 20_000  # a rendered page, not a blank one
    finally:
        stop_process_group(proc, timeout=20)
        log.close()
