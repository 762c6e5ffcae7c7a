"""A walk through the Dagster UI in headless Chromium, driven over the DevTools protocol.

Against a running ``dagster dev`` (its instance holding at least one scored sweep) it:

1. opens the asset graph, then ``sweep_analysis``, and finds a rendered plot (an ``<img>`` with a
   ``data:image/png`` URL that decoded) on the page without any click;
2. starts a new sweep with the README's ``start_sweep`` YAML, sent the way the launchpad sends it
   (the ``launchPipelineExecution`` GraphQL mutation with the YAML as ``runConfigData``), and waits
   until the sweep's run, its export and its contact sheets have finished;
3. re-scores ``hps_v2_scores`` of that sweep as the *Materialize* button of the asset does, and
   waits until the export, the analysis and the contact sheets are newer than the new scores;
4. opens ``image_grid`` and ``sweep_results`` and finds their contact sheets and column table.

Screenshots of every page go to the directory given on the command line. Run it as
``python -m flexyface_pipeline_tests.ui_walkthrough --url http://127.0.0.1:3000 --shots DIR``
(``flexyface_pipeline_tests/test_ui_browser.py`` runs it against a temporary instance).
"""

import argparse
import base64
import itertools
import json
import logging
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
START_JOB = "start_sweep"
LOCATION = "flexyface_pipeline.definitions"
REPOSITORY = "__repository__"

logger = logging.getLogger(__name__)


class WalkthroughError(AssertionError):
    """The UI did not show what it should."""


def find_browser() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def readme_start_yaml(readme: str) -> str:
    """The README's ``start_sweep`` run config: the first ```yaml block that configures ``prepare_sweep``."""
    for block in re.findall(r"```ya?ml\n(.*?)```", readme, flags=re.S):
        if "prepare_sweep:" in block:
            return block
    raise WalkthroughError("README.md has no ```yaml block with the start_sweep config (ops: prepare_sweep: ...)")


class Browser:
    """Headless Chromium with one page, spoken to over the DevTools protocol (``websockets``)."""

    def __init__(self, executable: str, width: int = 1400, height: int = 1000):
        self.profile = tempfile.mkdtemp(prefix="flexyface-chromium-")
        self.process = subprocess.Popen(
            [executable, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--no-first-run", "--remote-debugging-port=0", f"--user-data-dir={self.profile}",
             f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        port = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and port is None:
            line = self.process.stderr.readline()
            if not line and self.process.poll() is not None:
                break
            found = re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line)
            if found:
                port = int(found.group(1))
        if port is None:
            self.close()
            raise WalkthroughError(f"{executable} did not start its DevTools endpoint")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30) as response:
            pages = [t for t in json.load(response) if t["type"] == "page"]
        from websockets.sync.client import connect

        self.socket = connect(pages[0]["webSocketDebuggerUrl"], max_size=None, open_timeout=30)
        self.ids = itertools.count(1)
        self.call("Page.enable")
        self.call("Runtime.enable")
        # Dagster asks new visitors on localhost to join its community, in a dialog over the page;
        # its "dismissed" flag, set before any page script runs.
        self.call("Page.addScriptToEvaluateOnNewDocument",
                  source="try { localStorage.setItem('communityNux', 'true'); } catch (e) {}")

    def call(self, method: str, **params):
        message_id = next(self.ids)
        self.socket.send(json.dumps({"id": message_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv(timeout=120))
            if message.get("id") == message_id:
                if "error" in message:
                    raise WalkthroughError(f"{method}: {message['error']}")
                return message.get("result", {})

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise WalkthroughError(f"script failed: {result['exceptionDetails'].get('text')}: {expression[:80]}")
        return result["result"].get("value")

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)
        self.wait_for("document.readyState === 'complete'", "the page to load", timeout=60)

    def wait_for(self, expression: str, what: str, timeout: float = 60.0):
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise WalkthroughError(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(0.5)

    def screenshot(self, path: Path) -> Path:
        self.call("Emulation.setDeviceMetricsOverride", width=1400, height=1000, deviceScaleFactor=1, mobile=False)
        height = self.evaluate("Math.min(6000, Math.max(document.body.scrollHeight, "
                               "...[...document.querySelectorAll('*')].map(e => e.scrollHeight)))") or 1000
        self.call("Emulation.setDeviceMetricsOverride", width=1400, height=int(height), deviceScaleFactor=1,
                  mobile=False)
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        self.call("Emulation.setDeviceMetricsOverride", width=1400, height=1000, deviceScaleFactor=1, mobile=False)
        return path

    def close(self) -> None:
        socket = getattr(self, "socket", None)
        if socket is not None:
            socket.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# Rendered images on the page: decoded (naturalWidth > 0) inline PNGs.
RENDERED_PNGS = """[...document.querySelectorAll('img')]
    .filter(i => i.src.startsWith('data:image/png') && i.complete && i.naturalWidth > 0).length"""


class GraphQL:
    """The webserver's GraphQL endpoint, which the UI itself uses."""

    def __init__(self, url: str):
        self.url = url.rstrip("/") + "/graphql"

    def __call__(self, query: str, **variables):
        body = json.dumps({"query": query, "variables": variables}).encode()
        request = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            payload = json.load(response)
        if payload.get("errors"):
            raise WalkthroughError(f"GraphQL errors: {payload['errors']}")
        return payload["data"]

    def launch(self, job: str, run_config_yaml: str, tags: dict[str, str] | None = None,
               assets: list[str] | None = None) -> str:
        selector = {"repositoryLocationName": LOCATION, "repositoryName": REPOSITORY, "pipelineName": job}
        if assets is not None:
            selector["assetSelection"] = [{"path": [a]} for a in assets]
        data = self(LAUNCH, executionParams={
            "mode": "default", "selector": selector, "runConfigData": run_config_yaml,
            "executionMetadata": {"tags": [{"key": k, "value": v} for k, v in (tags or {}).items()]}})
        result = data["launchPipelineExecution"]
        if result.get("__typename") != "LaunchRunSuccess":
            raise WalkthroughError(f"launching {job} was refused: {json.dumps(result)[:800]}")
        return result["run"]["runId"]

    def runs(self) -> list[dict]:
        return self(RUNS)["runsOrError"]["results"]

    def wait_run(self, predicate, what: str, timeout: float) -> dict:
        """The first run matching ``predicate`` once it finished; fails if it failed."""
        deadline = time.monotonic() + timeout
        while True:
            matching = [r for r in self.runs() if predicate(r)]
            done = [r for r in matching if r["status"] in ("SUCCESS", "FAILURE", "CANCELED")]
            if done:
                run = done[0]
                if run["status"] != "SUCCESS":
                    raise WalkthroughError(f"{what}: run {run['runId']} ({run['jobName']}) ended {run['status']}")
                return run
            if time.monotonic() > deadline:
                states = [(r["jobName"], r["status"]) for r in self.runs()[:8]]
                raise WalkthroughError(f"timed out after {timeout:.0f} s waiting for {what}; latest runs: {states}")
            time.sleep(2)

    def latest_materialization(self, asset: str, partition: str | None = None) -> float:
        """Timestamp (ms) of the asset's latest materialization (of ``partition``), 0 if none."""
        data = self(MATERIALIZATIONS, assetKey={"path": [asset]},
                    partitions=[partition] if partition is not None else None)
        node = data["assetOrError"]
        events = node.get("assetMaterializations") or []
        return max((float(e["timestamp"]) for e in events), default=0.0)


LAUNCH = """mutation Launch($executionParams: ExecutionParams!) {
  launchPipelineExecution(executionParams: $executionParams) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on RunConfigValidationInvalid { errors { message } }
    ... on PythonError { message }
    ... on InvalidSubsetError { message }
    ... on PipelineNotFoundError { message }
  }
}"""

RUNS = """query Runs {
  runsOrError(limit: 50) {
    ... on Runs { results { runId jobName status tags { key value } } }
  }
}"""

MATERIALIZATIONS = """query Mat($assetKey: AssetKeyInput!, $partitions: [String!]) {
  assetOrError(assetKey: $assetKey) {
    ... on Asset { assetMaterializations(limit: 1, partitions: $partitions) { timestamp } }
  }
}"""


def _tag(run: dict, key: str) -> str | None:
    return next((t["value"] for t in run["tags"] if t["key"] == key), None)


def walk(url: str, shots: Path, start_yaml: str, browser_path: str, timeout: float = 240.0) -> dict:
    """The walkthrough (module docstring). Returns what it saw; raises WalkthroughError."""
    import yaml

    url = url.rstrip("/")
    shots = Path(shots)
    graphql = GraphQL(url)
    sweep = yaml.safe_load(start_yaml)["ops"]["prepare_sweep"]["config"]["sweep"]
    seen: dict = {"sweep": sweep, "screenshots": []}
    with Browser(browser_path) as browser:
        # 1. The asset graph, then the analysis with its plots, no click needed.
        # The graph of the "results" group (the global graph starts with its groups collapsed).
        browser.open(f"{url}/locations/{LOCATION}/asset-groups/results")
        browser.wait_for("document.body.innerText.includes('sweep_analysis') && "
                         "document.body.innerText.includes('image_grid')", "the asset graph", timeout=90)
        seen["screenshots"].append(browser.screenshot(shots / "01_asset_graph.png"))
        browser.open(f"{url}/assets/sweep_analysis")
        seen["analysis_images"] = browser.wait_for(RENDERED_PNGS, "a plot on the sweep_analysis page", timeout=90)
        seen["screenshots"].append(browser.screenshot(shots / "02_sweep_analysis.png"))

        # 2. A new sweep from the README's config, as the launchpad launches it.
        browser.open(f"{url}/locations/{LOCATION}/jobs/{START_JOB}/playground")
        browser.wait_for("document.body.innerText.includes('prepare_sweep')", "the start_sweep launchpad", timeout=90)
        seen["screenshots"].append(browser.screenshot(shots / "03_start_sweep_launchpad.png"))
        start_id = graphql.launch(START_JOB, start_yaml)
        graphql.wait_run(lambda r: r["runId"] == start_id, "the start_sweep run", timeout)
        sweep_run = graphql.wait_run(lambda r: _tag(r, "flexyface/started_by") == start_id,
                                     "the sweep run that start_sweep requested", timeout)
        graphql.wait_run(lambda r: r["jobName"] == "export_job" and
                         _tag(r, "dagster/sensor_name") == "export_after_sweep" and
                         sweep_run["runId"] in (_tag(r, "dagster/run_key") or ""),
                         "the export after the sweep", timeout)
        seen["sweep_run"] = sweep_run["runId"]
        browser.open(f"{url}/runs")
        browser.wait_for(f"document.body.innerText.includes('{START_JOB}')", "the runs list", timeout=60)
        seen["screenshots"].append(browser.screenshot(shots / "04_runs.png"))

        # 3. Re-score HPS of the new sweep as the asset's Materialize button does; then the
        # export, the analysis and the contact sheets follow without a click.
        rescore_id = graphql.launch("__ASSET_JOB", "{}", tags={"dagster/partition": sweep},
                                    assets=["hps_v2_scores"])
        graphql.wait_run(lambda r: r["runId"] == rescore_id, "the hps_v2_scores re-score", timeout)
        scored_at = graphql.latest_materialization("hps_v2_scores", sweep)
        graphql.wait_run(lambda r: r["jobName"] == "export_job" and rescore_id in (_tag(r, "dagster/run_key") or ""),
                         "the export after the re-score", timeout)
        graphql.wait_run(lambda r: r["jobName"] == "image_grid_job" and
                         rescore_id in (_tag(r, "dagster/run_key") or ""),
                         "the contact sheets after the re-score", timeout)
        for asset, partition in (("sweep_results", None), ("sweep_analysis", None), ("image_grid", sweep)):
            refreshed = graphql.latest_materialization(asset, partition)
            if refreshed <= scored_at:
                raise WalkthroughError(f"{asset} was not refreshed after the re-score")
            seen[f"{asset}_refreshed_ms"] = refreshed - scored_at

        # 4. The contact sheets and the export's columns and rows, each on its asset's page.
        browser.open(f"{url}/assets/image_grid")
        seen["grid_images"] = browser.wait_for(RENDERED_PNGS, "a contact sheet on the image_grid page", timeout=90)
        seen["grid_sweep_shown"] = browser.wait_for(f"document.body.innerText.includes('{sweep}/')",
                                                    "the new sweep's sheets", timeout=30)
        seen["screenshots"].append(browser.screenshot(shots / "05_image_grid.png"))
        browser.open(f"{url}/assets/sweep_results")
        browser.wait_for("document.body.innerText.includes('Columns') && "
                         "document.body.innerText.includes('hps_v2_score') && "
                         f"document.body.innerText.includes('{sweep}')", "the export's columns and preview", 90)
        seen["screenshots"].append(browser.screenshot(shots / "06_sweep_results.png"))
    return seen


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:3000")
    parser.add_argument("--shots", type=Path, required=True, help="directory for the screenshots")
    parser.add_argument("--readme", type=Path, default=REPO / "README.md", help="where the start_sweep YAML is")
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds to wait for each run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    browser = find_browser()
    if browser is None:
        logger.error("no Chromium found: install it (Debian: apt-get install -y chromium)")
        return 2
    seen = walk(args.url, args.shots, readme_start_yaml(args.readme.read_text(encoding="utf-8")), browser,
                args.timeout)
    logger.info("walkthrough passed: %s", {k: v for k, v in seen.items() if k != "screenshots"})
    for path in seen["screenshots"]:
        logger.info("screenshot %s", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
