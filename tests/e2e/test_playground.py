"""The playground page and offline /docs in a real headless browser: Chromium (Debian's package,
which `make install` installs) driven by Playwright for Python, against the session's app.

The browser is told nothing about the network: every request it makes is recorded, and each must
go to the server under test (no CDN, no fonts, no analytics)."""

import json
import shutil
import subprocess
from urllib.parse import urlparse

import pytest

from tests.unit.test_models import CAT_CLASSES

pytestmark = pytest.mark.e2e

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    assert CHROMIUM, "Chromium is not installed: `make install` installs Debian's chromium package"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(browser, served_app):
    context = browser.new_context()
    pg = context.new_page()
    pg.requests_seen = []
    pg.on("request", lambda r: pg.requests_seen.append(r.url))
    pg.set_default_timeout(120_000)
    yield pg
    context.close()


def same_origin(urls: list[str], base: str) -> list[str]:
    origin = urlparse(base)
    return [u for u in urls if not u.startswith(("data:", "blob:"))
            and (urlparse(u).hostname, urlparse(u).port) != (origin.hostname, origin.port)]


def test_page_builds_its_tabs_from_the_models_and_asks_nothing_of_the_internet(page, served_app):
    page.goto(served_app["url"] + "/")
    page.wait_for_selector("[data-testid=tab-image]")
    tabs = page.locator("#tabs button").all_inner_texts()
    assert tabs == ["Image classification", "Embeddings", "Chat", "Completion", "Text2text", "Text classification"]
    assert page.locator("#model option").all_inner_texts()[0].startswith("efficientnet-lite0")
    assert same_origin(page.requests_seen, served_app["url"]) == []
    assert any(u.endswith("/v1/models") for u in page.requests_seen)


def test_upload_the_cat_photo_see_tabby_and_the_copied_curl_gives_the_same_json(page, served_app, chelsea_jpeg,
                                                                                tmp_path):
    photo = tmp_path / "chelsea.jpg"
    photo.write_bytes(chelsea_jpeg)
    page.goto(served_app["url"] + "/playground")
    page.wait_for_selector("[data-testid=tab-image]").click()
    page.select_option("[data-testid=model]", "efficientnet-lite0")
    page.set_input_files("[data-testid=file]", str(photo))
    page.click("[data-testid=run]")
    page.wait_for_selector("[data-testid=top-k-row]")
    labels = page.locator("[data-testid=label]").all_inner_texts()
    assert "tabby" in labels, labels
    assert page.inner_text("[data-testid=answered-model]") == "efficientnet-lite0"
    assert page.inner_text("[data-testid=answered-version]") == "1"
    assert page.inner_text("[data-testid=latency]").endswith(" ms")
    assert page.locator("[data-testid=demo-badge]").count() == 0
    shown = json.loads(page.get_attribute("#result", "data-json"))
    curl = page.locator("[data-testid=curl]").text_content()
    assert "file=@chelsea.jpg" in curl
    out = subprocess.run(["bash", "-c", curl], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    again = json.loads(out.stdout)
    assert [c["label"] for c in again["data"][0]["top_k"]] == [c["label"] for c in shown["data"][0]["top_k"]]
    assert {c["index"] for c in again["data"][0]["top_k"]} & CAT_CLASSES
    assert again["model"] == shown["model"] and again["model_version"] == shown["model_version"]
    python = page.locator("[data-testid=python]").text_content()
    compile(python, "copied.py", "exec")  # the Python snippet is valid Python
    assert same_origin(page.requests_seen, served_app["url"]) == []


def test_chat_streams_its_answer(page, served_app):
    page.goto(served_app["url"] + "/")
    page.wait_for_selector("[data-testid=tab-chat]").click()
    page.select_option("[data-testid=model]", "smollm2-135m")
    page.fill("[data-testid=prompt]", "What is the capital of France?")
    page.fill("[data-testid=temperature]", "0")  # greedy: the answer is the same every run
    page.click("[data-testid=run]")
    # the answer grows chunk by chunk before it is done
    page.wait_for_function("() => { const o = document.querySelector('[data-testid=output]');"
                           " return o && o.textContent.length > 0 && !o.dataset.done; }")
    page.wait_for_selector("[data-testid=output][data-done=true]")
    output = page.locator("[data-testid=output]")
    assert "Paris" in output.text_content()
    assert int(output.get_attribute("data-chunks")) >= 3
    assert page.inner_text("[data-testid=answered-model]") == "smollm2-135m"
    python = page.locator("[data-testid=python]").text_content()
    assert "temperature=0, stream=True" in python and "client.chat.completions.create" in python
    compile(python, "copied.py", "exec")
    assert same_origin(page.requests_seen, served_app["url"]) == []


def test_demo_weights_are_badged_and_embeddings_show_a_cosine(page, served_app):
    page.goto(served_app["url"] + "/")
    page.wait_for_selector("[data-testid=tab-textcls]").click()
    page.click("[data-testid=run]")
    page.wait_for_selector("[data-testid=demo-badge]")  # sentiment-tiny-demo has random weights
    page.click("[data-testid=tab-embeddings]")
    page.fill("[data-testid=text-a]", "a fox")
    page.fill("[data-testid=text-b]", "a fox")
    page.click("[data-testid=run]")
    assert float(page.wait_for_selector("[data-testid=cosine]").inner_text()) == pytest.approx(1.0, abs=1e-3)


def test_refusals_read_as_sentences(page, served_app):
    """The page's handling of the server's 401 and 503 answers (their bodies as the server sends them)."""
    error = {"error": {"message": "missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
                       "type": "authentication_error", "param": None, "code": None}}
    page.route("**/v1/models", lambda route: route.fulfill(status=401, json=error))
    page.goto(served_app["url"] + "/")
    page.wait_for_function("() => document.querySelector('#status').textContent.includes('API key')")
    assert "needs an API key" in page.inner_text("#status")
    assert page.is_visible("#api-key")
    page.unroute("**/v1/models")
    busy = {"error": {"message": "model 'minilm' is at capacity; retry after 1 s", "type": "server_error",
                      "param": None, "code": "overloaded"}}
    page.route("**/v1/embeddings", lambda route: route.fulfill(status=503, json=busy, headers={"Retry-After": "1"}))
    page.fill("#api-key", "any")
    page.dispatch_event("#api-key", "change")  # the page asks for the models again, with the key
    page.wait_for_function("() => document.querySelector('#status').textContent.includes('models:')")
    page.wait_for_selector("[data-testid=tab-embeddings]").click()
    page.wait_for_selector("[data-testid=text-a]")
    page.click("[data-testid=run]")
    message = page.wait_for_selector("[data-testid=error]").inner_text()
    assert message.startswith("The model is busy or not ready, retry in 1 s")
    assert "Authorization: Bearer any" in page.locator("[data-testid=curl]").text_content()


def test_docs_render_offline(page, served_app):
    page.goto(served_app["url"] + "/docs")
    page.wait_for_selector(".swagger-ui .info .title")
    assert "maas-serve" in page.inner_text(".swagger-ui .info .title")
    page.wait_for_selector(".opblock-summary-path")  # the operations rendered from /openapi.json
    assert same_origin(page.requests_seen, served_app["url"]) == []
