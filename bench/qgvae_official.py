"""QG-VAE against its official code (issue 23, item 5): one command, one budget, one metric basis.

    git clone https://github.com/DaiDaiLoh/QG-VAE /tmp/QG-VAE      # fetched, never vendored
    OMP_NUM_THREADS=1 .venv/bin/python bench/qgvae_official.py --official /tmp/QG-VAE \
        [--rows official_code,gg_official,gg_best] [--seeds 0,1,2] [--steps 1500] [--threads 1]

``--official`` is the notebook ``QG-VAE.ipynb``, a folder holding it, or a bare git directory of the
repository (its ``HEAD:QG-VAE.ipynb`` is read). Its code cells are taken out with the json module at
run time, written to a module under a temporary folder and imported; nothing of it is copied here.
Rows, each trained for ``--steps`` steps at batch ``--batch`` per seed on groupgen's Fashion-MNIST
32x32 (``groupgen.data``: the same seeded batch order as ``tokenizer.train``):

* ``official_code``: the notebook's ``BaseAE`` trained by the notebook's own training cell (AdamW
  2e-4, its losses, its codebook resets), run as released: one epoch of ``--steps`` batches; images go
  in on [0, 1] like its ``ToTensor`` loader gives them;
* ``gg_official``: groupgen's QG-VAE with that recipe (``configs/tokenizer/fmnist_qgvae_official.yaml``);
* ``gg_best``: groupgen's QG-VAE preset (``configs/tokenizer/fmnist_qgvae.yaml``).

Every row is scored by ``eval.reconstruction.evaluate_tokenizer`` (the official model through
``OfficialTokenizer``, an adapter with ``encode``/``decode_codes``) on ``--eval-images`` test images:
PSNR per image and from the mean MSE on the native 28x28 basis, skimage SSIM, and code usage per
token's codebook. Seconds per step: the median over steps (official: time between the training
cell's batch requests; groupgen: the trainer's ``step_time`` per log window of 10 steps).

Resumable seed by seed: ``OUT/qgvae_official/seeds/<row>/seed<k>.json`` (kept with the results) holds a
finished seed, reused while its settings match (``--fresh`` retrains); ``results.json`` (one object
per row: ``row``, ``seeds``, ``steps``, ``psnr_native_mean``, ``psnr_native_ci95``, ``usage_mean``,
``sec_per_step_median``, ``per_seed``) and ``table.md`` are rebuilt from them under a file lock after
every seed.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import REPO, key_matches, machine_info  # noqa: E402

os.environ.setdefault("GROUPGEN_QUIET", "1")

from bench.tokenizer_ablation import CFG, _fmt, native_cells, results_lock, write_results  # noqa: E402
from eval.study_stats import ci95  # noqa: E402
from eval.reconstruction import ReconEvalConfig, evaluate_tokenizer  # noqa: E402
from groupgen.config import load_config, to_dict  # noqa: E402
from groupgen.data import DataConfig, build_dataset  # noqa: E402
from groupgen.layout import TokenLayout  # noqa: E402
from groupgen.loader import image_batches  # noqa: E402
from groupgen.runs import read_jsonl, seed_everything, set_threads  # noqa: E402
from tokenizer.model import load_tokenizer  # noqa: E402
from tokenizer.train import BatchOrder, TokenizerTrainConfig, train  # noqa: E402

STUDY = "qgvae_official"
# The protocol's seeds (issue 23: three a row). A run given fewer (--seeds 1, to spread seeds over processes)
# adds to this set, never shrinks it: the table says 1/3, not 1/1.
PLANNED_SEEDS = (0, 1, 2)
NOTEBOOK = "QG-VAE.ipynb"
# (id, label, preset or None for the official code, overrides on the preset: a candidate preset runs as a
# row of its own until its seeds say whether it replaces the best one)
ROWS = [
    ("official_code", "official notebook code (DaiDaiLoh/QG-VAE)", None, []),
    ("gg_official", "groupgen, official recipe (fmnist_qgvae_official)", "fmnist_qgvae_official", []),
    ("gg_best", "groupgen, best preset (fmnist_qgvae)", "fmnist_qgvae", []),
    # the growth-ceiling fix: codes re-fit by Lloyd to 16,384 fresh images' features after steps 100-300
    ("gg_refit", "groupgen, best preset + codebook refit at steps 100/200/300", "fmnist_qgvae",
     ["quantizer.refit_steps=[100,200,300]", "quantizer.refit_images=16384", "quantizer.refit_iters=8"]),
    # usage past 95%: equal-mass refits (Sinkhorn) at 100-300 and at step 1400, then the decoder alone adapts to
    # the fixed codes for the last 100 steps (at --steps 1500)
    ("gg_balanced", "groupgen, best preset + equal-mass refits (100/200/300/1400), decoder-only after 1400",
     "fmnist_qgvae", ["quantizer.refit_steps=[100,200,300,1400]", "quantizer.refit_balance=0.01",
                      "quantizer.refit_images=8192", "quantizer.refit_iters=3", "train.decoder_only_after=1400"]),
]

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


# ----------------------------------------------------------------------------- rows and seeds

def eval_config(a) -> ReconEvalConfig:
    return ReconEvalConfig(n=a.eval_images, batch_size=128, lpips=False, extractor="none", device="cpu")


def settings(a) -> dict:
    return {"steps": a.steps, "batch": a.batch, "eval_images": a.eval_images, "threads": a.threads}


def group_overrides(a, seed: int) -> list[str]:
    return [f"train.steps={a.steps}", f"train.batch_size={a.batch}", f"train.seed={seed}", f"train.threads={a.threads}",
            "train.eval_every=0", "train.log_every=10", "train.sample_every=0", "train.ckpt_every=500",
            "train.keep_last=3", "train.device=cpu"]


def score(ev: dict) -> dict:
    return {k: ev[k] for k in ("psnr", "psnr_per_image", "ssim", "psnr_native", "psnr_native_per_image",
                               "ssim_native", "native_basis", "usage_mean", "perplexity_mean", "images")}


def row_config(row, seed: int, a) -> TokenizerTrainConfig:
    """A groupgen row's training config: its preset, its overrides, then the run settings."""
    return load_config(TokenizerTrainConfig, REPO / CFG / f"{row[2]}.yaml", row[3] + group_overrides(a, seed))


def seed_key(row, seed: int, a) -> dict:
    """What a seed's result depends on: the official notebook's revision, or groupgen's resolved config;
    and the run settings."""
    if row[2] is None:
        return {"official": a.official_rev, "settings": settings(a)}
    cfg = row_config(row, seed, a)
    return json.loads(json.dumps({"config": to_dict(cfg), "settings": settings(a)}, default=str))


def record_matches(old, row, seed: int, a) -> bool:
    """Whether a kept record belongs to this run: ``key_matches`` on its key. A collect without
    ``--official`` cannot know the notebook's revision, so there an official record matches on the
    settings alone (results.json lists the revisions it holds)."""
    if row[2] is None and a.official_rev == "unknown":
        return isinstance(old, dict) and "official" in old and old.get("settings") == settings(a)
    return key_matches(old, seed_key(row, seed, a))


def run_seed(row, seed: int, a, work: Path, results: Path, nb: dict | None) -> dict:
    rid, label, preset, _ = row
    out = work / rid / f"seed{seed}"
    kept = results / "seeds" / rid / f"seed{seed}.json"
    key = seed_key(row, seed, a)
    if kept.exists() and not a.fresh and key_matches(json.loads(kept.read_text()).get("key"), key):
        print(f"[{rid} seed {seed}] reusing {kept}", flush=True)
        return json.loads(kept.read_text())
    if a.fresh and out.exists():
        import shutil
        shutil.rmtree(out)
    print(f"[{rid} seed {seed}] training {label} for {a.steps} steps", flush=True)
    w0 = time.perf_counter()
    set_threads(a.threads)
    partial = False
    if preset is None:
        tok, times, steps = train_official(nb, seed, a, out, key)
        partial = steps < a.steps
        wall = time.perf_counter() - w0
        set_threads(a.threads)
        x = build_dataset(data_config(), "test").batch(range(8))[0]
        gap = check_adapter(tok, x)
        if gap > 1e-4:
            raise SystemExit(f"OfficialTokenizer differs from BaseAE.forward by {gap}")
        ev = evaluate_tokenizer(tok, eval_config(a), train_data=to_dict(data_config()))
        extra = {"adapter_max_abs_diff": gap}
        times = times[1:]   # the first step (allocation, warm-up) left out
    else:
        res = train(row_config(row, seed, a), out)
        if res.get("interrupted"):
            raise SystemExit(f"[{rid} seed {seed}] interrupted; rerun to resume")
        wall = time.perf_counter() - w0
        # the trainer's mean step time per 10-step log window; the first window (warm-up) left out
        times = [m["step_time"] for m in read_jsonl(out / "metrics.jsonl")[1:] if "step_time" in m]
        set_threads(a.threads)
        ev = evaluate_tokenizer(load_tokenizer(res["checkpoint"], "cpu"), eval_config(a))
        steps, extra = res["step"], {}
    st = sorted(times) or [float("nan")]
    rec = {"seed": seed, "steps": steps, "sec_per_step_median": st[len(st) // 2], "wall_s": wall,
           **score(ev), **extra, "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "key": key}
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(ev, indent=1, default=str))
    kept.parent.mkdir(parents=True, exist_ok=True)
    if partial:   # cut by --stop-after: scored where it stands, kept apart from finished seeds
        rec["partial"] = True
        kept.with_name(f"partial_seed{seed}.json").write_text(json.dumps(rec, indent=1, default=str))
        print(f"[{rid} seed {seed}] stopped at step {steps} of {a.steps} (--stop-after); rerun to resume", flush=True)
        return None
    kept.with_name(f"partial_seed{seed}.json").unlink(missing_ok=True)
    kept.write_text(json.dumps(rec, indent=1, default=str))
    return rec


def summarize_row(row, recs: list[dict], seeds: list[int], partial: list[dict]) -> dict:
    """Mean and 95% t interval over the finished seeds; ``in_progress``: seeds cut short, scored at
    the step they reached (not in the means)."""
    rid, label, preset, _ = row
    strip = lambda r: {k: v for k, v in r.items() if k != "key"}  # noqa: E731
    if not recs:
        return {"row": rid, "label": label, "preset": f"{CFG}/{preset}.yaml" if preset else None, "seeds": [],
                "seeds_planned": seeds, "partial": True, "steps": [], "in_progress": [strip(r) for r in partial]}
    vals = lambda k: [r[k] for r in recs]  # noqa: E731
    out = {"row": rid, "label": label, "preset": f"{CFG}/{preset}.yaml" if preset else None,
           "seeds": vals("seed"), "seeds_planned": seeds, "partial": len(recs) < len(seeds), "steps": vals("steps"),
           "native_basis": recs[0]["native_basis"]}
    for name, key in (("psnr_native", "psnr_native_per_image"), ("psnr_native_mse", "psnr_native"),
                      ("ssim_native", "ssim_native"), ("psnr_model", "psnr_per_image"), ("usage", "usage_mean")):
        out[f"{name}_mean"] = statistics.fmean(vals(key))
        out[f"{name}_ci95"] = ci95(vals(key))
    out["sec_per_step_median"] = statistics.median(vals("sec_per_step_median"))
    out["per_seed"] = [strip(r) for r in recs]
    out["in_progress"] = [strip(r) for r in partial]
    return out


def collect(a, work: Path, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    with results_lock(work):
        rows, revs, planned = [], set(), sorted(set(PLANNED_SEEDS) | set(a.seeds))
        for row in ROWS:
            recs, partial = [], []
            for p in sorted((out / "seeds" / row[0]).glob("*seed*.json")):
                r = json.loads(p.read_text())
                if record_matches(r.get("key"), row, r["seed"], a):
                    (partial if p.name.startswith("partial_") else recs).append(r)
                    if "official" in r["key"]:
                        revs.add(r["key"]["official"])
            done = {r["seed"] for r in recs}
            partial = [r for r in partial if r["seed"] not in done]
            if recs or partial:
                rows.append(summarize_row(row, sorted(recs, key=lambda r: r["seed"]), planned,
                                          sorted(partial, key=lambda r: r["seed"])))
        summary = {"study": STUDY, "official": {"repo": "DaiDaiLoh/QG-VAE", "notebook": NOTEBOOK,
                                                "revision": sorted(revs) or [a.official_rev]},
                   "protocol": {**settings(a), "seeds": planned}, "machine": machine_info(a.threads), "rows": rows}
        write_results(out, summary, table(rows))
    return summary


def table(rows: list[dict]) -> str:
    lines = ["| row | seeds | steps | PSNR native (per-image) dB | PSNR native (mean MSE) dB | SSIM native "
             "| usage % | s/step (median) |", "|" + "---|" * 8]
    for r in rows:
        for p in r["in_progress"]:
            lines.append(f"| {r['label']}, seed {p['seed']} **partial: step {p['steps']}** | 1 | {p['steps']} "
                         f"| {p['psnr_native_per_image']:.2f} | {p['psnr_native']:.2f} | {p['ssim_native']:.3f} "
                         f"| {100 * p['usage_mean']:.1f} | {p['sec_per_step_median']:.3f} |")
        if not r["seeds"]:
            continue
        part = " **partial**" if r["partial"] else ""
        lines.append(f"| {r['label']} | {len(r['seeds'])}/{len(r['seeds_planned'])}{part} "
                     f"| {'/'.join(str(s) for s in r['steps'])} " + native_cells(r) +
                     f"| {_fmt(r['usage_mean'], r['usage_ci95'], 1, 100.0)} | {r['sec_per_step_median']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--official", default="", help=f"{NOTEBOOK}, a folder with it, or the repo's git dir "
                                                   "(needed for the official_code row)")
    ap.add_argument("--rows", default="", help="row ids, comma-separated (default: all)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--eval-images", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="bench/results", help=f"results go to OUT/{STUDY}/")
    ap.add_argument("--work", default="", help=f"run dirs (default runs/bench/{STUDY})")
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--stop-after", type=float, default=0.0,
                    help="minutes: no new seed after this; the official run checkpoints, stops and is scored "
                         "as partial (a rerun resumes it)")
    ap.add_argument("--collect-only", action="store_true", help="rebuild results.json / table.md from the kept "
                                                                    "seeds, train nothing")
    ap.add_argument("--official-ckpt-every", type=int, default=50, help="official run: steps between checkpoints")
    a = ap.parse_args(argv)
    a.seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    a.stop_at = time.time() + 60 * a.stop_after if a.stop_after > 0 else 0.0
    want = [w.strip() for w in a.rows.split(",") if w.strip()]
    bad = [w for w in want if w not in {r[0] for r in ROWS}]
    if bad:
        raise SystemExit(f"unknown rows {bad}; ids {[r[0] for r in ROWS]}")
    rows = [r for r in ROWS if not want or r[0] in want]
    nb = None
    if a.collect_only:
        rows = []
    elif any(r[2] is None for r in rows):
        if not a.official:
            raise SystemExit("the official_code row needs --official PATH (the fetched DaiDaiLoh/QG-VAE)")
        nb = read_notebook(a.official)
    a.official_rev = notebook_revision(a.official) if a.official else "unknown"
    set_threads(a.threads)
    out = Path(a.out) / STUDY
    work = Path(a.work) if a.work else Path("runs/bench") / STUDY
    summary = {}
    for seed in a.seeds:          # seed 0 of every row first, then seed 1, ...
        for r in rows:
            if a.stop_at and time.time() > a.stop_at:
                break
            run_seed(r, seed, a, work, out, nb)
            summary = collect(a, work, out)
    summary = summary or collect(a, work, out)
    print(table(summary["rows"]))
    print(f"wrote {out / 'results.json'}, {out / 'table.md'}")
    return summary


if __name__ == "__main__":
    main()
