"""Token store read throughput vs what an AR training step consumes.

    python bench/token_store.py [--quick] [--train-tok-s N | --ar-json ar.json] [--json out.json]

Builds a synthetic store (random codes, groupgen.tokens.TokenStoreWriter) in a temporary folder,
then times random batches two ways: raw fancy indexing of the memmap (``codes[idx, view]``) and the
trainer's own path (``ar_model.data.TokenBatches.get``: sorted gather + int64 tensors, epoch
permutations included). Reads come from the page cache (the store was just written), which is the
steady state of training on a store that fits in RAM. The consumer rate is the GPT training step's
tokens/s: taken from ``--train-tok-s``, from an ``ar_vs_llamagen.py --json`` file, or measured here.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import interleave, machine_info, median, spread, timed, write_json

from ar_model.data import TokenBatches
from groupgen.layout import TokenLayout
from groupgen.tokens import TokenStore, TokenStoreWriter


def make_store(root: Path, layout: TokenLayout, n: int, views: int, classes: int, seed: int = 0) -> TokenStore:
    w = TokenStoreWriter(root, layout, n, views, classes, chunk_size=4096)
    rng = np.random.default_rng(seed)
    for ci in w.pending_chunks():
        a, b = w.chunk_range(ci)
        codes = np.stack([rng.integers(0, k, size=(b - a, views, layout.L)) for k in layout.K], -1)
        w.write_chunk(ci, codes, rng.integers(0, classes, size=b - a))
    w.finalize()
    return TokenStore(root)


def raw_reader(store: TokenStore, batch: int, seed: int = 1):
    rng = np.random.default_rng(seed)

    def run():
        idx = rng.integers(0, len(store), size=batch)
        view = rng.integers(0, store.views, size=batch)
        return torch.from_numpy(np.asarray(store.codes[idx, view]).astype(np.int64))

    return run


def trainer_reader(store: TokenStore, batch: int, n_batches: int):
    """``n_batches`` consecutive TokenBatches.get calls (crosses epoch boundaries when small)."""
    tb = TokenBatches(store, np.arange(len(store)), batch, seed=0)
    state = {"pos": 0}

    def run():
        for _ in range(n_batches):
            tb.get(state["pos"])
            state["pos"] += 1

    return run


def measure_train_tok_s(layout: TokenLayout, quick: bool, batch: int = 8) -> float:
    """Tokens/s of our GPT's bf16 training step (GPT-B, or the micro preset with --quick)."""
    from ar_model.model import GPT, gpt_config

    model = GPT(gpt_config("micro" if quick else "B"), layout, 1000).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    codes = torch.stack([torch.randint(0, k, (batch, layout.L)) for k in layout.K], -1)
    labels = torch.randint(0, 1000, (batch,))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = model.loss(codes, labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    return batch * layout.L / median([timed(step) for _ in range(2)])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n", type=int, default=0, help="images in the synthetic store (default 20000, quick 2000)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--train-tok-s", type=float, default=0.0, help="consumer rate; else --ar-json, else measured")
    ap.add_argument("--ar-json", default="", help="ar_vs_llamagen.py --json output (uses ours bf16 tok/s)")
    ap.add_argument("--json", default="")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    n = a.n or (2000 if a.quick else 20000)
    grid = 4 if a.quick else 16
    R: dict = {"machine": machine_info(a.threads), "n": n, "views": 2, "L": grid * grid}
    layouts = {"G1-K16384": TokenLayout("grid", grid * grid, (16384,), grid, grid),
               "G8-K2048": TokenLayout("grid", grid * grid, (2048,) * 8, grid, grid)}

    consumer = a.train_tok_s
    if not consumer and a.ar_json:
        consumer = json.loads(Path(a.ar_json).read_text())["train"]["bf16"]["ours"]["tok_s"]
        R["consumer_source"] = a.ar_json
    if not consumer:
        consumer = measure_train_tok_s(layouts["G1-K16384"], a.quick)
        R["consumer_source"] = "measured here (GPT-" + ("micro" if a.quick else "B") + " bf16, batch 8)"
    R["train_tok_s"] = consumer
    print(f"consumer: {consumer:.0f} tokens/s ({R.get('consumer_source', 'given')})", flush=True)

    with tempfile.TemporaryDirectory(prefix="bench_tokens_") as tmp:
        for name, lay in layouts.items():
            store_time = timed(lambda: make_store(Path(tmp) / name, lay, n, 2, 1000))
            store = TokenStore(Path(tmp) / name)
            mb = (Path(tmp) / name / "codes.npy").stat().st_size / 2**20
            print(f"[{name}] store {mb:.1f} MiB, {store.codes.dtype}, written in {store_time:.1f}s", flush=True)
            for batch in (8, 256):
                nb = 16
                cases = {"raw": raw_reader(store, batch), "trainer": trainer_reader(store, batch, nb)}
                # raw: one batch per call; trainer: nb batches per call (epoch reshuffles amortised)
                times = interleave(cases, a.reps, log=None)
                row = {}
                for k, t in times.items():
                    per = median(t) / (1 if k == "raw" else nb)
                    tok_s = batch * lay.L / per
                    row[k] = {"s_per_batch": per, "spread_s": spread(t), "tok_s": tok_s,
                              "x_training": tok_s / consumer}
                R[f"{name}/b{batch}"] = row
                print(f"  batch {batch}: " + ", ".join(f"{k} {v['tok_s']:.3g} tok/s ({v['x_training']:.0f}x training)"
                                                       for k, v in row.items()), flush=True)
    R["machine_end"] = machine_info(a.threads)
    write_json(a.json, R)
    return R


if __name__ == "__main__":
    main()
