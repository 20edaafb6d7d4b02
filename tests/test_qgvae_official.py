"""Issue 23 item 5: the official-recipe preset and bench/qgvae_official.py, without the fetched repo.

The preset is pinned to the recipe the runner states (``OFFICIAL_RECIPE``: the notebook's settings);
the runner's notebook handling is run on a small stand-in notebook with the release's cell markers; the
official model's adapter is scored by ``evaluate_tokenizer`` on a known reconstruction (all black)."""
import json
import math

import pytest

import bench.qgvae_notebook as qn
import bench.qgvae_official as qo
from eval.reconstruction import ReconEvalConfig, evaluate_tokenizer
from groupgen.config import load_config, to_dict
from groupgen.data import DataConfig, build_dataset
from tokenizer.model import Tokenizer
from tokenizer.train import TokenizerTrainConfig

from bench.common import REPO


def test_official_preset_follows_the_release_recipe():
    cfg = load_config(TokenizerTrainConfig, REPO / "configs/tokenizer/fmnist_qgvae_official.yaml", [])
    r, m, q, t = qn.OFFICIAL_RECIPE, cfg.model, cfg.quantizer, cfg.train
    assert (m.arch, m.tokens, m.embed_dim, m.heads, m.down) == ("qgvae", r["tokens"], r["embed_dim"], r["heads"], r["down"])
    assert m.image_size // 2 ** m.down == 32          # DS_SPEED_FACTOR 0: the full 32x32 map, 1024 features a token
    assert (q.kind, q.num_tokens, q.codebook_size) == ("pertoken", r["tokens"], r["codebook_size"])
    assert (q.beta, q.codebook_weight, q.init_scale) == (r["beta"], r["codebook_weight"], r["init_scale"])
    assert (q.reset_every, q.reset_rule, q.reset_noise) == (r["reset_every"], r["reset_rule"], r["reset_noise"])
    assert q.ordered_dropout_p == r["ordered_dropout_p"] and q.revive_every == r["revive_every"]
    assert not q.soft_revive and not q.ema and not q.l2_norm and q.entropy_weight == 0
    assert (t.lr, tuple(t.betas), t.weight_decay, t.clip) == (r["lr"], r["betas"], r["weight_decay"], r["clip"])
    assert t.batch_size == r["batch_size"] and t.precision == "fp32"
    # its MSE on [0, 1] images is a quarter of groupgen's on [-1, 1]
    assert cfg.loss.l2_weight == 0.25 and cfg.loss.vq_weight == 1.0 and cfg.loss.disc_weight == 0
    tok = Tokenizer(cfg.model, cfg.quantizer)
    assert tok.layout.L == 64 and tok.layout.K == (512,) and tok.layout.per_position_codebook
    assert tok.net.proj_in.proj[0].weight.shape[1] == 32 * 32
    # the runner trains groupgen's rows with the same budget and no extra maintenance
    ov = qo.group_overrides(type("A", (), {"steps": 1500, "batch": 32, "threads": 1})(), 2)
    assert "train.steps=1500" in ov and "train.batch_size=32" in ov and "train.seed=2" in ov


# A stand-in notebook: the release's cell markers, a tiny BaseAE with the release's encode/decode/codebook
# /offset interface (codebook [C, K, D], offset [D, C], encode -> (z, cb, commit, idx [B, C, 1])).
_MODEL_CELLS = [
    "import torch\nimport torch.nn as nn\n",
    "def mkdir(path):\n    pass\n",
    "class Settings:\n    VQVAE_D = 4\n    VQVAE_K = 8\n    VQVAE_C = 6\n    NUM_HEADS = 2\n"
    "SETTINGS = Settings()\n",
    "def positional_encoding(x, n):\n    return x\n",
    "class SmallResidualBlock(nn.Module):\n    pass\n",
    "class ConvEncoder(nn.Module):\n    pass\n",
    "class BaseAE(nn.Module):\n"
    "    def __init__(self, SETTINGS, c_in):\n"
    "        super().__init__()\n"
    "        self.SETTINGS = SETTINGS\n"
    "        self.codebook = nn.Parameter(torch.zeros(SETTINGS.VQVAE_C, SETTINGS.VQVAE_K, SETTINGS.VQVAE_D))\n"
    "        self.offset = nn.Parameter(torch.zeros(SETTINGS.VQVAE_D, SETTINGS.VQVAE_C))\n"
    "    def encode(self, x):\n"
    "        B, C = x.shape[0], self.SETTINGS.VQVAE_C\n"
    "        idx = torch.zeros(B, C, 1, dtype=torch.long)\n"
    "        z = self.codebook[torch.arange(C)[None], idx[..., 0]].transpose(1, 2)[..., None]\n"
    "        return z + self.offset[None, :, :, None], 0.0, 0.0, idx\n"
    "    def decode(self, z, w, h):\n"
    "        return torch.zeros(z.shape[0], self.SETTINGS.INPUT_C, w, h) + 0.0 * z.sum()\n"
    "    def forward(self, x, dropout_mask=None):\n"
    "        z, a, b, idx = self.encode(x)\n"
    "        return self.decode(z.view(z.shape[0], self.SETTINGS.VQVAE_D, -1), x.shape[2], x.shape[3]), a, b, idx\n",
]
_TRAIN_CELL = ("ae = BaseAE(SETTINGS, 1)\noptimiser = torch.optim.AdamW(ae.parameters(), lr=0.0002)\n"
               "for epoch in range(0, 100):\n    x = ae.codebook.get_device(), ae.offset.get_device()\n")


def _notebook() -> dict:
    cells = [{"cell_type": "markdown", "source": ["# demo\n"]}]
    cells += [{"cell_type": "code", "source": s.splitlines(keepends=True)} for s in _MODEL_CELLS]
    cells += [{"cell_type": "code", "source": ["ae = BaseAE(SETTINGS, 1)\n"]},        # a sanity-check cell: skipped
              {"cell_type": "code", "source": _TRAIN_CELL.splitlines(keepends=True)}]
    return {"cells": cells}


def test_notebook_cells_are_split_patched_and_imported(tmp_path):
    nbfile = tmp_path / "QG-VAE.ipynb"
    nbfile.write_text(json.dumps(_notebook()))
    nb = qn.read_notebook(nbfile)
    assert qn.read_notebook(tmp_path) == nb                    # a folder holding it
    model_src, train_src = qn.split_cells(nb)
    assert all(m in model_src for m in qn._MODEL_MARKERS) and "optimiser" not in model_src
    assert train_src == _TRAIN_CELL
    patched = qn.patch_training_cell(train_src)
    assert "range(0, EPOCHS)" in patched and "get_device" not in patched and patched.count(".device") == 2
    with pytest.raises(SystemExit):
        qn.patch_training_cell(train_src.replace("range(0, 100)", "range(0, 5)"))
    mod = qn.import_official(nb, tmp_path, 32, 1)
    assert (mod.SETTINGS.INPUT_C, mod.SETTINGS.INPUT_W, mod.SETTINGS.INPUT_H) == (1, 32, 32)
    assert "import torch" in (tmp_path / "qgvae_official_notebook.py").read_text()


def test_official_adapter_scores_a_known_reconstruction_on_the_native_basis(tmp_path):
    """The stand-in model reconstructs every image as black (0 on [0, 1]); evaluate_tokenizer must
    give the per-image PSNR of that pair on the 28x28 centre, peak 1, and usage 1/K per token."""
    nb = _notebook()
    mod = qn.import_official(nb, tmp_path, 32, 1)
    ae = mod.BaseAE(mod.SETTINGS, 1)
    tok = qn.OfficialTokenizer(ae, 32, 1)
    x = build_dataset(DataConfig(name="fmnist", image_size=32, channels=1, limit=64), "test").batch(range(64))[0]
    assert qn.check_adapter(tok, x[:4]) == 0.0
    assert tok.encode(x[:4]).shape == (4, 6, 1)
    ev = evaluate_tokenizer(tok, ReconEvalConfig(n=64, batch_size=32, lpips=False, extractor="none", device="cpu"),
                            train_data=to_dict(qn.data_config()))
    a = ((x[:, :, 2:30, 2:30].double() + 1) / 2).pow(2).flatten(1).mean(1)   # MSE against black, [0, 1]
    assert ev["images"] == 64 and ev["native_basis"].startswith("28x28")
    assert ev["psnr_native_per_image"] == pytest.approx(float((-10 * a.log10()).mean()), abs=1e-9)
    assert ev["psnr_native"] == pytest.approx(-10 * math.log10(float(a.mean())), abs=1e-9)
    assert ev["usage_mean"] == pytest.approx(1 / 8)
    rec = qo.score(ev)
    assert set(rec) >= {"psnr_native_per_image", "psnr_native", "ssim_native", "usage_mean"}


def test_results_rows_keep_seeds_and_partial_runs_apart(tmp_path):
    base = {"native_basis": "28x28 centre at offset 2", "psnr_native_per_image": 20.0, "psnr_native": 19.0,
            "ssim_native": 0.7, "psnr_per_image": 21.0, "usage_mean": 0.9, "sec_per_step_median": 0.3}
    recs = [{**base, "seed": s, "steps": 1500, "psnr_native_per_image": 20.0 + s, "key": {}} for s in (0, 1)]
    part = [{**base, "seed": 2, "steps": 700, "partial": True, "key": {}}]
    row = qo.summarize_row(qo.ROWS[0], recs, [0, 1, 2], part)
    assert row["seeds"] == [0, 1] and row["partial"] and row["psnr_native_mean"] == 20.5
    assert row["psnr_native_ci95"] == pytest.approx(12.706 * math.sqrt(0.5) / math.sqrt(2), rel=1e-3)
    assert [p["steps"] for p in row["in_progress"]] == [700] and "key" not in row["per_seed"][0]
    md = qo.table([row])
    assert "partial: step 700" in md and "2/3 **partial**" in md


def test_collect_keeps_only_the_records_of_this_runs_config(tmp_path):
    """A kept record counts only where its key matches this run's (groupgen rows: the resolved config; the
    official row: the notebook's revision where known, else the settings alone)."""
    import types
    a = types.SimpleNamespace(steps=1500, batch=32, eval_images=2000, threads=1, seeds=[0, 1],
                              official_rev="unknown")
    base = {"native_basis": "28x28 centre at offset 2", "psnr_native_per_image": 20.0, "psnr_native": 19.0,
            "ssim_native": 0.7, "psnr_per_image": 21.0, "usage_mean": 0.9, "sec_per_step_median": 0.3, "steps": 1500}
    gg = qo.ROWS[2]
    stale = qo.seed_key(gg, 1, a)
    stale["config"]["train"]["lr"] *= 2                        # trained under another preset
    off = {"official": "abc123", "settings": qo.settings(a)}
    for rid, seed, key in ((gg[0], 0, qo.seed_key(gg, 0, a)), (gg[0], 1, stale), ("official_code", 0, off),
                           ("official_code", 1, {**off, "settings": {**off["settings"], "steps": 700}})):
        p = tmp_path / "res" / "seeds" / rid / f"seed{seed}.json"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps({**base, "seed": seed, "key": key}))
    rows = {r["row"]: r for r in qo.collect(a, tmp_path / "work", tmp_path / "res")["rows"]}
    assert rows["gg_best"]["seeds"] == [0] and rows["official_code"]["seeds"] == [0]
    assert rows["gg_best"]["seeds_planned"] == [0, 1, 2] and rows["gg_best"]["partial"]   # --seeds 0,1: still 1/3
    a.official_rev = "def456"                                   # a run that knows the notebook: another revision
    rows = {r["row"]: r for r in qo.collect(a, tmp_path / "work", tmp_path / "res")["rows"]}
    assert "official_code" not in rows and rows["gg_best"]["seeds"] == [0]


def test_a_groupgen_row_trains_with_its_overrides_scores_and_is_reused(tmp_path, capsys, monkeypatch):
    row = ("gg_try", "a candidate", "fmnist_qgvae", ["quantizer.beta=0.5", "quantizer.l2_norm=false"])
    monkeypatch.setattr(qo, "ROWS", qo.ROWS + [row])
    args = ["--rows", "gg_try", "--seeds", "0", "--steps", "2", "--eval-images", "16",
            "--out", str(tmp_path / "res"), "--work", str(tmp_path / "work")]
    got = qo.main(args)["rows"][-1]
    assert got["row"] == "gg_try" and got["seeds"] == [0] and got["steps"] == [2]
    assert math.isfinite(got["psnr_native_mean"]) and 0 < got["usage_mean"] <= 1
    kept = json.loads((tmp_path / "res" / "qgvae_official" / "seeds" / "gg_try" / "seed0.json").read_text())
    q = kept["key"]["config"]["quantizer"]      # the preset with the row's overrides, as trained
    assert (q["beta"], q["l2_norm"], q["codebook_size"]) == (0.5, False, 512)
    assert kept["key"]["config"]["train"]["steps"] == 2 and kept["images"] == 16
    capsys.readouterr()
    assert qo.main(args)["rows"][-1]["psnr_native_mean"] == got["psnr_native_mean"]
    assert "[gg_try seed 0] reusing" in capsys.readouterr().out


def test_official_run_checkpoint_round_trips_without_unpickling(tmp_path):
    """The official run's checkpoint (the training cell's globals, saved every ``every`` steps) holds
    tensors, numbers and strings only and loads with ``weights_only=True``; a resume restores them and the
    loader continues from the saved step."""
    import torch

    def cell_globals():
        torch.manual_seed(0)
        ae = torch.nn.Linear(4, 4)
        opt = torch.optim.AdamW(ae.parameters(), lr=2e-4)
        return {"ae": ae, "optimiser": opt, "magnitudes": torch.zeros(3), "index_count": torch.zeros(3),
                "steps": 0}

    x = torch.rand(8, 1, 32, 32) * 2 - 1
    key = {"official": "abc", "settings": {"steps": 4, "batch": 2}}
    g = cell_globals()
    ck = tmp_path / "official_ckpt.pt"
    loader = qn._Loader(qn._Fixed(x), lambda i: range(2 * i, 2 * i + 2), 4, 0, g, ck, every=2, key=key)
    for i, _ in enumerate(loader):     # a stand-in for the cell: one optimiser step a batch
        g["ae"](torch.ones(1, 4)).sum().backward()
        g["optimiser"].step()
        g["magnitudes"] += 1
        g["steps"] = i + 1
        if i == 2:
            break                      # "interrupted" during step 3: the step-2 checkpoint stands
    st = torch.load(ck, weights_only=True)
    assert st["steps"] == 2 and st["key"] == key and st["magnitudes"].tolist() == [2.0] * 3
    h = cell_globals()
    resumed = qn._Loader(qn._Fixed(x), lambda i: range(2 * i, 2 * i + 2), 4, 0, h, ck, every=2, key=key)
    assert len(list(resumed)) == 2 and resumed.done == 4
    assert h["steps"] == 2 and h["magnitudes"].tolist() == [2.0] * 3
    assert h["optimiser"].state_dict()["state"][0]["step"] == 2
    with pytest.raises(SystemExit, match="saved under other settings"):
        list(qn._Loader(qn._Fixed(x), lambda i: range(2), 4, 0, cell_globals(), ck, every=2, key={"other": 1}))
