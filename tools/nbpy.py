"""Round-trip notebooks through a percent-format text view, for editing notebooks with a text editor.

    python tools/nbpy.py to-py  nbs/10_kernels.ipynb   # writes nbs/10_kernels.pct.py (git-ignored)
    python tools/nbpy.py to-nb  nbs/10_kernels.pct.py  # writes nbs/10_kernels.ipynb (outputs of unchanged code cells kept)

Cells are separated by lines `# %%` (code) and `# %% [markdown]` (markdown; each line prefixed by `# `).
"""
import hashlib, json, sys, re
from pathlib import Path

def _md_lines(src):
    return [("# " + l) if l else "#" for l in src.split("\n")]

def to_py(nb_path):
    nb = json.loads(Path(nb_path).read_text())
    out = []
    for c in nb["cells"]:
        src = "".join(c["source"])
        if c["cell_type"] == "markdown":
            out.append("# %% [markdown]\n" + "\n".join(_md_lines(src)))
        else:
            out.append("# %%\n" + src)
    p = Path(str(nb_path).replace(".ipynb", ".pct.py"))
    p.write_text("\n\n".join(out) + "\n")
    return p

def _split(text):
    cells, cur, kind = [], None, None
    for line in text.split("\n"):
        m = re.match(r"^# %%( \[markdown\])?\s*$", line)
        if m:
            if cur is not None: cells.append((kind, cur))
            kind, cur = ("markdown" if m.group(1) else "code"), []
        elif cur is not None:
            cur.append(line)
    if cur is not None: cells.append((kind, cur))
    res = []
    for kind, lines in cells:
        while lines and not lines[-1].strip(): lines.pop()
        if kind == "markdown":
            lines = [l[2:] if l.startswith("# ") else (l[1:] if l.startswith("#") else l) for l in lines]
        res.append((kind, "\n".join(lines)))
    return res

def to_nb(py_path):
    py_path = Path(py_path)
    nb_path = Path(str(py_path).replace(".pct.py", ".ipynb"))
    old, ids = {}, {}
    meta = {"kernelspec": {"display_name": "python3", "language": "python", "name": "python3"}}
    if nb_path.exists():
        onb = json.loads(nb_path.read_text()); meta = onb.get("metadata", meta)
        for c in onb["cells"]:
            if c["cell_type"] == "code": old["".join(c["source"])] = c.get("outputs", [])
            if "id" in c: ids.setdefault("".join(c["source"]), c["id"])
    cells, used = [], set()
    for i, (kind, src) in enumerate(_split(py_path.read_text())):
        cid = ids.get(src)
        if cid is None or cid in used: cid = hashlib.sha1(f"{i}:{src}".encode()).hexdigest()[:8]
        used.add(cid)
        lines = src.split("\n")
        source = [l + "\n" for l in lines[:-1]] + [lines[-1]] if src else []
        if kind == "markdown":
            cells.append({"cell_type": "markdown", "id": cid, "metadata": {}, "source": source})
        else:
            cells.append({"cell_type": "code", "execution_count": None, "id": cid, "metadata": {},
                          "outputs": old.get(src, []), "source": source})
    nb = {"cells": cells, "metadata": meta, "nbformat": 4, "nbformat_minor": 5}
    nb_path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    return nb_path

if __name__ == "__main__":
    cmd, *paths = sys.argv[1:]
    for p in paths: print((to_py if cmd == "to-py" else to_nb)(p))
