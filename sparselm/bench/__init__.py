"""Benchmarks that measure what sparsity buys: generation speed, memory, bandwidth, energy."""
