"""The documentation site: built from the notebooks, every page loads in headless Chromium, figures render."""
import functools, http.server, os, re, shutil, subprocess, sys, threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SITE = ROOT / "_docs"
SCREENSHOTS = ROOT / "_docs_screenshots"


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.fixture(scope="module")
def site():
    subprocess.run([sys.executable, str(ROOT / "tools" / "build_docs.py"), "site"], check=True, cwd=ROOT)
    return SITE


@pytest.fixture(scope="module")
def server(site):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def _render(url, screenshot=None, budget_ms=20000):
    exe = _chromium()
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--enable-logging=stderr", "--v=0", f"--virtual-time-budget={budget_ms}",
             f"--user-data-dir={ROOT / '.chromium-profile'}"]
    if screenshot:
        out = subprocess.run([exe, *flags, "--window-size=1280,1600", f"--screenshot={screenshot}", url],
                             capture_output=True, text=True, timeout=120)
        return out.stderr
    out = subprocess.run([exe, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    return out.stdout, out.stderr


def test_site_pages_exist(site):
    pages = {p.name for p in site.glob("*.html")}
    for name in ("index.html", "config.html", "kernels.html", "cli.html"):
        assert name in pages, (name, sorted(pages))
    for page in site.glob("*.html"):
        html = page.read_text()
        assert html.count("plotly.js v") == 0, f"{page.name}: plotly.js inlined; it must load once from site_libs"
        assert html.count('src="' + "site_libs/plotly/plotly.min.js") <= 1, page.name


@pytest.mark.slow
def test_pages_render_in_chromium(site, server):
    if not _chromium(): pytest.skip("headless Chromium not installed (Debian package `chromium`; `make browser`)")
    figure_pages = [p for p in sorted(site.glob("*.html")) if "Plotly.newPlot" in p.read_text()]
    assert figure_pages, "no page of the site has a plotly figure"
    SCREENSHOTS.mkdir(exist_ok=True)
    for page in [site / "index.html", *figure_pages]:
        dom, log = _render(f"{server}/{page.name}")
        assert "<main" in dom or 'id="quarto-document-content"' in dom, f"{page.name} did not load"
        errors = [l for l in log.splitlines() if "Uncaught" in l or ("CONSOLE" in l and "Error" in l)]
        assert not errors, f"{page.name}: JavaScript errors:\n" + "\n".join(errors[:5])
        if page in figure_pages:
            n_div = len(re.findall(r'class="plotly-graph-div', dom))
            n_svg = len(re.findall(r'class="main-svg"', dom))
            assert n_div and n_svg >= n_div, f"{page.name}: {n_div} figure divs but {n_svg} rendered svgs"
        _render(f"{server}/{page.name}", screenshot=str(SCREENSHOTS / f"{page.stem}.png"))
        assert (SCREENSHOTS / f"{page.stem}.png").stat().st_size > 10_000
