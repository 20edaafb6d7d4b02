"""``python -m tokenizer.evaluate --ckpt RUN_OR_CKPT [key=value ...]``: the stage-1 name of
``python -m eval.reconstruction`` (PSNR two ways, SSIM, LPIPS when its weights are offline, rFID,
codebook usage / perplexity per group; ``eval.reconstruction.ReconEvalConfig`` keys).

Tokenizer evaluation has one owner, ``eval.reconstruction``: it needs the feature extractors of
``eval`` and loads the tokenizer, so ``eval`` imports ``tokenizer`` and never the reverse. This file
keeps the command users type working; importing it imports nothing.
"""
if __name__ == "__main__":
    import runpy

    runpy.run_module("eval.reconstruction", run_name="__main__", alter_sys=True)
