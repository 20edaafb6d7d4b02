import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("GROUPGEN_QUIET", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

torch.set_num_threads(1)

# The reliability harness's fixtures, registered here so that both reliability modules share one
# session-scoped subprocess campaign.
pytest_plugins = ["_campaign"]
