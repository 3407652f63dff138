"""`featstore ui` checked in a real browser: headless Chromium, driven through the DevTools protocol
over a pipe (--remote-debugging-pipe: no websocket library, no Playwright).

Needs Debian's `chromium` (`apt-get install chromium`) or any Chromium/Chrome on PATH (or
FEATSTORE_CHROMIUM=/path/to/binary); skipped with that reason otherwise. Screenshots go to the
test's tmp folder; FEATSTORE_SCREENSHOTS=DIR also copies them there (e.g. docs/screenshots)."""
import base64
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from featstore import track

CHROMIUM = os.environ.get("FEATSTORE_CHROMIUM") or next(
    (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")) if p),
    None)
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium on PATH (Debian: apt-get install chromium; or set FEATSTORE_CHROMIUM)")]
DEADLINE_S = 600  # only a hang waits this long: the server answering and each page rendering are polled (a loaded
# 2-core machine needs minutes to start MLflow)


class Browser:
    """Headless Chromium and a minimal DevTools protocol client: JSON messages, NUL-separated, on
    the child's fds 3 (commands) and 4 (replies and events)."""

    def __init__(self, exe: str, profile: Path, width=1600, height=2000):
        cmd_r, self._cmd_w = os.pipe()
        self._out_r, out_w = os.pipe()

        def child():
            os.dup2(cmd_r, 3)  # dup2 leaves them inheritable; the originals close on exec
            os.dup2(out_w, 4)
            os.setsid()
        self.proc = subprocess.Popen(
            [exe, "--headless", "--remote-debugging-pipe", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--no-default-browser-check", "--hide-scrollbars", f"--user-data-dir={profile}",
             f"--window-size={width},{height}", "about:blank"],
            preexec_fn=child, close_fds=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(cmd_r)
        os.close(out_w)
        self._buf, self._id = b"", 0
        target = next(t for t in self.call("Target.getTargets")["targetInfos"] if t["type"] == "page")
        self.session = self.call("Target.attachToTarget", targetId=target["targetId"], flatten=True)["sessionId"]
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                  mobile=False, session=True)

    def call(self, method, session=False, timeout=DEADLINE_S, **params):
        self._id += 1
        msg = dict(id=self._id, method=method, params=params)
        if session:
            msg["sessionId"] = self.session
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self._buf:
                raw, self._buf = self._buf.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self._id:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply.get("result", {})
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                raise TimeoutError(f"Chromium did not answer {method}")
            if select.select([self._out_r], [], [], left)[0]:
                chunk = os.read(self._out_r, 1 << 20)
                if not chunk:
                    raise RuntimeError("Chromium closed its DevTools pipe")
                self._buf += chunk

    def goto(self, url):
        self.call("Page.navigate", url=url, session=True)

    def js(self, expr):
        r = self.call("Runtime.evaluate", expression=expr, returnByValue=True, session=True)
        return r.get("result", {}).get("value")

    def wait_for(self, expr, what, timeout=DEADLINE_S):
        """Poll a JavaScript condition until it holds (the page renders asynchronously)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            v = self.js(expr)
            if v:
                return v
            # the next poll waits on the browser's own frame, not a fixed sleep
            self.js("new Promise(r => requestAnimationFrame(() => setTimeout(r, 50)))")
        raise AssertionError(f"the page never showed {what}; it shows: {str(self.js('document.body.innerText'))[:800]}")

    def screenshot(self, path: Path) -> Path:
        # MLflow's chat assistant panel opens beside every page; closed, the page gets the width
        self.js("document.querySelector('[data-component-id=\"mlflow.assistant.chat_panel.close\"]')?.click()")
        self.js("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
        png = self.call("Page.captureScreenshot", format="png", session=True)["data"]
        path.write_bytes(base64.b64decode(png))
        return path

    def close(self):
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)
        os.close(self._cmd_w)
        os.close(self._out_r)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_health(base, proc):
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"featstore ui exited: {proc.stderr.read()[-2000:]}")
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            try:
                proc.wait(timeout=0.5)  # wakes at once if the server dies
            except subprocess.TimeoutExpired:
                pass
    raise AssertionError("featstore ui never answered /health")


@pytest.fixture(scope="module")
def served(synth_stores, tmp_path_factory):
    """A small sweep tracked in a folder that is then MOVED; `featstore ui` serves the moved folder."""
    from featstore.sweep.run import run_study
    from featstore.sweep.config import load_study

    tmp = tmp_path_factory.mktemp("ui")
    first = tmp / "first"
    first.mkdir()
    cfg = first / "study.yaml"
    cfg.write_text("study: ui-check\nbackbones: [pixelstats]\nheads: {logreg: {trials: 2}, lightgbm: {trials: 1}}\n"
                   "protocols: {loso: {}, leave-pair-out: {}}\nbootstrap: 0\n")
    run_study(load_study(cfg), synth_stores["confounded"], first, f"sqlite:///{first / 'mlflow.db'}")
    moved = tmp / "moved"
    shutil.move(first, moved)  # artifacts must still open from the new place
    uri = f"sqlite:///{moved / 'mlflow.db'}"
    port = _free_port()
    proc = subprocess.Popen([str(Path(sys.executable).with_name("featstore")), "ui", "--port", str(port),
                             "--tracking-uri", uri], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_health(base, proc)
        browser = Browser(CHROMIUM, tmp / "profile")
        try:
            yield dict(base=base, uri=uri, browser=browser, shots=tmp / "screenshots")
        finally:
            browser.close()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)


def _units(uri):
    from mlflow import MlflowClient

    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("ui-check")
    runs = c.search_runs([exp.experiment_id], "tags.level = 'unit'")
    return exp.experiment_id, sorted(runs, key=lambda r: r.info.run_name)


def _keep(path: Path):
    dest = os.environ.get("FEATSTORE_SCREENSHOTS")
    if dest:
        Path(dest).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, Path(dest) / path.name)


def test_experiment_opens_on_runs(served):
    b, base = served["browser"], served["base"]
    exp_id, units = _units(served["uri"])
    b.goto(track.ui_url(base, exp_id))
    b.wait_for("document.title.startsWith('Runs')", "the runs page")
    # the sweep, by its readable name (its unit, fold and trial runs are nested under it)
    b.wait_for("/ui-check \\d{4}-\\d\\d-\\d\\d \\d\\d:\\d\\d/.test(document.body.innerText)", "the sweep run")
    served["shots"].mkdir(exist_ok=True)
    _keep(b.screenshot(served["shots"] / "mlflow-runs.png"))


def test_compare_view_shows_parameters_and_parallel_coordinates(served):
    b, base = served["browser"], served["base"]
    exp_id, units = _units(served["uri"])
    assert len(units) == 4  # loso and leave-pair-out, each with two heads
    q = urllib.parse.urlencode(dict(runs=json.dumps([u.info.run_id for u in units]), experiments=json.dumps([exp_id])),
                               quote_via=urllib.parse.quote)
    b.goto(f"{base}/#/compare-runs?{q}&workflowType=machine_learning")
    b.wait_for("document.body.innerText.includes('Comparing 4 Runs')", "the comparison of 4 runs")
    text = b.wait_for("document.body.innerText.includes('weights_id') && document.body.innerText", "the parameters")
    assert "No parameters to display" not in text
    for p in ("backbone", "head", "preprocess", "protocol", "selection", "target", "held_out", "weights_id"):
        assert p in text
    for m in ("auc_unseen_mean", "auc_unseen_worst"):
        assert m in text
    axes = b.wait_for("(() => { const a = [...document.querySelectorAll('.parcoords .axis-title')]"
                      ".map(e => e.textContent); return a.length >= 3 && a; })()", "parallel-coordinates axes")
    # the parameters that differ (head, protocol) and the headline metric, every run a line on them
    assert {"head", "protocol", "auc_unseen_mean"} <= set(axes), axes
    assert b.js("document.querySelectorAll('.parcoords .y-axis .tick').length") >= 4
    assert "NaN" not in b.js("[...document.querySelectorAll('.parcoords')].map(e => e.textContent).join(' ')")
    served["shots"].mkdir(exist_ok=True)
    _keep(b.screenshot(served["shots"] / "mlflow-compare.png"))


def test_artifacts_open_after_the_folder_moved(served):
    b, base = served["browser"], served["base"]
    exp_id, units = _units(served["uri"])
    run = units[0]
    with urllib.request.urlopen(f"{base}/get-artifact?path=per_source.csv&run_uuid={run.info.run_id}") as r:
        assert r.read().startswith(b"fold,test_set,scope")
    b.goto(f"{base}/#/experiments/{exp_id}/runs/{run.info.run_id}/artifacts/roc_seen_vs_unseen.png"
           "?workflowType=machine_learning")
    # the preview (a blob: image MLflow fetched through the server) decoded at the ROC figure's size
    b.wait_for("[...document.images].some(i => i.complete && i.naturalWidth >= 400)", "the ROC artifact image")
    served["shots"].mkdir(exist_ok=True)
    _keep(b.screenshot(served["shots"] / "mlflow-artifact.png"))
