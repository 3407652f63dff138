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
import re
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from featstore import track

CHROMIUM = os.environ.get("FEATSTORE_CHROMIUM") or next(
    (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")) if p),
    None)
pytestmark = [pytest.mark.slow, pytest.mark.browser, pytest.mark.skipif(
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
            os.set_inheritable(3, True)  # dup2 onto itself (a pipe that got fd 3) keeps close-on-exec
            os.set_inheritable(4, True)
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


def _wait_health(base, proc, log: Path):
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"featstore ui exited: {log.read_text()[-2000:]}")
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
    """A small sweep (two heads, mixed + loso + leave-pair-out) tracked in a folder that is then MOVED;
    `featstore ui` serves the moved folder; the report of the sweep is written beside it."""
    from featstore.probe import run_probe
    from featstore.report import write_report
    from featstore.store import connect
    from featstore.sweep.config import load_study
    from featstore.sweep.run import run_study

    tmp = tmp_path_factory.mktemp("ui")
    first = tmp / "first"
    first.mkdir()
    db = tmp / "fs.duckdb"
    shutil.copy(synth_stores["confounded"], db)  # never write to the shared session store
    cfg = first / "study.yaml"
    cfg.write_text("study: ui-check\nbackbones: [pixelstats]\nheads: {logreg: {trials: 1}, lightgbm: {trials: 1}}\n"
                   "protocols: {mixed: {folds: 2}, loso: {}, leave-pair-out: {}}\nbootstrap: 20\n")
    run_study(load_study(cfg), db, first, f"sqlite:///{first / 'mlflow.db'}")
    moved = tmp / "moved"
    shutil.move(first, moved)  # artifacts must still open from the new place
    uri = f"sqlite:///{moved / 'mlflow.db'}"
    run_probe(db, "pixelstats", grl=False, n_boot=0, tracking_uri=uri)  # the report's map and neighbours
    con = connect(db, read_only=True)
    try:
        write_report(con, tmp / "report", "ui-check")
    finally:
        con.close()
    port = _free_port()
    log = tmp / "ui.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([str(Path(sys.executable).with_name("featstore")), "ui", "--port", str(port),
                                 "--tracking-uri", uri], stdout=subprocess.DEVNULL, stderr=err, text=True,
                                start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_health(base, proc, log)
        browser = Browser(CHROMIUM, tmp / "profile")
        try:
            yield dict(base=base, uri=uri, browser=browser, shots=tmp / "screenshots", log=log,
                       report=tmp / "report" / "report.html")
        finally:
            browser.close()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)


def _runs(uri, level="unit"):
    from mlflow import MlflowClient

    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("ui-check")
    runs = c.search_runs([exp.experiment_id], f"tags.level = '{level}'")
    return exp.experiment_id, sorted(runs, key=lambda r: r.info.run_name)


def _units(uri):
    return _runs(uri, "unit")


def _keep(path: Path):
    dest = os.environ.get("FEATSTORE_SCREENSHOTS")
    if dest:
        Path(dest).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, Path(dest) / path.name)


def _shot(served, name):
    served["shots"].mkdir(exist_ok=True)
    _keep(served["browser"].screenshot(served["shots"] / name))


def test_experiment_opens_on_runs(served):
    b, base = served["browser"], served["base"]
    exp_id, units = _units(served["uri"])
    b.goto(track.ui_url(base, exp_id))
    b.wait_for("document.title.startsWith('Runs')", "the runs page")
    # the sweep, by its readable name (its model, unit, fold and trial runs are nested under it)
    b.wait_for("/ui-check \\d{4}-\\d\\d-\\d\\d \\d\\d:\\d\\d/.test(document.body.innerText)", "the sweep run")
    _shot(served, "mlflow-runs.png")


def test_ui_prints_the_model_runs_link_first_and_it_opens_the_headline(served):
    """The first link `featstore ui` prints opens the study's model runs in the classic runs table,
    one row per model, with the verdict and the headline's figures as columns."""
    b = served["browser"]
    text = served["log"].read_text()
    links = [ln for ln in text.splitlines() if served["base"] + "/#/" in ln]
    assert links[0].startswith("ui-check — models: http://"), text[-2000:]  # before the probe's experiment
    url = links[0].split(": ", 1)[1]
    assert "viewStateShareKey=" in url and "workflowType=machine_learning" in url
    exp_id, models = _runs(served["uri"], "model")
    assert [m.info.run_name for m in models] == ["lightgbm · pixelstats/original", "logreg · pixelstats/original"]
    b.goto(url)
    names = " && ".join(f"document.body.innerText.includes({json.dumps(m.info.run_name)})" for m in models)
    b.wait_for(names, "both model runs")
    b.wait_for("document.body.innerText.includes('auc_unseen_mean') && document.body.innerText.includes('verdict')",
               "the verdict and headline columns")
    body = b.js("document.body.innerText")
    assert "tags.level = 'model'" in b.js("[...document.querySelectorAll('input')].map(i => i.value).join(' ')")
    for col in ("auc_seen", "auc_unseen_mean", "auc_unseen_worst", "auc_pairs_mean", "shortcut"):
        assert col in body, col
    for m in models:  # each model's verdict is in its row
        assert m.data.params["verdict"] in body
    # only the models: no protocol unit, fold or trial rows, no GenAI pages
    assert "loso · " not in body and "fold heldout" not in body and "trial 0" not in body
    assert "Detect Issues" not in body
    _shot(served, "mlflow-models.png")


def test_compare_view_of_model_runs_lines_up_the_headline(served):
    """The compare view of the model runs: identity and verdict parameters side by side, every headline
    metric on every run (so the parallel-coordinates plot draws no missing value at an axis' top)."""
    b, base = served["browser"], served["base"]
    exp_id, models = _runs(served["uri"], "model")
    keys = [set(m.data.metrics) for m in models]
    assert keys[0] == keys[1] and {"auc_seen", "auc_unseen_mean", "auc_unseen_worst", "auc_pairs_mean",
                                   "auc_pairs_worst"} <= keys[0]
    q = urllib.parse.urlencode(dict(runs=json.dumps([m.info.run_id for m in models]),
                                    experiments=json.dumps([exp_id])), quote_via=urllib.parse.quote)
    b.goto(f"{base}/#/compare-runs?{q}&workflowType=machine_learning")
    b.wait_for("document.body.innerText.includes('Comparing 2 Runs')", "the comparison of 2 runs")
    text = b.wait_for("document.body.innerText.includes('verdict') && document.body.innerText", "the parameters")
    assert "No parameters to display" not in text
    for p in ("backbone", "head", "preprocess", "selection", "target", "weights_id", "verdict"):
        assert p in text
    for m in ("auc_seen", "auc_unseen_mean", "auc_unseen_worst", "auc_pairs_mean"):
        assert m in text
    axes = b.wait_for("(() => { const a = [...document.querySelectorAll('.parcoords .axis-title')]"
                      ".map(e => e.textContent); return a.length >= 2 && a; })()", "parallel-coordinates axes")
    assert "head" in axes and any(a.startswith("auc_") or a.startswith("gap_") for a in axes), axes
    assert "NaN" not in b.js("[...document.querySelectorAll('.parcoords')].map(e => e.textContent).join(' ')")
    _shot(served, "mlflow-compare-models.png")


def test_artifacts_open_after_the_folder_moved(served):
    b, base = served["browser"], served["base"]
    exp_id, units = _units(served["uri"])
    run = next(u for u in units if u.info.run_name.startswith("loso"))
    with urllib.request.urlopen(f"{base}/get-artifact?path=per_source.csv&run_uuid={run.info.run_id}") as r:
        assert r.read().startswith(b"fold,test_set,scope")
    b.goto(f"{base}/#/experiments/{exp_id}/runs/{run.info.run_id}/artifacts/roc_seen_vs_unseen.png"
           "?workflowType=machine_learning")
    # the preview (a blob: image MLflow fetched through the server) decoded at the ROC figure's size
    b.wait_for("[...document.images].some(i => i.complete && i.naturalWidth >= 400)", "the ROC artifact image")
    _shot(served, "mlflow-artifact.png")


def _viewport(b, width, height):
    b.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False,
           session=True)


def test_report_first_screen_holds_a_card_per_model(served):
    """At 1400 x 900, the report's first screen holds every model's card: verdict, seen → unseen with
    intervals (or 'n/a (k sources)'), worst source; the cards have the same rows."""
    b = served["browser"]
    _viewport(b, 1400, 900)
    try:
        b.goto(served["report"].as_uri())
        b.wait_for("document.querySelectorAll('.card').length === 2", "two verdict cards")
        cards = b.js("[...document.querySelectorAll('.card')].map(c => ({bottom: c.getBoundingClientRect().bottom, "
                     "dt: [...c.querySelectorAll('dt')].map(d => d.textContent), text: c.innerText}))")
        for c in cards:
            assert c["bottom"] <= 900, c
            assert c["dt"] == ["seen → unseen", "worst source", "new pairs", "uses the source?", "drop on new sources"]
            assert re.search(r"(shortcut likely|drops on new sources|generalises|inconclusive)", c["text"])
            assert re.search(r"\d\.\d{3}( \[\d\.\d{3}, \d\.\d{3}\]|, CI n/a \(\d+ sources\))? \(mean of \d+ held-out", c["text"]), c
            assert "[0.000, 1.000]" not in c["text"]
        # the two summary figures start on the first screen too, side by side
        tops = b.js("[...document.querySelectorAll('.top-figs img')].map(i => i.getBoundingClientRect().top)")
        assert len(tops) == 2 and max(tops) < 900
        _shot(served, "report-first-screen.png")
    finally:
        _viewport(b, 1600, 2000)


def test_report_map_leaves_the_wheel_to_the_page(served):
    """The embedded map does not trap the scroll wheel: a plain wheel scrolls the page; Ctrl+wheel
    (or a click on the map first) zooms it."""
    b = served["browser"]
    _viewport(b, 1400, 900)
    try:
        b.goto(served["report"].as_uri())
        b.wait_for("!!document.querySelector('.imap canvas')", "the interactive map")
        b.js("document.querySelector('.imap canvas').scrollIntoView({block: 'center'})")
        r = b.js("(() => { const r = document.querySelector('.imap canvas').getBoundingClientRect(); "
                 "return [r.left + r.width / 2, r.top + r.height / 2]; })()")

        prevented = b.js("!document.querySelector('.imap canvas').dispatchEvent(new WheelEvent('wheel', "
                         "{deltaY: 100, cancelable: true, bubbles: true}))")
        assert prevented is False  # a plain wheel is the page's
        assert b.js("!document.querySelector('.imap canvas').dispatchEvent(new WheelEvent('wheel', "
                    "{deltaY: 100, ctrlKey: true, cancelable: true, bubbles: true}))") is True
        # and a real wheel over the map reaches the page unprevented (it scrolls); with Ctrl it zooms the map
        b.js("window._wheel = []; window.addEventListener('wheel', e => window._wheel.push(e.defaultPrevented))")
        for mod in (0, 2):  # 2: Ctrl
            b.call("Input.dispatchMouseEvent", type="mouseWheel", x=r[0], y=r[1], deltaX=0, deltaY=120,
                   modifiers=mod, session=True)
        assert b.wait_for("window._wheel.length === 2 && window._wheel", "both wheel events") == [False, True]
    finally:
        _viewport(b, 1600, 2000)
