"""The documentation site: it builds with every warning an error (``make docs``), its API
reference lists every exported name, it renders in a real headless browser (Chromium), its
search finds the API, and the build fails on what it must fail on.

The browser part needs Debian's ``chromium`` and ``chromium-driver`` (``make browser`` installs
them; ``make test`` does it first). Screenshots of the pages go to ``docs/_build/screenshots/``.
"""

from __future__ import annotations

import contextlib
import functools
import html
import http.server
import importlib
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SCREENSHOTS = Path(os.environ.get("PUSHFORWARD_SCREENSHOTS", DOCS / "_build" / "screenshots"))
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")

sys.path.insert(0, str(DOCS / "_ext"))
from pushforward_docs import public_modules  # noqa: E402


def sphinx(src: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """``make docs``'s command: HTML, nitpicky, every warning an error (all reported)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    env.setdefault("PUSHFORWARD_DOCS_SIZE", "ci")
    cmd = [sys.executable, "-m", "sphinx", "-b", "html", "-W", "--keep-going", "-n", "-q"]
    return subprocess.run(
        [*cmd, *extra, str(src), str(out)], env=env, capture_output=True, text=True, cwd=ROOT
    )


@pytest.fixture(scope="session")
def site(tmp_path_factory) -> Path:
    """The site, built as ``make docs`` builds it (into a temporary folder; or an already
    built one named by ``PUSHFORWARD_DOCS_SITE``)."""
    if os.environ.get("PUSHFORWARD_DOCS_SITE"):
        return Path(os.environ["PUSHFORWARD_DOCS_SITE"])
    out = tmp_path_factory.mktemp("site")
    start = time.perf_counter()
    done = sphinx(DOCS, out / "html", "-d", str(out / "doctrees"))
    seconds = time.perf_counter() - start
    assert done.returncode == 0, f"the docs build failed:\n{done.stdout}\n{done.stderr}"
    print(f"docs build: {seconds:.0f} s")
    return out / "html"


def inventory(site: Path) -> dict[str, dict]:
    from sphinx.util.inventory import InventoryFile

    with (site / "objects.inv").open("rb") as f:
        inv = InventoryFile.load(f, "", lambda base, uri: uri)
    return {kind: dict(entries) for kind, entries in getattr(inv, "data", inv).items()}


def exported_names() -> list[str]:
    """``module.name`` for every name in the ``__all__`` of pushforward and its public
    modules (a module in ``__all__`` by its own name)."""
    names = []
    for module_name in public_modules():
        module = importlib.import_module(module_name)
        for attr in module.__all__:
            obj = getattr(module, attr)
            names.append(obj.__name__ if isinstance(obj, type(sys)) else f"{module_name}.{attr}")
    return names


def test_every_exported_name_is_in_the_sites_index(site):
    objects = inventory(site)
    documented = {
        name for kind, entries in objects.items() if kind.startswith("py:") for name in entries
    }
    names = exported_names()
    assert len(names) > 60
    missing = [n for n in names if n not in documented]
    assert not missing, f"exported but not in the site's index: {missing}"
    genindex = (site / "genindex.html").read_text()
    for name in names:
        assert name.rsplit(".", 1)[-1] in genindex, name


def test_public_modules_include_the_subpackages():
    assert {
        "pushforward",
        "pushforward.botorch",
        "pushforward.covariance",
        "pushforward.curvature",
        "pushforward.distributed",
        "pushforward.laplace_interop",
        "pushforward.testing",
    } <= set(public_modules())


def page_text(path: Path) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", path.read_text()))


def test_concepts_page_shows_a_plan_printed_at_build_time(site):
    text = page_text(site / "concepts.html")
    assert "Output (computed when this page was built)" in text
    assert re.search(r"Plan: .*32 x 1 examples x 4 outputs, P=836", text)
    assert re.search(r"MemoryBudgetError: [\d,]+ bytes needed, 1,024 allowed", text)


def test_gallery_ran_the_digits_guide(site):
    page = (site / "auto_examples" / "plot_digits.html").read_text()
    assert "laplace-torch: accuracy" in page_text(site / "auto_examples" / "plot_digits.html")
    assert '<table class="pf-results">' in page  # the table it computed
    assert "sphx_glr_plot_digits_001.png" in page  # the figure it drew
    assert (site / "_images" / "sphx_glr_plot_digits_001.png").stat().st_size > 10_000


# -- the build fails on what it must fail on ----------------------------------------------------
BROKEN_CONF = """
import sys
sys.path.insert(0, {ext!r})
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "myst_parser", "pushforward_docs"]
nitpicky = True
nitpick_ignore_regex = [(r"py:.*", r"(?!pushforward\\.).*")]
exclude_patterns = ["api/generated/pushforward.testing.rst"]
"""

BROKEN_INDEX = """# broken

A reference to {func}`pushforward.no_such_function`.

```{pf-exec}
raise RuntimeError("this example fails")
```

```{toctree}
:glob:

api/generated/*
```
"""


def test_build_fails_on_a_broken_reference_a_failing_example_and_an_undocumented_name(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "conf.py").write_text(BROKEN_CONF.format(ext=str(DOCS / "_ext")))
    (src / "index.md").write_text(BROKEN_INDEX)
    done = sphinx(src, tmp_path / "out")
    log = done.stdout + done.stderr
    assert done.returncode != 0
    assert "reference target not found: pushforward.no_such_function" in log
    assert "this example fails" in log
    assert "public name pushforward.testing.check_covariance_operator is not in the API" in log


# -- in a browser -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        if os.environ.get("CI"):
            pytest.fail("chromium and chromium-driver are missing: `make browser` installs them")
        pytest.skip("chromium and chromium-driver are not installed (`make browser`)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    options.add_argument("--window-size=1280,1000")
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def served(site):
    """The site over HTTP on the loopback interface (the search page fetches its index)."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join()


def wait_for(condition, timeout: float = 30.0):
    end = time.monotonic() + timeout
    while True:
        with contextlib.suppress(Exception):
            value = condition()
            if value:
                return value
        if time.monotonic() > end:
            raise AssertionError("timed out waiting for the page")
        time.sleep(0.2)


def screenshot(driver, name: str) -> Path:
    """A screenshot of the whole page (the window grown to the page's height)."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1280, min(max(height, 800), 6000))
    path = SCREENSHOTS / f"{name}.png"
    driver.save_screenshot(str(path))
    driver.set_window_size(1280, 1000)
    assert path.stat().st_size > 10_000
    return path


def test_pages_render_in_a_browser(browser, served):
    from selenium.webdriver.common.by import By

    browser.get(f"{served}/index.html")
    assert browser.title.startswith("pushforward")
    assert browser.find_element(By.CSS_SELECTOR, "article h1").text.startswith("pushforward")
    screenshot(browser, "home")

    browser.get(f"{served}/api/generated/pushforward.html")
    entry = browser.find_element(By.ID, "pushforward.functional_variance")
    assert entry.is_displayed() and "functional_variance" in entry.text
    screenshot(browser, "api-pushforward")

    browser.get(f"{served}/auto_examples/plot_digits.html")
    assert "handwritten digits" in browser.title
    figure = browser.find_element(By.CSS_SELECTOR, "img[src*='sphx_glr_plot_digits_001']")
    width = wait_for(lambda: browser.execute_script("return arguments[0].naturalWidth", figure))
    assert width > 500 and figure.is_displayed()
    screenshot(browser, "digits-guide")


def test_search_finds_functional_variance(browser, served):
    from selenium.webdriver.common.by import By

    browser.get(f"{served}/search.html?q=functional_variance")
    links = wait_for(
        lambda: [
            a
            for a in browser.find_elements(By.CSS_SELECTOR, "#search-results a, ul.search a")
            if "functional_variance" in a.text
        ]
    )
    assert any("api/generated/pushforward.html" in a.get_attribute("href") for a in links)
    screenshot(browser, "search-functional_variance")
