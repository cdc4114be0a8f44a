"""Benchmarks: each ctxengine operation beside the raw driver doing the same job."""
