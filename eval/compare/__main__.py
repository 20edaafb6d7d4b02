"""``python -m eval.compare ...`` = ``python -m pipeline.compare ...`` (the command users already type)."""
import runpy

runpy.run_module("pipeline.compare", run_name="__main__", alter_sys=True)
