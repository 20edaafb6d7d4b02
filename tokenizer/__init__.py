"""Stage 1: image tokenizers (VQGAN / MGVQ / PQ conv nets, QG-VAE U-Nets), their losses, trainer,
evaluator and the dataset -> token store encoder. Public entry points live in ``tokenizer.model``."""
