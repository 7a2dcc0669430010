"""`dllama serve` against its own OpenAPI schema (schemathesis), and its chat page in a real
headless Chromium (selenium with Debian's chromium-driver)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from assets import mistral_sp_model
from cluster_utils import write_random_model
from serve_utils import Server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    model = write_random_model(tmp_path_factory.mktemp("random") / "random.m", max_seq_len=512)
    args = ["-m", str(model), "-t", str(mistral_sp_model()), "--nthreads", "1"]
    with Server(*args, "--max-tokens-limit", "8", "--timeout", "60") as s:
        yield s


def test_schemathesis_finds_no_server_error(server: Server, tmp_path: Path) -> None:
    pytest.importorskip("schemathesis")
    r = subprocess.run(
        [
            sys.executable, "-m", "schemathesis.cli", "run", server.url + "/openapi.json",
            "--checks", "not_a_server_error", "--max-examples", "30", "--seed", "1",
            "--workers", "1", "--no-shrink", "--request-timeout", "60",
            "--phases", "examples,coverage,fuzzing", "--report-dir", str(tmp_path),
        ],
        capture_output=True, text=True, timeout=900, check=False,
        cwd=tmp_path,  # its cache of crashes goes there, not into the repository
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and "failures" not in r.stdout.split("SUMMARY")[-1]
    assert server.wait_idle()["status"] == "ok"


def _chromedriver() -> str | None:
    for name in ("chromedriver", "/usr/bin/chromedriver"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _chromium() -> Any:
    """A headless Chromium driven by selenium (the test is skipped without them)."""
    webdriver = pytest.importorskip("selenium.webdriver")
    driver_path = _chromedriver()
    if driver_path is None:
        pytest.skip("chromium-driver is not installed (scripts/test.sh installs it)")
    opts = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        opts.add_argument(flag)
    if os.path.exists("/usr/bin/chromium"):
        opts.binary_location = "/usr/bin/chromium"
    service = webdriver.ChromeService(executable_path=driver_path)
    return webdriver.Chrome(options=opts, service=service)


def test_chat_page_streams_an_answer_in_chromium(server: Server) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    driver = _chromium()
    try:
        driver.get(server.url + "/")
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: d.find_element(By.ID, "model").text == "random")
        box = driver.find_element(By.ID, "input")
        box.send_keys("Hello there", Keys.ENTER)
        # (the page's source holds these words in its script: wait on the element's text)
        wait.until(
            lambda d: (
                "tokens/s, first token after" in d.find_element(By.CSS_SELECTOR, ".stats span").text
            )
        )
        answer = driver.find_elements(By.CSS_SELECTOR, ".assistant span")[0].text
        assert answer.strip(), driver.find_element(By.ID, "log").get_attribute("innerHTML")
        stats = driver.find_elements(By.CSS_SELECTOR, ".stats span")[0].text
        assert stats.startswith("8 tokens,") and "prompt" in stats
        assert driver.find_elements(By.CSS_SELECTOR, ".user span")[0].text == "Hello there"
        # a second turn: the conversation goes on, its prompt mostly from the KV cache
        box.send_keys("And again", Keys.ENTER)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".stats span")) == 2)
        wait.until(
            lambda d: "from the cache" in d.find_elements(By.CSS_SELECTOR, ".stats span")[1].text
        )
    finally:
        driver.quit()


def test_chat_page_history_after_an_error_and_a_new_chat(server: Server) -> None:
    """A turn that failed is not sent again, and an answer stopped by "new chat" does not
    follow into the new conversation (the messages each request sends, recorded in the page;
    the first request is made to fail there)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    driver = _chromium()
    try:
        driver.get(server.url + "/")
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: d.find_element(By.ID, "model").text == "random")
        # record what each chat request sends, and hold it 300 ms (time to press "new chat")
        driver.execute_script(
            """
            window.sent = [];
            const real = window.fetch;
            window.fetch = async (url, opts) => {
              if (String(url).includes("chat/completions")) {
                window.sent.push(JSON.parse(opts.body).messages);
                await new Promise((r) => setTimeout(r, 300));
                if (opts.signal.aborted) throw new DOMException("stopped", "AbortError");
                if (window.sent.length === 1) {  // the first one fails as a refusal would
                  const error = { error: { message: "refused" } };
                  return new Response(JSON.stringify(error), { status: 400 });
                }
              }
              return real(url, opts);
            };
            """
        )

        def sent() -> list[list[dict[str, str]]]:
            out: list[list[dict[str, str]]] = driver.execute_script("return window.sent")
            return out

        box = driver.find_element(By.ID, "input")
        box.send_keys("first", Keys.ENTER)
        wait.until(
            lambda d: d.find_element(By.CSS_SELECTOR, ".stats span").text == "error: refused"
        )
        box.send_keys("second", Keys.ENTER)
        wait.until(
            lambda d: (
                "first token after" in d.find_elements(By.CSS_SELECTOR, ".stats span")[-1].text
            )
        )
        assert sent()[1] == [{"role": "user", "content": "second"}]
        # a turn under way, then "new chat": the new conversation starts empty
        box.send_keys("third", Keys.ENTER)
        driver.find_element(By.ID, "reset").click()
        wait.until(lambda d: not d.find_elements(By.CSS_SELECTOR, ".user span"))
        wait.until(lambda d: d.find_element(By.ID, "send").text == "Send")
        box.send_keys("fourth", Keys.ENTER)
        wait.until(lambda d: len(sent()) == 4)
        assert sent()[3] == [{"role": "user", "content": "fourth"}]
    finally:
        driver.quit()
