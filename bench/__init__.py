"""Benchmarks: commands that measure the system (see README.md); not part of the test suite."""
