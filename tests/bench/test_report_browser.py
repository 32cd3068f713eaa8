"""The side-by-side report in a real headless browser (Chromium through Selenium): the page loads from a file
with nothing fetched from the network, ratings are kept in local storage across a reload, and the export
downloads JSON that `lorafuse eval --ratings` summarises. Skipped, with the reason, where Chromium is absent
(.ci/run installs it)."""

import json
import time

import pytest

from lorafuse.engine.ratings import summarise
from lorafuse.engine.report_html import Row, write_report

import headless_browser

REASON = headless_browser.missing()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")


@pytest.fixture
def driver(tmp_path):
    browser = headless_browser.start(download_dir=tmp_path / "downloads")
    yield browser
    browser.quit()


def rows():
    return [Row("test:1", "test", "I was charged twice for order #12345.", "billing",
                {"base": "The category is billing.", "tuned": "billing"}),
            Row("test:2", "test", "Where is my parcel?", "shipping delay",
                {"base": "shipping delay", "tuned": "shipping delay"}),
            Row("general:1", "general", "What is 7 + 5?", None, {"base": "7 + 5 = 12.", "tuned": "12"})]


def test_report_rates_keeps_and_exports_without_the_network(tmp_path, driver):
    from selenium.webdriver.common.by import By

    page = write_report(tmp_path / "report.html", rows(), ["base", "tuned"], title="Browser test",
                        summary=[("exact match", {"base": "50.0%", "tuned": "100.0%"})])
    url = page.resolve().as_uri()
    driver.get(url)
    assert driver.title == "Browser test"
    assert len(driver.find_elements(By.CSS_SELECTOR, "tr[data-row]")) == 3
    progress = driver.find_element(By.ID, "progress")
    assert progress.text == "rated 0 of 3"

    def rate(row, value):
        driver.find_element(By.CSS_SELECTOR, f'input[data-row="{row}"][data-system="tuned"][value="{value}"]').click()

    rate("test:1", "better")
    rate("test:2", "same")
    rate("general:1", "worse")
    rate("general:1", "same")  # a change of mind replaces the rating
    driver.find_element(By.ID, "rater").send_keys("ann")
    assert progress.text == "rated 3 of 3"

    driver.refresh()  # local storage keeps the ratings and the rater
    checked = driver.find_elements(By.CSS_SELECTOR, "input[type=radio]:checked")
    assert sorted((c.get_attribute("data-row"), c.get_attribute("value")) for c in checked) == [
        ("general:1", "same"), ("test:1", "better"), ("test:2", "same")]
    assert driver.find_element(By.ID, "rater").get_attribute("value") == "ann"

    driver.find_element(By.ID, "export").click()
    exported = json.loads(driver.find_element(By.ID, "exported").get_attribute("value"))
    assert exported["format"] == "lorafuse-ratings" and exported["rater"] == "ann"
    assert {(r["row"], r["section"], r["rating"]) for r in exported["ratings"]} == {
        ("test:1", "test", "better"), ("test:2", "test", "same"), ("general:1", "general", "same")}
    downloads = tmp_path / "downloads"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not list(downloads.glob("ratings-*.json")):
        time.sleep(0.1)
    (saved,) = downloads.glob("ratings-*.json")
    summary = summarise([saved])["systems"]
    assert summary["tuned [test]"]["better"] == 1 and summary["tuned [test]"]["same"] == 1
    assert summary["tuned [general]"]["same"] == 1

    requested = headless_browser.requested_urls(driver)
    assert requested and all(u.startswith(("file:", "data:", "blob:")) for u in requested), requested
    assert not [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
