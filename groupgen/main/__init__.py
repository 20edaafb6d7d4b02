"""Moved to ``pipeline.main``: the main job orchestrates the stages, so it sits above them, and
``groupgen`` keeps only the contracts every stage imports. ``python -m groupgen.main`` still runs the
job (``__main__.py`` forwards); importing this package imports nothing from the stages."""
