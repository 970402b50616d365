"""Benchmarks of the job side that need the engine (`pipeline bench pipeline`)."""
