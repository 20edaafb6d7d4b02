"""groupgen's CPU engine: hand-written AVX-512 / AMX kernels (``csrc/``, built once by ``kernels``),
their routing by CPU kind, and the CPU forms of the model's layers (``nn_ops``, ``train_ops``).

The model reaches it only through ``dispatch`` and only with CPU tensors. This file imports nothing,
so importing ``dispatch`` pulls in nothing else of the engine.
"""
