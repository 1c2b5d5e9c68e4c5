"""services/benchmarks/trainer_gpu_check.py without a GPU.

The arithmetic (MFU, peak FLOP/s by device name, rank counts), the argument checks and the
refusal without CUDA run as they are. The sharded part, which on a GPU machine runs under
torchrun with NCCL, runs here for real with the gloo backend on two CPU ranks and the tiny
model: the same launcher, FSDP2 wrapping, trainer step and report.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from services.benchmarks.trainer_gpu_check import (
    HEADER,
    RankFigures,
    check_arguments,
    launch,
    main,
    mfu,
    parser,
    peak_tflops,
    rank_counts,
    report,
    run_config,
    sanity,
)
from services.models.tiny import build_model, parameter_count


def test_mfu_is_six_n_t_over_peak() -> None:
    # 358M parameters, 25,000 tokens in 0.2 s on one 989 TFLOP/s GPU.
    assert mfu(358_000_000, 25_000, 0.2, 989e12) == pytest.approx(0.27149, rel=1e-4)
    # Twice the ranks at the same step time and tokens: half the utilisation.
    assert mfu(358_000_000, 25_000, 0.2, 989e12, ranks=2) == pytest.approx(0.27149 / 2, rel=1e-4)


@pytest.mark.parametrize(
    ("name", "tflops"),
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", 835.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA H20", 148.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA A10", 125.0),
        ("NVIDIA L40S", 362.0),
        ("NVIDIA L4", 121.0),
        ("AMD Instinct MI300X", 1307.0),
        ("Tesla T4", None),
    ],
)
def test_peak_flops_by_device_name(name: str, tflops: float | None) -> None:
    """The longest table name wins: an H200 is not an H20, an L40S not an L4."""
    assert peak_tflops(name) == tflops


def test_rank_counts() -> None:
    assert rank_counts("1,8", 8) == ([1, 8], [])
    assert rank_counts("1,all", 4) == ([1, 4], [])
    assert rank_counts("1,all", 1) == ([1], [])  # one GPU: one run
    assert rank_counts("1, 8", 2) == ([1], [8])  # more than the machine has: skipped
    for bad in ("0", "x", ","):
        with pytest.raises(ValueError):
            rank_counts(bad, 8)


def test_arguments() -> None:
    args = parser().parse_args(["--size", "1.5b", "--nproc", "1,8", "--steps", "3"])
    assert (args.size, args.nproc, args.steps, args.worker) == ("1.5b", "1,8", 3, False)
    assert parser().parse_args([]).size == "0.5b"
    with pytest.raises(SystemExit):
        parser().parse_args(["--size", "7b"])
    assert check_arguments(args, [1, 8]) is None
    assert check_arguments(args, [1, 3]) is None  # 128 rows split unevenly: the trainer does so
    assert "--updates 3" in (check_arguments(parser().parse_args(["--updates", "3"]), [1]) or "")
    few = parser().parse_args(["--groups", "1", "--group-size", "2"])
    assert "some ranks would have none" in (check_arguments(few, [1, 4]) or "")
    assert check_arguments(parser().parse_args(["--micro-batch", "0"]), [1]) is not None


def test_table_line() -> None:
    one = RankFigures(1, 358_000_000, 25_000, 20_000, [0.2, 0.25, 0.2], 12 * 2**30)
    eight = RankFigures(8, 358_000_000, 25_000, 20_000, [0.032], 3 * 2**30)
    line = one.line(989e12, one)
    assert "27.1%" in line and "12.00" in line and "125000" in line
    assert eight.line(989e12, one).split()[-1] == "78%"  # 781,250 tokens/s of 8 x 125,000
    assert "n/a" in one.line(None, None)
    assert len(HEADER.split("  ")) >= 7
    args = parser().parse_args(["--nproc", "1,8"])
    lines = report(args, "NVIDIA H100 80GB HBM3", 989.0, [one, eight])
    assert lines[0].startswith("0.5b: 358.0M parameters") and "(25000 tokens" in lines[0]
    assert "989 TFLOP/s" in lines[1] and lines[2] == HEADER and len(lines) == 5
    assert "27.1%" in lines[3] and lines[4].endswith("78%")
    assert "pass --peak-tflops" in report(args, "Tesla T4", None, [one])[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_refuses_without_cuda(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--nproc", "1"]) == 2
    err = capsys.readouterr().err
    assert "no CUDA device" in err and "NVIDIA GPUs" in err


@pytest.mark.slow
def test_one_and_two_ranks_on_the_cpu(tmp_path: Path) -> None:
    """torchrun with 1 rank (the single-device trainer) and 2 (FSDP2 over gloo, sharing the rows
    of one batch), with activation checkpointing and two optimiser updates per step."""
    model_dir = build_model(tmp_path / "tiny", "tiny")
    argv = ["--device", "cpu", "--groups", "4", "--group-size", "2", "--response-len", "8"]
    argv += ["--micro-batch", "2", "--updates", "2", "--steps", "2", "--activation-checkpointing"]
    args = parser().parse_args(argv)
    args.timeout = 300  # a hang guard only
    one, two = (launch(args, n, model_dir, tmp_path) for n in (1, 2))
    for n, figures in ((1, one), (2, two)):
        report = json.loads((tmp_path / f"ranks-{n}.json").read_text())
        assert report["nonfinite"] is False
        assert figures.ranks == n and len(figures.step_s) == 2
        assert all(t > 0 for t in figures.step_s)
        assert figures.parameters == parameter_count(model_dir)  # the whole model, not a shard
        assert figures.peak_memory_bytes is None  # no CUDA memory to report
    # The same global batch: 4 groups x 2 of 8-token prompts and 4-8-token responses.
    assert (one.tokens, one.response_tokens) == (two.tokens, two.response_tokens)
    assert 8 * (8 + 4) <= two.tokens <= 8 * (8 + 8)
    assert 8 * 4 <= two.response_tokens <= 8 * 8


@pytest.mark.slow
def test_single_device_sanity_step_on_the_cpu(tmp_path: Path) -> None:
    """The check's first step (bf16 autocast, bf16 reference) passes on a real model."""
    model_dir = build_model(tmp_path / "tiny", "tiny")
    assert sanity(model_dir, run_config(2, 1, 4), torch.device("cpu")) is None
