"""The documentation site: built from the notebooks, every internal link resolves, and every page loads in headless
Chromium offline (no request leaves the local server), with maths typeset by KaTeX, figures drawn, nothing cut off."""
import functools, html.parser, http.server, json, os, re, select, shutil, subprocess, sys, tempfile, threading, time
from pathlib import Path
from urllib.parse import unquote, urljoin, urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SITE = ROOT / "_docs"
SCREENSHOTS = ROOT / "_docs_screenshots"
FIRST_FIGURE_MAX_PX = 3000   # a benchmark page's first figure starts within two 1600-px screens (1280 px wide; was ~22,000)
MIN_KATEX_KERNELS = 100      # the kernels chapter has ~118 math spans


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.fixture(scope="module")
def site():
    subprocess.run([sys.executable, str(ROOT / "tools" / "build_docs.py"), "site"], check=True, cwd=ROOT)
    return SITE


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *a): pass


@pytest.fixture(scope="module")
def server(site):
    handler = functools.partial(_Quiet, directory=str(site))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


# ---- static checks of the built HTML: assets and links

class _Refs(html.parser.HTMLParser):
    "Collect `<a href>` targets, loaded assets (`script src`, `link href`, `img src`) and element ids of one page."
    def __init__(self):
        super().__init__(); self.links, self.assets, self.ids = [], [], set()
    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if a.get("id"): self.ids.add(a["id"])
        if tag == "a" and a.get("name"): self.ids.add(a["name"])
        if tag == "a" and a.get("href"): self.links.append(a["href"])
        elif tag in ("script", "img", "iframe") and a.get("src"): self.assets.append(a["src"])
        elif tag == "link" and a.get("href") and a.get("rel") not in ("canonical", "alternate"): self.assets.append(a["href"])


@functools.lru_cache(maxsize=None)
def _parse(page: Path) -> _Refs:
    p = _Refs(); p.feed(page.read_text()); return p


def _site_url():
    return (yaml.safe_load((ROOT / "_quarto.yml").read_text())["website"].get("site-url") or "").rstrip("/")


def test_site_pages_exist(site):
    pages = {p.name for p in site.glob("*.html")}
    for name in ("index.html", "config.html", "kernels.html", "cli.html", "bench.html", "bench_attention.html"):
        assert name in pages, (name, sorted(pages))
    for page in site.glob("*.html"):
        html = page.read_text()
        assert html.count("plotly.js v") == 0, f"{page.name}: plotly.js inlined; it must load once from site_libs"
        assert html.count('src="' + "site_libs/plotly/plotly.min.js") <= 1, page.name


def test_every_asset_is_local(site):
    "No page or stylesheet loads anything from another host (KaTeX, the theme's fonts, plotly.js are in site_libs)."
    for page in sorted(site.rglob("*.html")):
        remote = [a for a in _parse(page).assets if urlparse(a).scheme in ("http", "https") or a.startswith("//")]
        assert not remote, f"{page.name} loads remote assets: {remote[:5]}"
        missing = [a for a in _parse(page).assets if not urlparse(a).scheme
                   and not (page.parent / unquote(urlparse(a).path)).is_file()]
        assert not missing, f"{page.name} loads assets missing from the site: {missing[:5]}"
    for css in (site / "site_libs").rglob("*.css"):
        assert not re.search(r"@import\s+url\(\s*[\"']?(https?:)?//", css.read_text()), f"{css}: remote @import"
    assert (site / "site_libs" / "katex" / "katex.min.js").is_file()
    assert any((site / "site_libs" / "katex" / "fonts").glob("*.woff2"))


def test_every_internal_link_resolves(site):
    "Every link to a page of the site (relative, or to the published site-url) names an existing file, and its anchor exists."
    base = _site_url()
    broken = []
    for page in sorted(site.rglob("*.html")):
        for href in _parse(page).links:
            if base and href.startswith(base + "/"): href = href[len(base) + 1:]
            u = urlparse(href)
            if u.scheme or href.startswith("//"): continue                         # other sites, mailto:, javascript:
            target = (page.parent / unquote(u.path)).resolve() if u.path else page
            if target.is_dir(): target = target / "index.html"
            if not target.is_file():
                broken.append(f"{page.name}: {href} (no file {target.relative_to(site.resolve()) if target.is_relative_to(site.resolve()) else target})")
            elif u.fragment and target.suffix == ".html" and unquote(u.fragment) not in _parse(target).ids:
                broken.append(f"{page.name}: {href} (no id {u.fragment!r} in {target.name})")
    assert not broken, f"{len(broken)} broken internal links:\n" + "\n".join(broken[:20])


def test_notebook_links_are_rewritten():
    "`NN_name.ipynb` and `NN_name.html` links (with anchors) point at the rendered page names; other links stay."
    sys.path.insert(0, str(ROOT / "tools"))
    from build_docs import rewrite_links
    pages = {"51_bench_attention": "bench_attention", "bench_attention": "bench_attention", "10_kernels": "kernels"}
    md = ("See [attention](51_bench_attention.ipynb), [k](./10_kernels.html#yat), <a href=\"10_kernels.ipynb\">k</a>,\n"
          "[ext](https://x.org/10_kernels.html), `nbs/10_kernels.ipynb`, [other](99_missing.ipynb)\n[ref]: 10_kernels.ipynb")
    assert rewrite_links(md, pages) == (
        "See [attention](bench_attention.html), [k](kernels.html#yat), <a href=\"kernels.html\">k</a>,\n"
        "[ext](https://x.org/10_kernels.html), `nbs/10_kernels.ipynb`, [other](99_missing.ipynb)\n[ref]: kernels.html")


# ---- headless Chromium over the DevTools protocol (a pipe: no extra package)

class Chrome:
    "Headless Chromium driven over `--remote-debugging-pipe`; every host but 127.0.0.1 resolves to nothing."
    def __init__(self, exe, width=1280, height=1600):
        self.profile = tempfile.mkdtemp(prefix="chromium-")
        to_r, self._w = os.pipe()                                  # we write commands -> its fd 3
        self._r, from_w = os.pipe()                                # its fd 4 -> we read replies and events
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--mute-audio",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-default-apps", "--disable-extensions", "--remote-debugging-pipe",
                 "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", f"--window-size={width},{height}",
                 f"--user-data-dir={self.profile}", "about:blank"]
        # the pipe wants fds 3 and 4: move ours above them first, so neither move overwrites the other
        move = f'exec 10<&{to_r} 11>&{from_w} {to_r}<&- {from_w}>&-; exec "$0" "$@" 3<&10 4>&11 10<&- 11>&-'
        self.proc = subprocess.Popen(["bash", "-c", move, exe, *flags], pass_fds=(to_r, from_w),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_r); os.close(from_w)
        self._buf, self._id, self.events, self.session = b"", 0, [], None
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Network", "Log"): self.send(f"{domain}.enable")
        self.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    def _read(self, timeout):
        while b"\0" not in self._buf:
            if not select.select([self._r], [], [], timeout)[0]: raise TimeoutError("Chromium did not answer")
            chunk = os.read(self._r, 1 << 20)
            if not chunk: raise RuntimeError("Chromium exited")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def send(self, method, timeout=60, **params):
        self._id += 1
        msg = dict(id=self._id, method=method, params=params)
        if self.session and not method.startswith("Target."): msg["sessionId"] = self.session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        while True:
            m = self._read(timeout)
            if m.get("id") == self._id:
                if "error" in m: raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            self.events.append(m)

    def pump(self, seconds):
        "Collect events for a while."
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            try: self.events.append(self._read(left))
            except TimeoutError: return

    def eval(self, js):
        r = self.send("Runtime.evaluate", expression=js, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r: raise RuntimeError(f"{js[:60]}…: {r['exceptionDetails']}")
        return r["result"].get("value")

    def open(self, url, settle="true", timeout=30):
        "Load a page, wait for its load event, then until `settle` (a JS expression) holds; returns the page's events."
        self.events = []
        self.send("Page.navigate", url=url)
        end = time.monotonic() + timeout
        while not any(e.get("method") == "Page.loadEventFired" for e in self.events):
            if time.monotonic() > end: raise TimeoutError(f"{url}: no load event")
            self.events.append(self._read(end - time.monotonic()))
        while not self.eval(settle) and time.monotonic() < end: self.pump(0.2)
        self.pump(0.3)
        return self.events

    def screenshot(self, path):
        import base64
        Path(path).write_bytes(base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"]))

    def close(self):
        try: self.send("Browser.close", timeout=5)
        except Exception: pass
        try: self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired: self.proc.kill(); self.proc.wait()
        os.close(self._r); os.close(self._w)
        shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture(scope="module")
def chrome():
    if not _chromium(): pytest.skip("headless Chromium not installed (Debian package `chromium`; `make browser`)")
    c = Chrome(_chromium())
    yield c
    c.close()


# What each page reports once loaded: leftover TeX outside code, KaTeX output, figures, and anything cut off.
PROBE = r"""(() => {
  const main = document.querySelector("main") || document.body;
  const clone = main.cloneNode(true);
  clone.querySelectorAll("pre, code, script, style, .katex, .sourceCode, textarea").forEach(e => e.remove());
  const text = clone.textContent;
  const tex = [];
  for (const d of ["\\(", "\\)", "\\[", "\\]", "$$"]) {
    const i = text.indexOf(d);
    if (i >= 0) tex.push(text.slice(Math.max(0, i - 40), i + 40).replace(/\s+/g, " "));
  }
  const figs = [...document.querySelectorAll(".plotly-graph-div")];
  const right = main.getBoundingClientRect().right;
  const scrolls = e => { for (let a = e.parentElement; a && a !== main.parentElement; a = a.parentElement) {
      const o = getComputedStyle(a).overflowX; if (o === "auto" || o === "scroll") return true; } return false; };
  const cut = [...main.querySelectorAll("pre, table, img, svg, .cell-output-display, .katex-display")]
    .filter(e => e.getBoundingClientRect().right > right + 1 && !scrolls(e))
    .map(e => `${e.tagName.toLowerCase()}.${e.className.baseVal ?? e.className}`.slice(0, 60));
  return {
    tex, katex: document.querySelectorAll(".katex").length, katexErrors: document.querySelectorAll(".katex-error").length,
    figures: figs.length, drawn: document.querySelectorAll(".plotly-graph-div .main-svg").length,
    firstFigureTop: figs.length ? figs[0].getBoundingClientRect().top + window.scrollY : null,
    pageWidth: document.documentElement.scrollWidth, viewWidth: window.innerWidth, cut,
    hasMath: !!document.querySelector('script[src*="katex"]'),
  };
})()"""
SETTLE = ("document.readyState === 'complete' && [...document.querySelectorAll('.plotly-graph-div')]"
          ".every(d => d.querySelector('.main-svg'))")


def _problems(events, origin):
    "Requests that left the local server, failed loads, JavaScript exceptions and console errors of one page."
    out, ids = [], {}
    for e in events:
        m, p = e.get("method"), e.get("params", {})
        if m == "Network.requestWillBeSent":
            url = p["request"]["url"]; ids[p["requestId"]] = url
            if not url.startswith((origin + "/", "data:", "blob:", "about:")): out.append(f"remote request: {url}")
        elif m == "Network.loadingFailed" and not p.get("canceled"):
            out.append(f"failed load: {ids.get(p['requestId'], '?')} ({p.get('errorText')})")
        elif m == "Network.responseReceived" and p["response"]["status"] >= 400:
            out.append(f"HTTP {p['response']['status']}: {p['response']['url']}")
        elif m == "Runtime.exceptionThrown":
            d = p["exceptionDetails"]; out.append(f"exception: {d.get('exception', {}).get('description', d.get('text'))}"[:300])
        elif m == "Runtime.consoleAPICalled" and p["type"] == "error":
            out.append("console.error: " + " ".join(str(a.get("value", a.get("description"))) for a in p["args"])[:300])
        elif m == "Log.entryAdded" and p["entry"]["level"] == "error":
            out.append(f"log error: {p['entry']['text']} {p['entry'].get('url', '')}"[:300])
    return sorted(set(out))


def test_browser_catches_remote_requests_and_raw_tex(chrome, server, tmp_path):
    "The checks themselves: a page that loads a CDN script and shows raw TeX is reported (so a pass means something)."
    bad = SITE / "_probe_bad.html"
    bad.write_text('<html><head><script src="https://cdn.jsdelivr.net/npm/katex@0.16.11/dist/katex.min.js"></script>'
                   '</head><body><main><p>raw \\(x^2\\) and $$y$$</p></main></body></html>')
    try:
        events = chrome.open(f"{server}/{bad.name}")
        probe = chrome.eval(PROBE)
    finally:
        bad.unlink()
    assert any(p.startswith("remote request: https://cdn.jsdelivr.net") for p in _problems(events, server))
    assert probe["tex"] and probe["katex"] == 0


@pytest.mark.slow
def test_pages_render_offline_in_chromium(site, server, chrome):
    "Every page: only local requests, no errors, no raw TeX, KaTeX output where there is maths, figures drawn, nothing cut off."
    SCREENSHOTS.mkdir(exist_ok=True)
    report, failures = {}, []
    for page in sorted(site.glob("*.html")):
        events = chrome.open(f"{server}/{page.name}", settle=SETTLE)
        probe = chrome.eval(PROBE)
        report[page.name] = probe
        bad = _problems(events, server)
        if bad: failures.append(f"{page.name}: " + "; ".join(bad[:5]))
        if probe["tex"]: failures.append(f"{page.name}: unrendered TeX: {probe['tex']}")
        if probe["hasMath"] and not probe["katex"]: failures.append(f"{page.name}: has maths but no .katex element")
        if probe["katexErrors"]: failures.append(f"{page.name}: {probe['katexErrors']} KaTeX errors")
        if probe["drawn"] < probe["figures"]: failures.append(f"{page.name}: {probe['figures']} figures, {probe['drawn']} drawn")
        if probe["pageWidth"] > probe["viewWidth"]: failures.append(f"{page.name}: page scrolls sideways ({probe['pageWidth']} px)")
        if probe["cut"]: failures.append(f"{page.name}: wide content cut off, not scrollable: {probe['cut'][:5]}")
        if page.name.startswith("bench") and probe["figures"] and probe["firstFigureTop"] > FIRST_FIGURE_MAX_PX:
            failures.append(f"{page.name}: first figure at {probe['firstFigureTop']:.0f} px > {FIRST_FIGURE_MAX_PX}")
        chrome.screenshot(SCREENSHOTS / f"{page.stem}.png")
        if probe["katex"]:                                          # a second shot at the first displayed formula
            chrome.eval("(document.querySelector('.katex-display') || document.querySelector('.katex')).scrollIntoView()")
            chrome.screenshot(SCREENSHOTS / f"{page.stem}.math.png")
    (SCREENSHOTS / "report.json").write_text(json.dumps(report, indent=1))
    assert report["kernels.html"]["katex"] >= MIN_KATEX_KERNELS, report["kernels.html"]
    assert report["bench_attention.html"]["figures"], "the attention benchmark page has no figure"
    assert not failures, "\n".join(failures)
    assert (SCREENSHOTS / "kernels.math.png").stat().st_size > 10_000
