"""Tools that measure vizapp from outside the library (``python -m benchmarks.bench``, the load test)."""
