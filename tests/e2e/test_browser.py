"""The ``/ui`` page and ``/docs`` in a real browser (Debian's Chromium driven by Playwright) against a
real ``rlpips serve`` with the offline weights and an API key configured.

Every request the browser makes outside the service is refused and recorded, and each test asserts
there was none: the pages must work without internet. Under ``CI=true`` a missing Chromium fails the
tests (``.ci/run`` installs it); elsewhere they skip with the reason. ``RLPIPS_UI_SCREENSHOT=path``
also writes the page's screenshot (JPEG) there (``make screenshot`` updates the README's).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from PIL import Image, ImageOps
from playwright.sync_api import Browser, Page, Request, Route, expect, sync_playwright

from tests.support import IMAGENET
from tests.support.serverutil import Server, running
from tests.support.tools import system_tool

pytestmark = pytest.mark.e2e

KEY = "browser-test-key-0123456789"
MODELS = ("lpips-alex", "r-lpips-alex-linf-synth")
IMAGES = sorted(IMAGENET.glob("*.JPEG"))[60:63]
#: Where to write the page's screenshot (JPEG), if anywhere; that run serves at the default
#: resolution (256) so that the images look as users see them, the others at 64 for speed.
SCREENSHOT = os.environ.get("RLPIPS_UI_SCREENSHOT")


@pytest.fixture(scope="module")
def server(weights_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("browser") / "server.log"
    env = {
        "RLPIPS_RESOLUTION": "256" if SCREENSHOT else "64",
        "RLPIPS_MODELS": ",".join(MODELS),
        "RLPIPS_API_KEYS": KEY,
        "RLPIPS_MAX_WAIT_MS": "5",
    }
    with running(weights_dir, log, env) as srv:
        yield srv


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    executable = system_tool("chromium", "chromium")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(browser: Browser, server: Server) -> Iterator[Page]:
    """A fresh tab; any request outside the service is aborted and recorded in ``page.outside``."""
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    tab = context.new_page()
    outside: list[str] = []
    ours = urlsplit(server.url).netloc

    def only_ours(route: Route, request: Request) -> None:
        if request.url.startswith(("data:", "blob:")) or urlsplit(request.url).netloc == ours:
            route.continue_()
        else:
            outside.append(request.url)
            route.abort()

    tab.route("**/*", only_ours)
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    yield tab
    context.close()
    assert outside == [], f"the page asked for outside resources: {outside}"
    assert errors == [], f"script errors on the page: {errors}"


def _api_distances(server: Server, model: str) -> list[float]:
    files = [("reference", ("r.jpg", IMAGES[0].read_bytes()))]
    files += [("candidate", (p.name, p.read_bytes())) for p in IMAGES[1:]]
    r = httpx.post(
        f"{server.url}/distance",
        files=files,
        data={"model": model},
        headers={"X-API-Key": KEY},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    return [res["distance"] for res in r.json()["results"]]


def _sign_in_and_choose(page: Page, server: Server) -> None:
    """Open the page (the model list is refused without the key), type the key, choose the files."""
    page.goto(f"{server.url}/ui")
    expect(page.locator("#error")).to_contain_text("unauthorized")
    page.click("#key-box summary")
    page.fill("#api-key", KEY)
    page.press("#api-key", "Tab")  # commits the key: the models load with it
    for model in MODELS:
        expect(page.locator(f'#models input[value="{model}"]')).to_be_checked()
    expect(page.locator("#error")).to_be_hidden()
    page.set_input_files("#reference", str(IMAGES[0]))
    page.set_input_files("#candidates", [str(p) for p in IMAGES[1:]])


def test_the_page_shows_what_the_api_answers(page: Page, server: Server) -> None:
    _sign_in_and_choose(page, server)
    page.focus("#compare")
    page.keyboard.press("Enter")  # the form works from the keyboard
    for model in MODELS:
        block = page.locator(f'.model-block[data-model="{model}"]')
        expect(block.locator(".distance")).to_have_count(2, timeout=60_000)
        shown = block.locator(".distance")
        for i, expected in enumerate(_api_distances(server, model)):
            value = float(shown.nth(i).get_attribute("data-value") or "nan")
            assert value == pytest.approx(expected, rel=1e-5, abs=1e-7), (model, i)
            assert shown.nth(i).inner_text() == f"{value:.4f}"
        expect(block.locator(".overlay img.heat")).to_have_count(2)
        expect(block.locator(".layers .layer")).to_have_count(10)  # 5 AlexNet layers a candidate
        expect(block.locator(".legend")).to_contain_text("per-pixel distance")
    expect(page.locator("#error")).to_be_hidden()

    page.select_option("#attack-target", "0")
    page.fill("#attack-steps", "2")
    page.click("#attack")
    rows = page.locator("#attack-result tbody tr")
    expect(rows).to_have_count(len(MODELS), timeout=120_000)
    for i, model in enumerate(MODELS):
        row = rows.nth(i)
        assert row.get_attribute("data-model") == model
        clean = float(row.get_attribute("data-clean") or "nan")
        assert clean == pytest.approx(_api_distances(server, model)[0], rel=1e-4, abs=1e-6)
        assert row.get_attribute("data-flipped") in ("true", "false")
    expect(page.locator("#attack-result canvas")).to_have_count(len(MODELS))
    shot = page.screenshot(full_page=True, type="jpeg", quality=80)
    assert shot.startswith(b"\xff\xd8")
    if SCREENSHOT:
        Path(SCREENSHOT).write_bytes(shot)


def test_api_errors_appear_as_readable_messages(page: Page, server: Server, tmp_path: Path) -> None:
    _sign_in_and_choose(page, server)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")
    page.set_input_files("#candidates", str(broken))
    page.click("#compare")
    expect(page.locator("#error")).to_contain_text("invalid_image", timeout=30_000)
    expect(page.locator("#error")).to_contain_text("candidate[0]")


def test_docs_render_offline_with_the_key(page: Page, server: Server) -> None:
    _sign_in_and_choose(page, server)  # the key typed into the page serves /docs in the same tab
    spec = httpx.get(f"{server.url}/openapi.json", headers={"X-API-Key": KEY}).json()
    operations = sum(len(ops) for ops in spec["paths"].values())
    page.goto(f"{server.url}/docs")
    expect(page.locator(".opblock")).to_have_count(operations, timeout=30_000)
    expect(page.locator(".btn.authorize")).to_be_visible()  # the security schemes are there


def test_narrow_screen_and_keyboard(page: Page, server: Server) -> None:
    page.set_viewport_size({"width": 360, "height": 740})
    page.goto(f"{server.url}/ui")
    overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"the page scrolls sideways by {overflow} px on a narrow screen"
    reached = []
    for _ in range(40):
        page.keyboard.press("Tab")
        reached.append(page.evaluate("document.activeElement.id"))
    for control in ("reference", "candidates", "compare", "attack-target", "attack"):
        assert control in reached, f"#{control} cannot be reached with Tab: {reached}"


def test_mirror_invariance_from_the_page(page: Page, server: Server, tmp_path: Path) -> None:
    _sign_in_and_choose(page, server)
    flipped = tmp_path / "mirror.png"
    ImageOps.mirror(Image.open(IMAGES[0])).save(flipped)
    page.set_input_files("#candidates", str(flipped))
    page.check("#hflip")
    page.click("#compare")
    block = page.locator('.model-block[data-model="lpips-alex"]')
    expect(block.locator(".distance")).to_have_count(1, timeout=60_000)
    r = httpx.post(
        f"{server.url}/distance",
        files=[
            ("reference", ("r.jpg", IMAGES[0].read_bytes())),
            ("candidate", ("m.png", flipped.read_bytes())),
        ],
        data={"model": "lpips-alex", "invariance": "hflip"},
        headers={"X-API-Key": KEY},
        timeout=60,
    )
    expected = r.json()["results"][0]
    assert expected["mirrored"] is True
    shown = float(block.locator(".distance").get_attribute("data-value") or "nan")
    assert shown == pytest.approx(expected["distance"], rel=1e-5, abs=1e-7)
    expect(block.locator(".verdict.mirrored")).to_have_text("its mirror matched")
