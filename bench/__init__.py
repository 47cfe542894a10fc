"""Benchmarks (make bench*): scenarios interleaved in one run, reported as ratios."""
