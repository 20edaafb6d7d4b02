"""Evaluation: generation quality (FID/IS/precision-recall), reconstruction, token-layout statistics.

Modules (import them directly; this file stays light so ``python -m eval.x`` starts fast):

``eval.fidelity``       feature extractors, FID/IS/PR from features (torch-fidelity's own formulas),
                        sample ``.npz`` validation, cached reference statistics
``eval.domain``         a small Fashion-MNIST (or digits) classifier used as a *domain* feature extractor
``eval.generation``     CLI: ``python -m eval.generation --samples S.npz --ref REF``
``eval.reconstruction`` PSNR / SSIM / LPIPS / rFID / codebook usage (+ CLI for a tokenizer)
``eval.layout_stats``   CLI: entropy, usage and SentencePiece compressibility of a token store

Which numbers are comparable to papers
--------------------------------------
* ``extractor=inception`` uses torch-fidelity's ``inception-v3-compat`` (the TF-Inception port; its
  ``2048`` pool features and ``logits_unbiased`` match the TF evaluator to about 1e-3 FID). gFID/IS
  against ADM's ``VIRTUAL_imagenet256_labeled.npz`` with 50k samples of uniformly random classes
  (``configs/sampling/fid50k.yaml``) is the protocol of LlamaGen/MGVQ tables; fewer samples bias FID
  upwards (FID-5k >> FID-50k), so only compare numbers with the same N and the same reference.
* ``extractor=domain`` (a classifier trained on ``domain.dataset``, which must be a dataset reference's
  own dataset) gives *domain FID / domain IS* and class-conditional accuracy. They are internal
  yardsticks for comparing our own runs (tokenizer layouts, CFG scales) and are not comparable to any
  published FID. The floor to read them against is the train-vs-test value:
  ``python -m eval.domain baseline``.
"""
