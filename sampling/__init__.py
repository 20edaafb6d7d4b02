"""Sampling from a trained AR prior: CFG, per-group temperature / top-k / top-p, sharded + resumable.

The names from ``sample.py`` load lazily, so ``python -m sampling.sample`` does not import that
module twice (runpy warns when a package pre-imports the module it is asked to run). The function
``sample`` is not re-exported: ``sampling.sample`` is the module; use
``from sampling.sample import sample``.
"""
import importlib

from .classes import ClassError, builtin_names, class_names_for, resolve_classes, sample_labels
from .logits import GroupPicker, GroupSettings, filter_logits, sample_from_logits, top_p_mask

_FROM_SAMPLE = ("Models", "Plan", "SamplingConfig", "SamplingError", "generate_codes", "load_models",
                "make_plan", "merge_shards", "run_shard")

__all__ = ["ClassError", "builtin_names", "class_names_for", "resolve_classes", "sample_labels", "GroupPicker",
           "GroupSettings", "filter_logits", "sample_from_logits", "top_p_mask", *_FROM_SAMPLE]


def __getattr__(name):
    if name in _FROM_SAMPLE:
        return getattr(importlib.import_module(".sample", __name__), name)
    raise AttributeError(f"module 'sampling' has no attribute {name!r}")
