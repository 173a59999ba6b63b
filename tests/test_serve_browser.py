"""geocell serve in a real browser: headless Chromium (the system's package, driven by Selenium
through the system's chromedriver) uploads photos through the page's file input. The page must
show the same best guess as ``/api/predict``, draw the map, fill the top-k table, show the EXIF
position, report a bad file and load nothing from anywhere but the server on 127.0.0.1.

Skipped only when Chromium or chromedriver is not installed (``apt-get install chromium
chromium-driver``). Nothing is downloaded: Selenium Manager is never asked for a driver, and
Chromium is started with its background services off and every host name but 127.0.0.1
unresolvable. A screenshot of the page goes to the test's tmp_path and, when GEOCELL_ARTIFACTS
names a folder, there too.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import threading
import time

import pytest

pytest.importorskip("torch")
pytest.importorskip("torchvision")
pytest.importorskip("fastapi")
pytest.importorskip("multipart")
pytest.importorskip("uvicorn")
import httpx  # noqa: E402
from PIL import Image  # noqa: E402
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service as ChromeService  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.selenium_manager import SeleniumManager  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from geocell.data.exif import gps_exif  # noqa: E402
from geocell.infer import serve  # noqa: E402
from geocell.infer.predict import Geolocator  # noqa: E402
from helpers import make_tiny_checkpoint, write_jpegs  # noqa: E402

CHROMIUM = os.environ.get("GEOCELL_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = (os.environ.get("GEOCELL_CHROMEDRIVER") or shutil.which("chromedriver")
                or "/usr/bin/chromedriver")
PAGE_TIMEOUT_S = 60      # upload -> record, table and map on the page
TRUE_LAT, TRUE_LNG = 48.8566, 2.3522

pytestmark = pytest.mark.skipif(
    not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)),
    reason=f"no Chromium ({CHROMIUM}) or chromedriver ({CHROMEDRIVER}); "
           "install them with: apt-get install chromium chromium-driver")

# Chromium's own traffic off (updates, sync, metrics, field trials, safe browsing lists), every
# host but 127.0.0.1 unresolvable, and no proxy between the page and the server.
OFFLINE_FLAGS = [
    "--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
    "--no-first-run", "--no-default-browser-check", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-default-apps",
    "--disable-extensions", "--disable-domain-reliability", "--disable-client-side-phishing-detection",
    "--disable-breakpad", "--metrics-recording-only", "--no-pings", "--no-proxy-server",
    "--disable-features=Translate,OptimizationHints,MediaRouter,AutofillServerCommunication,"
    "CertificateTransparencyComponentUpdater",
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
    "--window-size=1200,1400", "--lang=en-US",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The app under uvicorn on 127.0.0.1 at a free port, in a thread; yields (base URL, ckpt)."""
    import uvicorn

    root = tmp_path_factory.mktemp("serve_browser")
    ckpt = make_tiny_checkpoint(root / "tiny-browser.pt")
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(serve.app(ckpt, device="cpu"), host="127.0.0.1",
                                           port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/", ckpt
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture
def browser(tmp_path, monkeypatch):
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)  # Selenium talks to chromedriver on localhost
    monkeypatch.setenv("SE_OFFLINE", "true")

    def no_downloads(*a, **k):
        raise AssertionError("Selenium Manager was asked for a driver or browser")

    monkeypatch.setattr(SeleniumManager, "binary_paths", no_downloads)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in OFFLINE_FLAGS + [f"--user-data-dir={tmp_path / 'profile'}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    service = ChromeService(executable_path=CHROMEDRIVER, log_output=os.fspath(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(30)
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def _photo_with_gps(folder) -> str:
    plain = write_jpegs(folder / "plain", 1, seed=7)[0]
    path = os.fspath(folder / "paris street.jpg")
    with Image.open(plain) as im:
        im.resize((96, 72)).save(path, quality=90, exif=gps_exif(TRUE_LAT, TRUE_LNG))
    return path


def _api_predict(base: str, path: str, **fields) -> tuple[dict, str | None]:
    with open(path, "rb") as f, httpx.Client(timeout=30) as http:
        r = http.post(base + "api/predict", data={k: str(v) for k, v in fields.items()},
                      files={"image": (os.path.basename(path), f.read(), "image/jpeg")})
    assert r.status_code == 200, r.text
    return r.json(), r.headers.get("x-geocell-exif-gps")


def _card(driver, name: str, timeout: float = PAGE_TIMEOUT_S):
    """The result card for ``name`` once the page has finished with it (done or error)."""
    selector = f'.card[data-image="{name}"]'

    def finished(d):
        cards = d.find_elements(By.CSS_SELECTOR, selector)
        return cards[0] if cards and cards[0].get_attribute("data-state") in ("done", "error") else False

    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(
        finished, f"the page did not finish {name} within {timeout} s")


def _best(record: dict) -> tuple[float, float, str]:
    top = record["hierarchical_top1"]
    return top["lat"], top["lng"], top["cell"]


def _shown_best(card) -> tuple[float, float, str]:
    """The best guess a card shows, from its data-* attributes (full precision)."""
    best = card.find_element(By.CSS_SELECTOR, '[data-role="best"]')
    return (float(best.get_attribute("data-lat")), float(best.get_attribute("data-lng")),
            best.get_attribute("data-cell"))


def _outside_urls(driver, base: str) -> list[str]:
    """Every URL the browser asked for (the page's resource timing and the network log) that
    is neither on ``base`` nor inside the browser (its own chrome:// pages, data:, about:)."""
    urls = set(driver.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)"
        ".concat(performance.getEntriesByType('navigation').map(e => e.name));"))
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] in ("Network.requestWillBeSent", "Network.webSocketCreated"):
            params = message["params"]
            urls.add(params["request"]["url"] if "request" in params else params["url"])
    assert any(u.startswith(base + "api/map") for u in urls), urls  # the log is not empty
    inside = ("chrome://", "data:", "about:", base, "blob:" + base[:-1] + "/")
    return sorted(u for u in urls if not u.startswith(inside))


def _save_screenshot(driver, tmp_path) -> str:
    """The whole page, not only the window, as a PNG."""
    size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}})
    path = os.fspath(tmp_path / "serve_browser.png")
    with open(path, "wb") as f:
        f.write(base64.b64decode(shot["data"]))
    artefacts = os.environ.get("GEOCELL_ARTIFACTS")
    if artefacts:
        os.makedirs(artefacts, exist_ok=True)
        shutil.copy(path, os.path.join(artefacts, "serve_browser.png"))
    return path


def test_page_locates_an_uploaded_photo_like_the_api(server, browser, tmp_path):
    base, ckpt = server
    photo = _photo_with_gps(tmp_path)
    want, gps_header = _api_predict(base, photo)
    assert gps_header is not None
    geo_record = Geolocator.from_checkpoint(ckpt, device="cpu").predict(photo).to_dict()
    assert want == dict(geo_record, image=os.path.basename(photo))  # the API's oracle

    browser.get(base)
    assert browser.title == "geocell: locate photos"
    assert browser.find_element(By.ID, "ckpt").text == os.path.basename(ckpt)
    note = browser.find_element(By.CSS_SELECTOR, ".note")
    assert note.is_displayed() and "Must not be used to locate people without their consent" in note.text

    browser.find_element(By.ID, "files").send_keys(photo)  # the hidden <input type=file>
    card = _card(browser, os.path.basename(photo))
    assert card.get_attribute("data-state") == "done", card.text

    # the best guess: exact values in data-*, the shown text rounded as the page rounds
    top = want["hierarchical_top1"]
    assert _shown_best(card) == _best(want)
    best = card.find_element(By.CSS_SELECTOR, '[data-role="best"]')
    assert best.text.startswith(f"best guess: {top['lat']:.4f}, {top['lng']:.4f} ")
    assert f"cell {top['cell']}, level {top['level']}" in best.text

    # the top-k table: one row per record entry, in order
    rows = card.find_elements(By.CSS_SELECTOR, '[data-role="top-k"] tr')
    assert len(rows) == 1 + len(want["top_k"]) == 6
    for i, (row, guess) in enumerate(zip(rows[1:], want["top_k"])):
        cells = [td.text for td in row.find_elements(By.TAG_NAME, "td")]
        assert cells[0] == str(i + 1) and cells[4] == guess["cell"], (i, cells)
        assert cells[1:3] == [f"{guess['lat']:.4f}", f"{guess['lng']:.4f}"], (i, cells)

    # the EXIF position as the truth, and the credible region line
    exif = card.find_element(By.CSS_SELECTOR, '[data-role="exif"]')
    assert exif.text.startswith(f"EXIF GPS: {TRUE_LAT:.4f}, {TRUE_LNG:.4f}; best guess is ")
    assert f"{round(want['credible_region']['mass'] * 100, 1)} % credible region: " \
           f"{want['credible_region']['num_cells']} cells" in card.text

    # the map: a decoded PNG from the server, shown at the card's width
    size = browser.execute_script(
        "const m = arguments[0].querySelector('img.map');"
        "return m && [m.complete, m.naturalWidth, m.naturalHeight, m.clientWidth];", card)
    assert size and size[0] and size[1] > 500 and size[2] > 200 and size[3] > 500, size

    # a non-image through the same input gets an error on its own card; the next photo still works
    bad = tmp_path / "notes.jpg"
    bad.write_bytes(b"this is text, not a photo")
    browser.find_element(By.ID, "files").send_keys(os.fspath(bad))
    bad_card = _card(browser, "notes.jpg")
    assert bad_card.get_attribute("data-state") == "error"
    assert "not an image" in bad_card.find_element(By.CSS_SELECTOR, ".err").text
    plain = write_jpegs(tmp_path / "more", 2, seed=11)[1]
    want_plain, gps_plain = _api_predict(base, plain, top_k=3, mass=0.5)  # the page's options too
    assert gps_plain is None
    for field, value in (("topk", "3"), ("mass", "0.5")):
        box = browser.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)
    browser.find_element(By.ID, "files").send_keys(plain)
    plain_card = _card(browser, os.path.basename(plain))
    assert plain_card.get_attribute("data-state") == "done", plain_card.text
    assert _shown_best(plain_card) == _best(want_plain)
    assert len(plain_card.find_elements(By.CSS_SELECTOR, '[data-role="top-k"] tr')) == 1 + 3
    assert f"50.0 % credible region: {want_plain['credible_region']['num_cells']} cells" in plain_card.text
    assert not plain_card.find_elements(By.CSS_SELECTOR, '[data-role="exif"]')  # no GPS, no truth line

    shot = _save_screenshot(browser, tmp_path)
    with Image.open(shot) as im:
        assert im.width >= 1000 and im.height >= 800

    assert _outside_urls(browser, base) == []
    # the console: nothing but the refused upload's 415 (no CSP violations, no script errors)
    console = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not [m for m in console if "favicon.ico" not in m
                and not (base + "api/predict" in m and "415" in m)], console
