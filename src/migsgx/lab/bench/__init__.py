"""Benchmarks that print JSON; they compare within one run because the machines are noisy."""
