"""The service's page in a real browser (Playwright driving Chromium; Debian's `chromium` package,
which .ci/run installs): a job submitted through the form appears, its progress bar advances, and
its cancel button stops it. Where no Chromium is installed the test skips, except under CI=true,
where it fails: CI must run it."""
import json
import os
import re
import shutil
import time

import pytest

pytest.importorskip("fastapi")
playwright = pytest.importorskip("playwright.sync_api")

import serve  # noqa: E402
import service  # noqa: E402
from conftest import make_hf_model, run_cfg, save_hf, serving, write_rows  # noqa: E402
from tokenizer_util import write_tokenizer_json  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
def server(tmp_path, monkeypatch):
    """A real service on an ephemeral localhost port: (url, token)."""
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("no chromium on PATH: .ci/run installs Debian's chromium for this test")
        pytest.skip("no chromium on PATH (apt-get install chromium); CI runs this test")
    monkeypatch.delenv(serve.TOKEN_ENV, raising=False)
    vocab = write_tokenizer_json(tmp_path / "base")
    base = save_hf(make_hf_model(vocab_size=max(vocab, 384), tie_word_embeddings=True), tmp_path / "base")
    out = tmp_path / "out"
    svc = service.Service(run_cfg(base, out, []))
    try:
        with serving(serve.guard(serve.make_app(svc), serve.server_token(str(out)), 1 << 20)) as url:
            yield url, serve.client_token(str(out))
    finally:
        svc.close()


def progress(page, name: str) -> tuple[int, int]:
    text = page.locator("#jobs tr", has_text=name).locator("small").inner_text()
    done, total = re.fullmatch(r"(\d+) / (\d+)", text).groups()
    return int(done), int(total)


def test_submit_watch_and_cancel_in_a_browser(server, tmp_path):
    url, token = server
    rows = write_rows(tmp_path / "rows.jsonl", 8, 0, "reverse")
    fields = {"name": "browser-job", "r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"], "lr": 1e-3,
              "batch_size": 4, "micro_batch_size": 4, "epochs": 500}   # 1,000 steps: still training when cancelled
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[  # the closed network: no background connections
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page()
            external = []
            page.on("request", lambda r: None if r.url.startswith(url) else external.append(r.url))
            page.goto(url + "/")
            page.fill("#token", token)
            page.click("#use")
            page.fill("#fields", json.dumps(fields))
            page.set_input_files("#rows", rows)
            page.click("#submit")
            row = page.locator("#jobs tr", has_text="browser-job")
            row.wait_for(timeout=30_000)
            deadline = time.time() + 60
            while progress(page, "browser-job")[0] == 0:   # the page polls every 2 s
                assert time.time() < deadline, page.content()
                time.sleep(0.2)
            first, total = progress(page, "browser-job")
            assert total == 1000 and 0 < first < total
            while progress(page, "browser-job")[0] <= first:   # the bar advances
                assert time.time() < deadline
                time.sleep(0.2)
            width = row.locator(".bar div").evaluate("e => parseFloat(e.style.width)")
            assert 0 < width < 100
            if os.environ.get("SERVE_SCREENSHOT"):   # the README's picture: SERVE_SCREENSHOT=docs/serve.png
                page.screenshot(path=os.environ["SERVE_SCREENSHOT"], full_page=True)
            row.get_by_role("button", name="cancel").click()
            page.locator("#jobs tr", has_text="browser-job").filter(has_text="stopped").wait_for(timeout=30_000)
            assert row.get_by_role("button", name="cancel").count() == 0
            assert external == []   # nothing fetched from anywhere but the service
        finally:
            browser.close()
