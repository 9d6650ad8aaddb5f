"""The upload page of `eanet serve` in a real headless Chromium (selenium + chromedriver)."""

import shutil
import tempfile

import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi", reason="eanet serve needs the [serve] extra")
pytest.importorskip("uvicorn", reason="eanet serve needs the [serve] extra")
pytest.importorskip("selenium", reason="the browser test needs selenium (pip install selenium)")

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402
from serve_helpers import server_process  # noqa: E402

from eanet import checkpoint  # noqa: E402
from eanet.models.registry import create_model  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (CHROMIUM and CHROMEDRIVER),
        reason="chromium and chromedriver are not installed "
        "(apt-get install -y chromium chromium-driver; .ci/run does it)",
    ),
]


@pytest.fixture()
def browser():
    profile = tempfile.mkdtemp(prefix="eanet-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
    ):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def test_upload_page_shows_top5_bars(browser, tmp_path, sample_data):
    torch.manual_seed(0)
    names = sample_data.class_names
    model = create_model("eanet-cifar", depth=1, num_classes=len(names))
    ckpt = tmp_path / "tiny.safetensors"
    checkpoint.save(ckpt, model, {"class_names": names, "model_name": "eanet-cifar"})
    image = tmp_path / "test0.png"  # a real CIFAR-100 test image from the shipped slice
    Image.fromarray(sample_data.test_images[0].permute(1, 2, 0).numpy()).save(image)
    not_image = tmp_path / "notes.png"
    not_image.write_text("not a picture\n")

    def state(driver) -> str:
        return driver.find_element(By.TAG_NAME, "body").get_attribute("data-state")

    def status(driver) -> str:
        return driver.find_element(By.ID, "status").text

    with server_process(ckpt, "--max-wait-ms", "1") as url:
        browser.get(url + "/")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda d: "classes" in d.find_element(By.ID, "model").text)
        assert "eanet-cifar" in browser.find_element(By.ID, "model").text

        browser.find_element(By.ID, "file").send_keys(str(image))
        wait.until(lambda d: state(d) in ("done", "error"))
        assert state(browser) == "done", status(browser)
        assert "test0.png" in status(browser)
        shown = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#results .pred .name")]
        assert len(shown) == 5 and all(n in names for n in shown), shown
        fills = browser.find_elements(By.CSS_SELECTOR, "#results .fill")
        assert len(fills) == 5 and float(fills[0].value_of_css_property("width")[:-2]) > 0
        pcts = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#results .pct")]
        assert len(pcts) == 5 and all(p.endswith("%") for p in pcts), pcts

        # a file that is no image: a one-line error on the page, and the server goes on
        browser.find_element(By.ID, "file").send_keys(str(not_image))
        wait.until(lambda d: state(d) == "error")
        assert "400" in status(browser) and "not an image" in status(browser)
        browser.find_element(By.ID, "file").send_keys(str(image))
        wait.until(lambda d: state(d) == "done")
        assert len(browser.find_elements(By.CSS_SELECTOR, "#results .pred")) == 5
