"""Benchmarks: the harness (`minibert_lab.bench.harness`), one module per table (`attention`, `approx`, `models`,
`quality`) and the `minibert-lab bench` command (`minibert_lab.bench.cli`).

Hand-written package init, deliberately empty: importing the harness does not import the benchmark modules."""
