"""``python -m groupgen.main ...`` = ``python -m pipeline.main ...`` (the command users already type)."""
import runpy

runpy.run_module("pipeline.main", run_name="__main__", alter_sys=True)
