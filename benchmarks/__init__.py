"""Tools that measure vizapp from outside the library: run them from the repository root with ``python -m``."""
