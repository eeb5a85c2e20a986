"""End to end in a real browser: headless Debian Chromium driven by Playwright against
``python app.py`` on the shipped bundle (the quantised backbone, its experts and routers,
the precomputed fronts). Set a prompt, move a slider, generate: text appears, the reward
readout fills, the highlighted point on the Pareto plot moves; releasing a slider then
regenerates (the latency to the first new text goes to ``build-cache/e2e/timings.txt``). The screenshot is kept in
``build-cache/e2e/app.png``.

Fails (never skips) when Chromium or the shipped bundle is missing: ``make test`` installs
Chromium (``make browser``). ``HOE_E2E_BUNDLE`` points the test at another bundle.
"""

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = ROOT / "build-cache" / "e2e"
# Chromium as root, offline: no sandbox, no background connections to Google's hosts
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
CURRENT_POINT = """() => {
    const el = document.querySelector('#plot .js-plotly-plot');
    const t = el && el._fullData && el._fullData.find(t => t.name.startsWith('HoE at'));
    return t ? [Array.from(t.x)[0], Array.from(t.y)[0]] : null;
}"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url():
    assert Path(CHROMIUM).is_file(), f"{CHROMIUM} is missing: run `make browser` (apt-get install chromium)"
    bundle = os.environ.get("HOE_E2E_BUNDLE", str(ROOT / "assets" / "smollm2-hhh"))
    assert (Path(bundle) / "manifest.json").is_file(), f"no bundle at {bundle}"
    port = _free_port()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    log = (ARTIFACTS / "app.log").open("w")
    cmd = [sys.executable, str(ROOT / "app.py"), "--bundle", bundle, "--port", str(port)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            assert proc.poll() is None, f"app exited: {(ARTIFACTS / 'app.log').read_text()[-2000:]}"
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                time.sleep(1)
        else:
            pytest.fail("the app did not start within 240 s")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_slider_and_generate_in_a_real_browser(app_url):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(app_url, wait_until="load")
        page.wait_for_selector("#plot .js-plotly-plot", timeout=60_000)
        page.wait_for_function(f"({CURRENT_POINT})() !== null", timeout=30_000)
        before = page.evaluate(CURRENT_POINT)
        page.evaluate(f"window.__before = JSON.stringify(({CURRENT_POINT})())")
        weights = page.locator("#weights").inner_text()

        objective = page.locator("[id^=w-] input[type=range]").first
        objective.fill("0.9")  # the first objective's slider, from 1/N
        page.wait_for_function(
            f"document.querySelector('#weights').innerText !== {weights!r}", timeout=30_000
        )
        page.wait_for_function(f"JSON.stringify(({CURRENT_POINT})()) !== window.__before", timeout=30_000)
        after = page.evaluate(CURRENT_POINT)
        assert after != before

        page.locator("#prompt textarea").fill("Tell me a joke about computers.")
        started = time.perf_counter()
        page.locator("#generate").click()
        page.wait_for_function("document.querySelector('#answer textarea').value.length > 0", timeout=120_000)
        first_text = time.perf_counter() - started
        page.wait_for_function(
            "document.querySelector('#rewards').innerText.includes('Rewards')", timeout=300_000
        )
        answer = page.locator("#answer textarea").input_value()
        rewards = page.locator("#rewards").inner_text()
        page.screenshot(path=str(ARTIFACTS / "app.png"), full_page=True)

        # releasing a slider regenerates: a real pointer click on the track (pointerup = release)
        box = objective.bounding_box()
        started = time.perf_counter()
        page.mouse.click(box["x"] + box["width"] * 0.15, box["y"] + box["height"] / 2)
        page.wait_for_function(
            "old => { const t = document.querySelector('#answer textarea').value; return t.length > 0 && t !== old; }",
            arg=answer,
            timeout=120_000,
        )
        release_first_text = time.perf_counter() - started
        page.wait_for_function(
            "document.querySelector('#rewards').innerText.includes('Rewards')", timeout=300_000
        )
        release_rewards = page.locator("#rewards").inner_text()
        browser.close()
    assert answer.strip()
    assert "Rewards" in rewards and "first token" in rewards
    (ARTIFACTS / "timings.txt").write_text(
        f"first text in the browser after clicking Generate: {first_text:.2f} s\n{rewards}\n\n"
        f"first new text in the browser after a slider release: {release_first_text:.2f} s\n{release_rewards}\n"
    )
