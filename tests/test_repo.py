"""Repository conventions: nbdev 3 settings, the two commands, CI, generated files."""
import subprocess, sys, tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_nbdev3_settings_in_pyproject():
    assert not (ROOT / "settings.ini").exists(), "nbdev 3 refuses settings.ini"
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    nb = cfg["tool"]["nbdev"]
    assert nb["lib_path"] == "minibert_lab" and nb["nbs_path"] == "nbs"
    assert set(nb["tst_flags"].split()) == {"notest", "slow", "cuda"}
    assert cfg["project"]["scripts"]["minibert-lab"] == "minibert_lab.cli:main"
    deps = cfg["project"]["dependencies"]
    assert all(">=" in d for d in deps), [d for d in deps if ">=" not in d]


def test_readme_opens_with_the_two_commands():
    text = (ROOT / "README.md").read_text()
    first_block = text.split("```sh", 1)[1].split("```", 1)[0]
    assert first_block.strip().splitlines()[0].startswith("make lab")
    assert first_block.strip().splitlines()[1].startswith("make test")
    assert "[tool.nbdev]" in text and "settings.ini" in text


def test_ci_calls_the_readme_test_command():
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    assert "make check-sync" in (ROOT / ".ci" / "run").read_text()


def test_cli_help_and_config():
    exe = Path(sys.executable).with_name("minibert-lab")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-c", "import sys; from minibert_lab.cli import main; sys.exit(main())"]
    res = subprocess.run([*cmd, "--help"], capture_output=True, text=True, check=True)
    for sub in ("lab", "pretrain", "bench", "viz", "config"): assert sub in res.stdout
    res = subprocess.run([*cmd, "config", "--preset", "neobert-tiny", "--model.attention.kind", "slay"],
                         capture_output=True, text=True, check=True)
    assert '"kind": "slay"' in res.stdout and '"family": "neobert"' in res.stdout
    res = subprocess.run([*cmd, "config", "--model.heads", "5"], capture_output=True, text=True)
    assert res.returncode == 2 and "heads" in res.stderr


def test_readme_states_durations_and_own_data():
    text = (ROOT / "README.md").read_text()
    assert "`make lab` takes about" in text and "`make test` about" in text
    for s in ("--data-files", "--validation-file", "data.validation_files", "tokenizer/", "Hugging Face BERT folder"):
        assert s in text, s


def test_make_lab_keeps_earlier_runs():
    "`make lab` works twice in a row and never deletes a previous lab: no fixed --out, no --overwrite."
    recipe = (ROOT / "Makefile").read_text().split("\nlab:", 1)[1].split("\n\n", 1)[0]
    assert "minibert-lab lab" in recipe and "--out" not in recipe.split("#")[0] and "--overwrite" not in recipe
