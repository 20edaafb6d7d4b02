import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("GROUPGEN_QUIET", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

torch.set_num_threads(1)
