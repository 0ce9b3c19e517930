"""Smoke runs of the maintained `benchmarks/bench_*.py` tools at tiny scale: each script's `main` runs end to end
and prints figures that make sense (ratios finite and positive, the two sides' outputs equal, the bounds what they
claim to be). Timings are not checked. Covered elsewhere: `bench_compile.py` (tests/test_modeling_generation.py),
`bench_granularity.py --smoke` (tests/test_modeling_granularity.py), `invariance.py` (tests/test_benchmarks_invariance.py)."""

import math
import re
import runpy
from pathlib import Path

import pytest


BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def bench(name: str) -> dict:
    return runpy.run_path(str(BENCHMARKS / f"{name}.py"))


def positive(x: float) -> bool:
    return math.isfinite(x) and x > 0


def test_bench_processor_smoke(capsys):
    figures = bench("bench_processor")["main"](["--scale", "0.05", "--repeats", "1", "--num-threads", "1"])
    assert figures["max_abs_diff"] == 0.0  # bit-identical pixel values (the script exits on different grids)
    assert positive(figures["transformers_s"]) and positive(figures["nativevl_s"])
    assert figures["ratio"] == pytest.approx(figures["transformers_s"] / figures["nativevl_s"])
    out = capsys.readouterr().out
    assert re.search(r"7 images, .* (\d+) patches out", out) and "grids identical" in out


def test_bench_vision_smoke(capsys):
    """Both towers in their own child process, on the same weights: the same features (fp32, CPU)."""
    argv = ["--preset", "tiny", "--repeats", "1", "--threads", "1", "--max-pixels", str(112 * 112)]
    figures = bench("bench_vision")["main"](argv)
    assert figures["max_abs_diff"] < 1e-5
    assert figures["patches"] > 0 and all(positive(s) for s in figures["seconds"].values())
    assert positive(figures["speed_ratio"]) and math.isfinite(figures["memory_ratio"]) and figures["memory_ratio"] >= 0
    assert "speed ratio (transformers / nativevl)" in capsys.readouterr().out


def test_bench_packing_smoke_prints_the_padding_free_bound(capsys):
    argv = ["--preset", "tiny", "--steps", "2", "--batch-size", "4", "--scale", "0.125"]
    figures = bench("bench_packing")["main"](argv)
    padded, packed = figures["padding"]["TRL padded"], figures["padding"]["nativevl packed"]
    assert packed == 0.0 and 0 < padded < 1  # one packed row per batch: no padding left
    assert figures["bound"] == pytest.approx(1 / (1 - padded))
    assert positive(figures["ratio"]) and figures["share_of_bound"] == pytest.approx(
        figures["ratio"] / figures["bound"]
    )
    assert all(positive(t) for t in figures["tokens_per_s"].values())
    out = capsys.readouterr().out
    line = re.search(r"padding-free bound 1 / \(1 - ([\d.]+)%\) = ([\d.]+)x; reached ([\d.]+)x = (\d+)% of it", out)
    assert line and float(line[1]) == pytest.approx(100 * padded, abs=0.05)
    assert float(line[2]) == pytest.approx(figures["bound"], abs=0.005)


def test_bench_granularity_prefill_at_scale_smoke(capsys):
    """The timing-only path (`--prefill-at-scale`) on the tiny shape: one row per level, its bound the level's
    visual tokens over the full grid's."""
    rows = bench("bench_granularity")["prefill_at_scale"](112, batch_size=1, repeats=1, shape="tiny")
    assert [r["level"] for r in rows] == [0, 1, 2]
    assert rows[0]["tokens"] > rows[1]["tokens"] > rows[2]["tokens"] > 0
    assert [r["bound"] for r in rows] == [r["tokens"] / rows[0]["tokens"] for r in rows] and rows[0]["bound"] == 1.0
    assert all(positive(r["full_s"]) and positive(r["router_s"]) for r in rows)
    assert "router/full  bound" in capsys.readouterr().out


def test_bench_convert_smoke(tmp_path, capsys):
    """Every run of the script (convert with verification, back to stock Qwen2-VL, the three loads) in its own
    child process at the tiny shape: each exits 0 and reports its peak RSS."""
    assert bench("bench_convert")["main"](["--shape", "tiny", "--workdir", str(tmp_path)]) == 0
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| tiny |")]
    rows = list({tuple(cell.strip() for cell in row): None for row in rows})  # printed as they run and at the end
    labels = [row[1] for row in rows]
    assert len(rows) == 5 and labels[0].startswith("nativevl convert qwen2-vl") and "to-qwen2-vl" in labels[1]
    for _, _, checkpoint, wall, peak, ratio, status in rows:
        assert status == "0" and checkpoint.endswith(" GB") and wall.endswith(" s")
        assert positive(float(peak.removesuffix(" GB"))) and positive(float(ratio))
    assert not any(tmp_path.iterdir())  # sources and outputs removed without --keep
