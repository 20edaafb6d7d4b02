"""The official QG-VAE notebook (DaiDaiLoh/QG-VAE ``QG-VAE.ipynb``), run as released, for
``bench/qgvae_official.py``: read from a file, a folder or a bare git directory; its model cells imported as
a module written under a temporary folder; its training cell executed with two edits (the epoch count, and
the reset's CPU device); its training state checkpointed between batches; its model behind the tokenizer
interface ``eval.reconstruction`` scores. Nothing of the notebook is copied into the repository."""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from groupgen.data import DataConfig, build_dataset
from groupgen.layout import TokenLayout
from groupgen.loader import image_batches
from groupgen.runs import seed_everything
from tokenizer.train import BatchOrder

NOTEBOOK = "QG-VAE.ipynb"

# The official recipe as the notebook states it (cell numbers: code and markdown cells counted from 0
# in QG-VAE.ipynb at f285b2c). The preset fmnist_qgvae_official must agree (tests/test_qgvae_official.py).
OFFICIAL_RECIPE = {
    "tokens": 64,              # Settings: VQVAE_C = 8*8
    "codebook_size": 512,      # Settings: VQVAE_K
    "embed_dim": 64,           # Settings: VQVAE_D
    "heads": 8,                # Settings: NUM_HEADS
    "down": 0,                 # Settings: DS_SPEED_FACTOR = 0 -> token features = the full 32x32 map
    "ordered_dropout_p": 0.0,  # Settings: USE_DROPOUT = False
    "reset_every": 100,        # Settings: NUM_TRAIN_BATCHES_UNTIL_RESET
    "reset_rule": "once",      # training cell: each highest-|grad| live code is split at most once a round
    "reset_noise": 1e-4,       # training cell: (rand(D) * 2 - 1) * 0.0001
    "init_scale": 0.5,         # BaseAE: codebook (rand * 2 - 1) * 0.5
    "beta": 1.0,               # training cell: loss_codebook * 0.25 + loss_commitment
    "codebook_weight": 0.25,
    "lr": 2e-4,                # training cell: AdamW(lr=0.0002, weight_decay=0.01), default betas
    "betas": (0.9, 0.999),
    "weight_decay": 0.01,
    "clip": 0.0,               # no clip_grad_norm_ in the training cell
    "batch_size": 32,          # DataLoader(batch_size=32)
    "revive_every": 0,         # no dead-code revival in the release
}

# code cells that make the model: found by what they define, so a renumbered notebook still works
_MODEL_MARKERS = ("import torch", "def mkdir(", "class Settings", "def positional_encoding(",
                  "class SmallResidualBlock(", "class ConvEncoder(", "class BaseAE(")
_TRAIN_MARKER = "optimiser = torch.optim.AdamW"
_EPOCH_LOOP = "for epoch in range(0, 100):"
_GET_DEVICE = ".get_device()"


# ----------------------------------------------------------------------------- the official code

def read_notebook(path: str | Path) -> dict:
    """The notebook's JSON from a .ipynb file, a folder holding it, or a bare git directory."""
    p = Path(path)
    if p.is_file():
        return json.loads(p.read_text())
    if (p / NOTEBOOK).is_file():
        return json.loads((p / NOTEBOOK).read_text())
    if (p / "HEAD").is_file() and (p / "objects").is_dir():   # bare git dir (e.g. a mirror)
        out = subprocess.run(["git", "--git-dir", str(p), "show", f"HEAD:{NOTEBOOK}"], capture_output=True,
                             text=True, check=True)
        return json.loads(out.stdout)
    raise SystemExit(f"--official {path}: not {NOTEBOOK}, a folder holding it, or a git directory")


def notebook_revision(path: str | Path) -> str:
    p = Path(path)
    for args in (["git", "--git-dir", str(p), "rev-parse", "HEAD"], ["git", "-C", str(p), "rev-parse", "HEAD"]):
        r = subprocess.run(args, capture_output=True, text=True)
        if r.returncode == 0:
            return r.stdout.strip()
    return "unknown"


def split_cells(nb: dict) -> tuple[str, str]:
    """(model source, training-cell source) out of the notebook's code cells."""
    code = ["".join(c["source"]) if isinstance(c["source"], list) else c["source"]
            for c in nb["cells"] if c.get("cell_type") == "code"]
    model = []
    for marker in _MODEL_MARKERS:
        hits = [s for s in code if marker in s and _TRAIN_MARKER not in s]
        if not hits:
            raise SystemExit(f"official notebook: no code cell with {marker!r}")
        if hits[0] not in model:
            model.append(hits[0])
    trains = [s for s in code if _TRAIN_MARKER in s]
    if len(trains) != 1:
        raise SystemExit(f"official notebook: expected one training cell ({_TRAIN_MARKER!r}), found {len(trains)}")
    return "\n\n".join(model), trains[0]


def patch_training_cell(src: str) -> str:
    """The release's training cell with two edits: its 100-epoch loop runs ``EPOCHS`` (given at exec
    time), and the reset's ``.to(t.get_device())`` becomes ``.to(t.device)``: ``get_device()`` is -1
    for a CPU tensor and ``.to(-1)`` raises, so the released reset only runs on a GPU (on one, both
    name the same device)."""
    if src.count(_EPOCH_LOOP) != 1:
        raise SystemExit(f"official training cell: expected one {_EPOCH_LOOP!r}")
    if src.count(_GET_DEVICE) != 2:
        raise SystemExit(f"official training cell: expected two {_GET_DEVICE!r} in the reset")
    return src.replace(_EPOCH_LOOP, "for epoch in range(0, EPOCHS):").replace(_GET_DEVICE, ".device")


def import_official(nb: dict, tmp: Path, image_size: int, channels: int):
    """Import the notebook's model cells as a module (written under ``tmp``); set its input size."""
    model_src, _ = split_cells(nb)
    path = tmp / "qgvae_official_notebook.py"
    path.write_text("# extracted at run time from DaiDaiLoh/QG-VAE " + NOTEBOOK + "\n" + model_src + "\n")
    spec = importlib.util.spec_from_file_location("qgvae_official_notebook", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    s = mod.SETTINGS
    s.INPUT_C, s.INPUT_W, s.INPUT_H = channels, image_size, image_size   # the notebook reads these off a batch
    s.DATASET, s.RUN_NAME = "FMNIST", "FMNIST"    # only names output folders (and "IMAGENET" chunking)
    return mod


class _Loader:
    """What the training cell iterates: (images on [0, 1], labels) batches; stamps each request.

    The cell runs at module level, so its state (``ae``, ``optimiser``, ``magnitudes``,
    ``index_count``, ``steps``) are globals of the module: with ``ckpt`` set, the loader restores them
    from a checkpoint when the cell starts its loop, saves them every ``every`` steps (when the next
    batch is asked for, the step before it, reset included, is done), and stops early (after a
    save) once ``stop_at`` (a ``time.time()``) has passed."""

    def __init__(self, ds, order, n: int, seed: int, g: dict | None = None, ckpt: Path | None = None,
                 every: int = 50, stop_at: float = 0.0, key=None):
        self.ds, self.order, self.n, self.seed, self.g = ds, order, n, seed, g
        self.ckpt, self.every, self.stop_at, self.key = ckpt, every, stop_at, key
        self.dataset = range(len(ds))
        self.times, self.done = [], 0

    def __len__(self):
        return self.n

    def _restore(self) -> int:
        if self.ckpt is None or not self.ckpt.exists():
            return 0
        st = torch.load(self.ckpt, weights_only=True)   # tensors, numbers and strings only: nothing unpickled
        if st["key"] != self.key:
            raise SystemExit(f"{self.ckpt}: saved under other settings; delete it or use --fresh")
        g = self.g
        g["ae"].load_state_dict(st["ae"])
        g["optimiser"].load_state_dict(st["optimiser"])
        g["magnitudes"].copy_(st["magnitudes"])
        g["index_count"].copy_(st["index_count"])
        g["steps"] = st["steps"]
        torch.set_rng_state(st["rng"])
        self.times = list(st["times"])
        print(f"resumed the official run from {self.ckpt} at step {st['steps']}", file=sys.stderr, flush=True)
        return st["steps"]

    def _save(self, done: int) -> None:
        g = self.g
        st = {"key": self.key, "ae": g["ae"].state_dict(), "optimiser": g["optimiser"].state_dict(),
              "magnitudes": g["magnitudes"], "index_count": g["index_count"], "steps": done,
              "rng": torch.get_rng_state(), "times": self.times}
        tmp = self.ckpt.with_suffix(".tmp")
        torch.save(st, tmp)
        os.replace(tmp, self.ckpt)

    def __iter__(self):
        first = self._restore() if self.g is not None else 0
        batches = image_batches(self.ds, [self.order(i) for i in range(first, self.n)], workers=0, first=first,
                                seed=self.seed * 65_537)
        self.done, last = first, None
        for x, y in batches:
            now = time.perf_counter()
            if last is not None:
                self.times.append(now - last)
                self.done += 1
                if self.ckpt is not None and self.done % self.every == 0:
                    self._save(self.done)
                    if self.stop_at and time.time() > self.stop_at:
                        return
                now = time.perf_counter()   # the save is not part of a step
            last = now
            yield (x + 1) / 2, y
        if last is not None:
            self.times.append(time.perf_counter() - last)
            self.done += 1


class OfficialTokenizer:
    """The official ``BaseAE`` behind the interface ``evaluate_tokenizer`` scores: images on [-1, 1]
    in and out, codes ``[B, 64, 1]`` (one per token's codebook)."""

    def __init__(self, ae, image_size: int, channels: int):
        s = ae.SETTINGS
        self.ae, self.size = ae, image_size
        self.C, self.D, self.K = s.VQVAE_C, s.VQVAE_D, s.VQVAE_K
        self.layout = TokenLayout(kind="seq", L=self.C, K=(self.K,), per_position_codebook=True,
                                  image_size=image_size, channels=channels)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        _, _, _, idx = self.ae.encode((x + 1) / 2)          # [B, C, 1]
        return idx.reshape(x.shape[0], self.C, 1).long()

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        B = codes.shape[0]
        q = self.ae.codebook[torch.arange(self.C)[None, :], codes[..., 0]]    # [B, C, D]
        z = q.transpose(1, 2)[..., None] + self.ae.offset[None, :, :, None]   # as BaseAE.encode returns it
        return self.ae.decode(z.reshape(B, self.D, -1), self.size, self.size) * 2 - 1


def data_config() -> DataConfig:
    return DataConfig(name="fmnist", image_size=32, channels=1)


def train_official(nb: dict, seed: int, a, out: Path, key) -> tuple[OfficialTokenizer, list[float], int]:
    """Run the notebook's training cell for ``a.steps`` batches (resuming from ``out/official_ckpt.pt``);
    returns the model, the step times and the steps done (fewer when ``--stop-after`` cut it)."""
    out = out.resolve()   # the cell runs in a temporary working directory
    dc = data_config()
    ds = build_dataset(dc, "train", train=True)
    tmp = Path(tempfile.mkdtemp(prefix="qgvae_official_"))
    mod = import_official(nb, tmp, dc.image_size, dc.channels)
    seed_everything(seed)
    order = BatchOrder(len(ds), a.batch, 0, 1, seed)      # tokenizer.train's order for this seed
    out.mkdir(parents=True, exist_ok=True)
    loader = _Loader(ds, order, a.steps, seed, mod.__dict__, out / "official_ckpt.pt", a.official_ckpt_every,
                     a.stop_at, key)
    test = build_dataset(dc, "test")
    x0 = test.batch(range(a.batch))[0]
    mod.SETTINGS.TRAIN_BATCHES, mod.SETTINGS.TEST_BATCHES = a.steps, 1
    mod.trainloader = loader
    mod.testloader = _Loader(_Fixed(x0), lambda i: range(len(x0)), 1, 0)   # the cell's test pass: one batch
    mod.imshow = mod.save_image = lambda *_, **__: None   # no image files
    mod.EPOCHS = 1
    _, train_src = split_cells(nb)
    cwd = os.getcwd()
    try:
        os.chdir(tmp)   # the cell writes outputs/ relative to the working directory
        os.makedirs(f"outputs/{mod.SETTINGS.RUN_NAME}", exist_ok=True)
        with open(out / "official_train.log", "a") as f, contextlib.redirect_stdout(f):
            exec(compile(patch_training_cell(train_src), f"{NOTEBOOK}:training-cell", "exec"), mod.__dict__)
    finally:
        os.chdir(cwd)
    return OfficialTokenizer(mod.ae, dc.image_size, dc.channels), loader.times, loader.done


class _Fixed:
    """A one-batch in-memory dataset (images on [-1, 1]) for the training cell's test pass."""

    def __init__(self, x):
        self.x = x

    def __len__(self):
        return len(self.x)

    def batch(self, idx):
        idx = list(idx)
        return self.x[idx], torch.zeros(len(idx), dtype=torch.long)


def check_adapter(tok: OfficialTokenizer, x: torch.Tensor) -> float:
    """Max |decode_codes(encode(x)) - BaseAE.forward(x)| (on [-1, 1]): the adapter adds nothing."""
    with torch.no_grad():
        ref = tok.ae((x + 1) / 2)[0] * 2 - 1
        return float((tok.decode_codes(tok.encode(x)) - ref).abs().max())
