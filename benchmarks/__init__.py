"""Benchmarks of megatron-rectify (run from the repository root; not part of the wheel)."""
