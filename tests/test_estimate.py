"""The arithmetic of scale reproduces the source's worked examples; `chatstack estimate`'s contract.

python -m pytest tests/test_estimate.py -q
"""

import json
import subprocess
import sys

import pytest

from chatstack import estimate as E
from chatstack.cli import main
from chatstack.presets import get_preset


def run_json(*argv):
    """Run `chatstack estimate ... --json` in-process; returns the parsed object."""
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["estimate", *argv, "--json"])
    assert rc == 0
    return json.loads(buf.getvalue())


# ---------------------------------------------------------------- GPT-3 175B


def test_gpt3_params_formula_exact():
    cfg = get_preset("gpt3-175b")
    l, h, V = cfg.n_layer, cfg.n_embd, cfg.vocab_size
    assert (l, h, cfg.n_head, V, cfg.block_size) == (96, 12288, 96, 50257, 2048)
    assert l * E.gpt_block_formula(h) + V * h == 174_579_068_928
    assert E.param_breakdown(cfg)["headline"] == 174_579_068_928
    # the exact count adds positions Th and the final norm 2h
    assert E.param_breakdown(cfg)["total"] == 174_579_068_928 + 2048 * h + 2 * h


def test_gpt3_memory():
    r = run_json("--preset", "gpt3-175b")
    assert r["params_headline"] == 174_579_068_928
    assert r["params"] == r["params_exact"] == pytest.approx(174.6e9, rel=1e-3)
    assert r["train_memory_bytes"] == pytest.approx(3.5e12, rel=0.01)  # 20 bytes/param ~ 3.5 TB
    assert r["inference_memory_bytes"] == pytest.approx(350e9, rel=0.01)  # 2 bytes/param ~ 350 GB
    assert E.TRAIN_BYTES_PER_PARAM == 20 and E.INFER_BYTES_PER_PARAM == 2


def test_gpt3_training_time_mfu():
    # the contract command, verbatim
    r = run_json(
        "--preset", "gpt3-175b", "--tokens", "300e9", "--gpus", "1024", "--gpu-tflops", "312", "--mfu", "0.462"
    )
    assert r["train_flops"] == pytest.approx(3.14e23, rel=0.005)  # 6ND
    assert r["train_flops"] == 6 * r["params"] * 300e9
    # the source rounds N to 175B: 607k A100-hours, 25.3k A100-days, 24.7 days on 1024 GPUs
    assert r["gpu_hours"] == pytest.approx(607e3, rel=0.005)
    assert r["gpu_days"] == pytest.approx(25.3e3, rel=0.005)
    assert r["days"] == pytest.approx(24.7, rel=0.005)
    for key in ("params", "train_flops", "train_memory_bytes", "inference_memory_bytes", "gpu_hours", "days"):
        assert key in r
    # with the nominal N the numbers match the source's to its printed precision
    r175 = run_json(
        "--preset",
        "gpt3-175b",
        "--params",
        "175e9",
        "--tokens",
        "300e9",
        "--gpus",
        "1024",
        "--gpu-tflops",
        "312",
        "--mfu",
        "0.462",
    )
    assert round(r175["gpu_hours"] / 1e3) == 607
    assert round(r175["gpu_days"] / 1e2) / 10 == 25.3
    assert round(r175["days"], 1) == 24.7


def test_gpt3_recompute_achieved_tflops():
    r = run_json(
        "--preset", "gpt3-175b", "--tokens", "300e9", "--gpus", "1024", "--recompute", "--achieved-tflops", "140"
    )
    assert r["train_flops"] == 8 * r["params"] * 300e9  # 8ND
    assert r["days"] == pytest.approx(34, rel=0.01)  # the published ~34 days
    assert r["achieved_tflops"] == 140


def test_llama65b_tokens_per_gpu_s():
    r = run_json("--preset", "llama-65b", "--tokens", "1.4e12", "--gpus", "2048", "--tokens-per-gpu-s", "380")
    assert r["days"] == pytest.approx(21, rel=0.01)
    assert r["seconds"] == pytest.approx(1.4e12 / (2048 * 380))


def test_llama_12lh2_column():
    want = {
        "llama-7b": 6_442_450_944,
        "llama-13b": 12_582_912_000,
        "llama-33b": 31_897_681_920,
        "llama-65b": 64_424_509_440,
    }
    for name, n in want.items():
        assert E.twelve_l_h2(get_preset(name)) == n
    assert run_json("--preset", "llama-7b")["params_12lh2"] == 6_442_450_944


def test_llama_exact_counts_match_release():
    # Meta's released sizes: 6.74B, 13.0B, 32.5B, 65.2B (untied output, SwiGLU, RMSNorm)
    assert E.param_breakdown(get_preset("llama-7b"))["total"] == 6_738_415_616  # HF LlamaForCausalLM's count
    for name, billions in [("llama-13b", 13.0), ("llama-33b", 32.5), ("llama-65b", 65.2)]:
        assert E.param_breakdown(get_preset(name))["total"] / 1e9 == pytest.approx(billions, rel=0.003)


def test_gpt2_small_hf_count():
    cfg = get_preset("gpt2")
    assert E.param_breakdown(cfg)["total"] == 124_439_808
    r = run_json("--preset", "gpt2")
    assert r["params"] == r["params_exact"] == 124_439_808
    assert r["params_headline"] == 12 * (12 * 768**2 + 13 * 768) + 50257 * 768


# ---------------------------------------------------------------- formulas


def test_time_to_train_three_ways_agree():
    flops = 6 * 1e9 * 1e10
    a = E.time_to_train(flops, gpus=8, gpu_tflops=100, mfu=0.5)
    b = E.time_to_train(flops, gpus=8, achieved_tflops=50)
    tokens_per_s = 50e12 / 6e9
    c = E.time_to_train(flops, gpus=8, tokens=1e10, tokens_per_gpu_s=tokens_per_s)
    assert a["seconds"] == pytest.approx(b["seconds"]) == pytest.approx(c["seconds"])
    assert c["achieved_tflops"] == pytest.approx(50)
    assert a["gpu_hours"] == pytest.approx(a["seconds"] * 8 / 3600)


def test_flops_per_token_palm_and_recompute():
    cfg = get_preset("gpt2")
    n = E.param_breakdown(cfg)["compute"]
    assert n == 124_439_808 - 1024 * 768  # positions are a lookup, not a matmul
    assert E.flops_per_token(cfg, 1024, attention=False) == 6 * n
    assert E.flops_per_token(cfg, 1024) == 6 * n + 12 * 12 * 768 * 1024
    assert E.flops_per_token(cfg, 1024, recompute=True) == pytest.approx(4 / 3 * E.flops_per_token(cfg, 1024))
    assert E.inference_flops_per_token(cfg) == 2 * n
    # untied output: the input embedding is a lookup and is not counted; the output layer is
    llama = get_preset("nano-llama")
    br = E.param_breakdown(llama)
    assert br["compute"] == br["total"] - br["embedding"]


def test_activation_formula_matches_korthikanti_for_gpt():
    # GPT family: s*b*h*(34 + 5as/h) per layer, plus fp32 logits
    cfg = get_preset("gpt2")
    s, b, h, a, l, V = 1024, 4, 768, 12, 12, 50257
    per_layer = s * b * h * 34 + 5 * a * s * s * b
    assert E.activation_bytes(cfg, b, s) == l * per_layer + 4 * s * b * V
    assert E.activation_bytes(cfg, b, s, flash=True) == l * s * b * h * 34 + 4 * s * b * V
    assert E.activation_bytes(cfg, b, s, recompute=True) == l * 2 * s * b * h + per_layer + 4 * s * b * V


def test_kv_cache_gqa():
    cfg = get_preset("smollm2-135m")  # 30 layers, 3 kv heads of 64
    assert E.kv_cache_bytes(cfg, batch=2, seq=100) == 2 * 30 * 2 * 100 * 3 * 64 * 2
    r = run_json("--preset", "smollm2-135m", "--batch", "2", "--seq", "100")
    assert r["kv_cache_bytes"] == 2 * 30 * 2 * 100 * 3 * 64 * 2
    assert r["inference_memory_bytes"] == 2 * r["params_exact"] + r["kv_cache_bytes"]
    assert r["train_memory_bytes"] == 20 * r["params_exact"] + r["activation_bytes"]
    assert r["activation_bytes"] > 0


# ---------------------------------------------------------------- CLI


def test_checkpoint_config(tmp_path):
    from chatstack.checkpoint import save_checkpoint
    from chatstack.model import GPT

    cfg = get_preset("nano")
    save_checkpoint(tmp_path / "ck", GPT(cfg), {"model": cfg.to_dict(), "stage": "test"})
    r = run_json("--checkpoint", str(tmp_path / "ck"), "--tokens", "1e6")
    assert r["params_exact"] == GPT(cfg).num_params()
    assert r["train_flops"] == 6 * r["params"] * 1e6


def test_table_output(capsys):
    assert main(["estimate", "--preset", "gpt2"]) == 0
    out = capsys.readouterr().out
    assert "124,439,808" in out and "GPU-hours" in out


@pytest.mark.parametrize(
    "argv, msg",
    [
        (["--preset", "gpt5"], "unknown preset"),
        (["--preset", "gpt2", "--tokens", "-1"], "--tokens must be a positive number"),
        (["--preset", "gpt2", "--gpus", "-8"], "--gpus must be a positive number"),
        (["--preset", "gpt2", "--mfu", "1.5"], "--mfu"),
        (["--preset", "gpt2", "--gpus", "2.5"], "whole number"),
        (["--checkpoint", "/nonexistent/ck"], "no such checkpoint"),
    ],
)
def test_errors_exit_2_one_line(argv, msg, capsys):
    assert main(["estimate", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and "\n" not in err


def test_console_command_subprocess():
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "chatstack.cli",
            "estimate",
            "--preset",
            "gpt3-175b",
            "--tokens",
            "300e9",
            "--gpus",
            "1024",
            "--gpu-tflops",
            "312",
            "--mfu",
            "0.462",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["days"] == pytest.approx(24.7, rel=0.005)


@pytest.mark.slow  # another interpreter start (~6-20 s here: the CLI imports every stage)
def test_console_error_subprocess():
    p = subprocess.run(
        [sys.executable, "-m", "chatstack.cli", "estimate", "--preset", "nope"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1
