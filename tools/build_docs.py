"""Build the documentation site and README.md from the notebooks, with or without Quarto.

    python tools/build_docs.py site     # _proc/ (nbdev processors) -> _docs/ (Quarto if installed, else smalldocs)
    python tools/build_docs.py readme   # README.md from nbs/index.ipynb (nbdev-readme if Quarto, else a GFM writer)

Why a script: `nbdev-docs` and `nbdev-readme` need Quarto (they try to download it when missing), and Quarto cannot
be installed everywhere. This script keeps nbdev's notebook processing (show_doc API cards, hidden cells removed,
front matter) and swaps only the renderer. It reads the repository-root `_quarto.yml`, stages it into `_proc/` with
a sidebar in notebook order, renders, then makes pages small and offline: plotly.js is copied once into the site and
loaded once per page that has figures, never inlined per figure; KaTeX (fetched once from the npm registry, checked
against its pinned sha512, cached) is copied into the site's libs; remote font imports are dropped from the theme CSS;
and links to the published site become relative, so every page works without a network.
Notebook-style links between chapters (`51_bench_attention.ipynb`, `51_bench_attention.html`) are rewritten to the
rendered page names (`bench_attention.html`) when the notebooks are staged.
"""
import base64, hashlib, io, json, os, re, shutil, subprocess, sys, tarfile, urllib.request
from pathlib import Path

import yaml
from nbdev.config import get_config
from nbdev.serve import proc_nbs

ROOT = Path(__file__).resolve().parents[1]
SKIP = r"^[_.]|\.pct\.py$"
PLOTLY_LIB = "site_libs/plotly/plotly.min.js"
INLINE_PLOTLY = re.compile(r"<script[^>]*>\s*/\*\*\s*\n?\s*\*\s*plotly\.js v.*?</script>", re.S)
# KaTeX: the version smalldocs' pages ask for (its auto-render call is written for it); sha512 = npm's `dist.integrity`
KATEX_VERSION = "0.16.11"
KATEX_URL = f"https://registry.npmjs.org/katex/-/katex-{KATEX_VERSION}.tgz"
KATEX_SHA512 = "RQrI8rlHY92OLf3rho/Ts8i/XvjgguEjOkO1BEXcU3N8BqPpSzBNwV/G0Ukr+P/l3ivvJUE/Fa/CwbS6HesGNQ=="
KATEX_LIB = "site_libs/katex"
KATEX_CDN = re.compile(r"https://cdn\.jsdelivr\.net/npm/katex@[^/\"']+/dist/")  # smalldocs' and Quarto's KaTeX URLs
REMOTE_IMPORT = re.compile(r"@import\s+url\(\s*[\"']?https?://[^)]*\)\s*;?")    # e.g. the theme's Google Fonts
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "minibert_lab" / "docs"


def _skip_flagged(do_eval):
    "API cards need the exported code and the imports only: never run flagged cells or cells mixing imports with work."
    import ast
    from nbdev.processors import cell_lang
    flags = set(get_config(ROOT).tst_flags.split())
    show = {"export", "exports", "exporti", "exec_doc"}
    def f(cell):
        # nbdev's own `_do_eval` warns "Found cells containing imports and other code" for every cell that mixes
        # the two (~45 per build); this rule never runs such cells, so it decides alone, with nbdev's same guards.
        if cell.cell_type != "code" or not cell.source or cell_lang(cell) != "python": return None
        if "nbdev_export" + "()" in cell.source or flags & set(cell.directives_): return None
        if cell.directives_.get("eval", "").lower() == "false": return None
        trees = cell.parsed_()
        if not trees: return None
        if set(cell.directives_) & show or "show_doc(" in cell.source: return True
        return all(isinstance(t, (ast.Import, ast.ImportFrom)) for t in trees) or None
    return f


def process(file_glob=""):
    "Run nbdev's processors over the notebooks into `_proc/` (in this process, so the patch above applies)."
    import nbdev.processors
    if not getattr(nbdev.processors._do_eval, "_skips_flagged", False):
        nbdev.processors._do_eval = _skip_flagged(nbdev.processors._do_eval)
        nbdev.processors._do_eval._skips_flagged = True
    cfg = get_config(ROOT)
    return proc_nbs(str(cfg.nbs_path), n_workers=0, skip_file_re=SKIP, file_glob=file_glob)


def _front(nb):
    c = nb["cells"][0] if nb["cells"] else None
    if c and c["cell_type"] == "raw":
        src = "".join(c["source"]).strip().strip("-")
        return yaml.safe_load(src) or {}
    return {}


def _drop_output_file(nb):
    "Drop `output-file` from the front matter: staging already named the notebook after it (smalldocs warns on the key)."
    c = nb["cells"][0] if nb["cells"] else None
    fm = _front(nb)
    if c is None or "output-file" not in fm: return
    fm.pop("output-file")
    c["source"] = "---\n" + yaml.safe_dump(fm, sort_keys=False, allow_unicode=True) + "---\n"


def rewrite_links(text: str, pages: dict[str, str]) -> str:
    "Point notebook-style links (`NN_name.ipynb`, `NN_name.html`, `./…`, `#anchor` kept) at the rendered page names."
    def sub(m):
        page = pages.get(m["stem"])
        return m[0] if page is None else f"{m['pre']}{page}.html{m['anchor'] or ''}"
    link = r"(?P<pre>\]\(\s*<?|href=[\"']|^\s*\[[^\]]+\]:\s*)(?:\./)?(?P<stem>[\w.-]+?)\.(?:ipynb|html)(?P<anchor>#[^)\s\"'>]*)?"
    return re.sub(link, sub, text, flags=re.M)


def stage(cache: Path) -> list[str]:
    "Rename processed notebooks to their `output-file` names, fix links between them, write `_quarto.yml` (sidebar in notebook order)."
    order, pages = [], {}
    for nb_path in sorted(cache.glob("*.ipynb")):
        out = _front(json.loads(nb_path.read_text())).get("output-file")
        target = nb_path.with_name(Path(out).stem + ".ipynb") if out else nb_path
        if target != nb_path: nb_path.replace(target)
        order.append((nb_path.name != "index.ipynb", nb_path.name, target.name))
        pages[nb_path.stem] = pages[target.stem] = target.stem
    for _, _, name in order:
        f = cache / name
        nb = json.loads(f.read_text())
        _drop_output_file(nb)
        for c in nb["cells"]:
            if c["cell_type"] == "markdown":
                c["source"] = rewrite_links("".join(c["source"]), pages)
            for o in c.get("outputs", []):
                for mime in ("text/markdown", "text/html"):
                    if mime in o.get("data", {}): o["data"][mime] = rewrite_links("".join(o["data"][mime]), pages)
        f.write_text(json.dumps(nb, indent=1, ensure_ascii=False))
    names = [t for _, _, t in sorted(order)]
    cfg = yaml.safe_load((ROOT / "_quarto.yml").read_text())
    cfg.setdefault("website", {}).setdefault("sidebar", {})["contents"] = names
    if shutil.which("quarto"):  # Quarto's default is MathJax from a CDN; KaTeX is localised below (smalldocs uses it always)
        cfg.setdefault("format", {}).setdefault("html", {})["html-math-method"] = "katex"
    (cache / "_quarto.yml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return names


def slim_plotly(site: Path) -> int:
    "Load plotly.js once per page from the site (offline), dropping inline copies; returns pages with figures."
    import plotly
    src = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    n = 0
    for page in site.rglob("*.html"):
        html = page.read_text()
        html = INLINE_PLOTLY.sub("", html)
        if "Plotly.newPlot" in html or "Plotly.react" in html:
            rel = "../" * (len(page.relative_to(site).parts) - 1)
            tag = f'<script src="{rel}{PLOTLY_LIB}" charset="utf-8"></script>'
            if tag not in html: html = html.replace("</head>", f"{tag}\n</head>", 1)
            n += 1
        page.write_text(html)
    if n:
        (site / PLOTLY_LIB).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, site / PLOTLY_LIB)
    return n


def katex_dist() -> Path:
    "KaTeX's `dist/` folder: the npm tarball is fetched once into the cache and checked against its pinned sha512."
    tgz = CACHE / f"katex-{KATEX_VERSION}.tgz"
    dist = CACHE / f"katex-{KATEX_VERSION}" / "dist"
    if dist.is_dir() and tgz.is_file(): return dist
    if not tgz.is_file():
        try: data = urllib.request.urlopen(KATEX_URL, timeout=60).read()
        except OSError as e:
            raise SystemExit(f"KaTeX {KATEX_VERSION}: cannot download {KATEX_URL} ({e}); fetch it once with network access "
                             f"(or `npm pack katex@{KATEX_VERSION}`) and put it at {tgz}")
    else: data = tgz.read_bytes()
    got = base64.b64encode(hashlib.sha512(data).digest()).decode()
    if got != KATEX_SHA512:
        tgz.unlink(missing_ok=True)
        raise SystemExit(f"KaTeX {KATEX_VERSION}: sha512 of {KATEX_URL} is {got}, expected {KATEX_SHA512}")
    CACHE.mkdir(parents=True, exist_ok=True)
    tgz.write_bytes(data)
    tmp = dist.parent.with_suffix(".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(fileobj=io.BytesIO(data)) as t:                     # npm tarballs hold one folder, `package/`
        members = [m for m in t.getmembers() if m.isfile() and m.name.startswith("package/dist/")]
        for m in members:
            m.name = m.name.removeprefix("package/")
        t.extractall(tmp, members=members, filter="data")
    shutil.rmtree(dist.parent, ignore_errors=True)
    tmp.replace(dist.parent)
    return dist


ANCHOR_LINK = re.compile(r'(?P<pre>href=")(?P<page>[\w.-]+\.html)?#(?P<frag>[^"]+)"')


def _method_anchors(site: Path) -> int:
    "Point API links to a method with no card of its own (`config.html#modelconfig.with_vocab`) at its class's card."
    ids = {p.name: set(re.findall(r'\bid="([^"]+)"', p.read_text())) for p in site.glob("*.html")}
    n = 0
    for page in site.glob("*.html"):
        def sub(m):
            nonlocal n
            have, frag = ids.get(m["page"] or page.name), m["frag"]
            if have is None or frag in have: return m[0]
            while "." in frag and frag not in have: frag = frag.rsplit(".", 1)[0]
            if frag not in have: return m[0]
            n += 1
            return f'{m["pre"]}{m["page"] or ""}#{frag}"'
        html = page.read_text()
        new = ANCHOR_LINK.sub(sub, html)
        if new != html: page.write_text(new)
    return n


def localize(site: Path) -> dict[str, int]:
    "Make every page work offline: KaTeX from the site's libs, no remote CSS imports, links to the published site relative."
    site_url = (yaml.safe_load((ROOT / "_quarto.yml").read_text()).get("website", {}).get("site-url") or "").rstrip("/")
    n = dict(math=0, links=0, imports=0)
    for page in site.rglob("*.html"):
        html = page.read_text()
        rel = "../" * (len(page.relative_to(site).parts) - 1)
        html, k = KATEX_CDN.subn(f"{rel}{KATEX_LIB}/", html)
        n["math"] += bool(k)
        if site_url:
            html, k = re.subn(rf"(href=[\"']){re.escape(site_url)}/", rf"\g<1>{rel}", html)
            n["links"] += k
        page.write_text(html)
    n["anchors"] = _method_anchors(site)
    if n["math"]:
        dist = katex_dist()
        shutil.copytree(dist, site / KATEX_LIB, dirs_exist_ok=True,
                        ignore=lambda d, names: [x for x in names if x.endswith((".mjs", ".js", ".css")) and ".min." not in x])
    for css in (site / "site_libs").rglob("*.css"):
        # Bootswatch themes @import Google Fonts; without it the theme's own fallback font stack applies.
        text, k = REMOTE_IMPORT.subn("", css.read_text())
        if k: css.write_text(text); n["imports"] += k
    return n


def site():
    "Build `_docs/`."
    cache = Path(process())
    pages = stage(cache)
    out = ROOT / "_docs"
    if shutil.which("quarto"):
        subprocess.run(["quarto", "render", str(cache), "--no-execute"], check=True)
    else:
        subprocess.run([sys.executable, "-m", "smalldocs.cli", "render", str(cache)], check=True)
    built = cache / "_docs"
    if out.exists(): shutil.rmtree(out)
    shutil.move(str(built), out)
    n = slim_plotly(out)
    loc = localize(out)
    print(f"site: {len(pages)} pages in {out.relative_to(ROOT)}/ ({n} with plotly figures, {loc['math']} with KaTeX "
          f"from {KATEX_LIB}, {loc['links']} links made relative, {loc['anchors']} method links to their class, {loc['imports']} remote CSS imports dropped)")


def _gfm_cell(cell):
    src = "".join(cell["source"])
    if cell["cell_type"] == "markdown":
        return [src] if "AUTOGENERATED" not in src else []
    if cell["cell_type"] != "code": return []
    opts = dict(re.findall(r"^#\|\s*([\w-]+):\s*(.*)$", src, re.M))
    code = "\n".join(l for l in src.splitlines() if not l.startswith("#|")).strip()
    parts = [] if opts.get("echo") == "false" or not code else [f"```python\n{code}\n```"]
    for o in cell.get("outputs", []):
        if o.get("output_type") == "stream":
            parts.append("```\n" + "".join(o["text"]).rstrip() + "\n```")
            continue
        d = o.get("data", {})
        html = "".join(d.get("text/html", ""))
        if "text/markdown" in d: parts.append("".join(d["text/markdown"]))
        elif "Plotly" in html: parts.append("*(interactive figure: see the documentation site)*")
        elif "<table" in html: parts.append(html)
        elif "text/plain" in d: parts.append("```\n" + "".join(d["text/plain"]).rstrip() + "\n```")
    return parts


def readme():
    "Write README.md from `nbs/index.ipynb`."
    if shutil.which("quarto"):
        subprocess.run(["nbdev-readme"], check=True, cwd=ROOT); return
    cache = Path(process(file_glob="index.ipynb"))
    nb = json.loads((cache / "index.ipynb").read_text())
    fm = _front(nb)
    body = [f"# {fm.get('title', 'minibert_lab')}", "",
            "<!-- WARNING: THIS FILE WAS AUTOGENERATED FROM nbs/index.ipynb! DO NOT EDIT! -->", ""]
    if fm.get("description"): body += [f"> {fm['description']}", ""]
    for c in nb["cells"][1:]:
        for p in _gfm_cell(c): body += [p.rstrip(), ""]
    (ROOT / "README.md").write_text("\n".join(body).rstrip() + "\n")
    print("README.md written from nbs/index.ipynb")


if __name__ == "__main__":
    {"site": site, "readme": readme}[sys.argv[1] if len(sys.argv) > 1 else "site"]()
