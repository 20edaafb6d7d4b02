"""Stage 2: the LlamaGen-style class-conditional GPT with per-group heads (see model.py)."""
from .model import GPT, GPT_PRESETS, GPTConfig, ar_meta, gpt_config, load_ar, param_groups

__all__ = ["GPT", "GPTConfig", "GPT_PRESETS", "gpt_config", "load_ar", "ar_meta", "param_groups"]
