"""Moved to ``pipeline.compare`` (the comparison orchestrates every stage, so it sits above them).
``python -m eval.compare`` still runs it (``__main__.py`` forwards); importing this package imports nothing."""
