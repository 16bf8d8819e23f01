"""Benchmarks: each `benchmarks/<name>.py` with a `main(argv)` writes `benchmarks/results/<name>.json`.

`python -m benchmarks.run_all` (`make bench`) runs them all. Every figure is a ratio measured
inside one run (repetitions interleaved, medians compared), so a machine shared with other
work shifts both sides of a ratio alike; absolute times are recorded but never asserted.
"""
