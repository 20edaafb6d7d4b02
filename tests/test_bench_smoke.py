"""The decode microbenchmarks run (--quick shapes) and report every case, so they cannot rot
between benchmark sessions. No timing is asserted."""
import pytest

from ar_model.cpu import kernels as cpu_kernels
from bench import decode_attention, decode_linear, sampler_topk, train_kernels


def test_decode_linear_bench_quick(tmp_path):
    out = tmp_path / "lin.json"
    R = decode_linear.main(["--quick", "--rows", "4,16", "--json", str(out)])
    assert out.exists() and set(R["rows"]) == {"float32:4", "float32:16", "bfloat16:4", "bfloat16:16"}
    built = cpu_kernels.kernels() is not None   # measured wherever it runs, routed to or not
    for row in R["rows"].values():
        assert {"F.linear", "packed"} <= set(row) and ("kernel" in row) == built
        assert all(c["ms"] > 0 and c["ratio"] > 0 for c in row.values())


def test_decode_attention_bench_quick(tmp_path):
    if cpu_kernels.kernels() is None:
        with pytest.raises(SystemExit, match="no kernel"):
            decode_attention.main(["--quick"])
        return
    R = decode_attention.main(["--quick", "--json", str(tmp_path / "att.json")])
    assert set(R["lengths"]) == {"float32:5", "float32:33", "bfloat16:5", "bfloat16:33"}
    assert all(r["ratio"] > 0 and r["kernel"]["ms"] > 0 for r in R["lengths"].values())


def test_sampler_topk_bench_quick(tmp_path):
    R = sampler_topk.main(["--quick", "--json", str(tmp_path / "topk.json")])
    row = R["shapes"]["2x64:k=8"]
    assert {"torch.topk", "torch.topk sorted"} <= set(row) and ("kernel" in row) == (cpu_kernels.kernels() is not None)
    assert all(c["us"] > 0 and c["ratio"] > 0 for c in row.values())


def test_train_kernels_bench_quick(tmp_path):
    R = train_kernels.main(["--quick", "--json", str(tmp_path / "train.json")])
    if cpu_kernels.kernels() is None:
        assert R["cases"] == {}
        return
    assert len(R["cases"]) == 9
    assert all(r["ratio"] > 0 and r["kernel"]["ms"] > 0 and r["pytorch"]["ms"] > 0 for r in R["cases"].values())


def test_data_pipeline_bench_quick(tmp_path):
    from bench import data_pipeline
    R = data_pipeline.main(["--workers", "0,1", "--batches", "2", "--batch-size", "2", "--step-ms", "0,5",
                            "--json", str(tmp_path / "d.json")])
    assert set(R["rows"]) == {f"step={s}ms workers={w}" for s in (0, 5) for w in (0, 1)}
    assert all(r["images_per_s"] > 0 for r in R["rows"].values())
