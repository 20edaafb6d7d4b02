"""The CPU engine sits behind one door (``ar_model.cpu.dispatch``): off the CPU nothing of it is
imported, built or called, and the model files reach it only through that module."""
import subprocess
import sys

from _env import REPO, child_env

# A whole training and decoding step on the meta device (what a GPU run does, minus the GPU): the
# model, its loss, the KV-cache decode and the sampler's per-group top-k filter.
OFF_CPU_RUN = r"""
import sys, torch
from ar_model import GPT, gpt_config
from groupgen.layout import TokenLayout
from sampling.logits import GroupSettings, filter_logits
lay = TokenLayout("grid", 4, (7, 5), 2, 2)
m = GPT(gpt_config("micro", dim=32, n_head=2, n_layer=1, dropout=0.1), lay, 3).to("meta")
m.check_inputs = False   # value checks read tensors back, which meta tensors cannot
with torch.device("meta"):
    codes = torch.zeros(2, 4, 2, dtype=torch.long); labels = torch.zeros(2, dtype=torch.long)
    loss, _ = m.loss(codes, labels)
    loss.backward()
    m.eval()
    with torch.no_grad():
        m.init_cache(2)
        h = m.prefill(labels)
        h = m.decode(codes[:, 0], 0)
        filter_logits(torch.zeros(2, 7, device="meta"), GroupSettings(top_k=3))
    m.release_packed()
engine = sorted(k for k in sys.modules if (k.startswith("ar_model.cpu") or k.startswith("groupgen_cpu_kernels"))
                and k not in ("ar_model.cpu", "ar_model.cpu.dispatch"))
print("ENGINE", engine)
"""


def test_an_off_cpu_run_never_imports_the_cpu_engine():
    out = subprocess.run([sys.executable, "-c", OFF_CPU_RUN], env=child_env(), cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ENGINE []" in out.stdout, out.stdout


def test_the_model_files_import_only_the_dispatch_module():
    for f in ("ar_model/layers.py", "ar_model/loss.py", "ar_model/model.py", "ar_model/heads.py",
              "sampling/logits.py", "sampling/sample.py", "ar_model/train.py"):
        text = (REPO / f).read_text()
        assert "cpu_kernels" not in text and "cpu_train_ops" not in text, f
        for line in text.splitlines():
            if line.startswith(("from ar_model.cpu", "import ar_model.cpu")):
                assert line == "from ar_model.cpu import dispatch", (f, line)
