"""`chatstack pretrain` end to end on a tiny corpus: metrics, honest bits-per-byte, checkpoint contents,
tokenizer mismatch; and (slow) SIGKILL + --resume, 2 gloo processes vs 1, FSDP smoke.

    python -m pytest tests/test_pretrain.py -q              # fast ones
    python -m pytest tests/test_pretrain.py -q -m slow      # subprocess / torchrun ones (~1 minute)
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from helpers import make_dataset, tiny_tokenizer  # noqa: E402

from chatstack.checkpoint import load_checkpoint
from chatstack.cli import main

NANO = [
    "--preset",
    "nano",
    "--block-size",
    "32",
    "--batch-size",
    "4",
    "--lr",
    "3e-3",
    "--warmup-steps",
    "2",
    "--no-progress",
    "--eval-tokens",
    "256",
    "--sample-tokens",
    "20",
    "--time-budget",
    "0",
]


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def rows(path) -> list[dict]:
    return [json.loads(l) for l in (Path(path) / "metrics.jsonl").read_text().splitlines() if l.strip()]


def curve(path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in rows(path) if "loss" in r]


def test_pretrain_cli_end_to_end(tmp_path, capsys):
    data = make_dataset(tmp_path)
    out = tmp_path / "base"
    rc = main(
        [
            "pretrain",
            "--data",
            str(data),
            "--out",
            str(out),
            "--max-steps",
            "8",
            "--eval-every",
            "4",
            "--log-every",
            "2",
            *NANO,
        ]
    )
    assert rc == 0
    assert "val_bpb" in capsys.readouterr().out
    r = rows(out)
    evals = [x for x in r if "val_bpb" in x]
    assert [x["step"] for x in evals] == [4, 8] and evals[-1]["final"]
    assert all(x["val_bpb"] > 0 and math.isfinite(x["val_bpb"]) for x in evals)
    assert any("sample" in x for x in r)
    train_rows = [x for x in r if "loss" in x]
    assert {"step", "loss", "lr", "tokens_per_s", "mfu", "grad_norm"} <= set(train_rows[0])
    ck = load_checkpoint(out, with_state=True)
    assert ck.config["stage"] == "base" and ck.config["train"]["preset"] == "nano"
    assert ck.config["model"]["block_size"] == 32 and ck.tokenizer.vocab_size == tiny_tokenizer().vocab_size
    assert ck.state["train"]["step"] == 8


def test_final_bits_per_byte_is_honest(tmp_path):
    """Recompute the final eval independently: loss summed over every held-out target token, divided by
    the UTF-8 bytes of the decoded held-out text."""
    data = make_dataset(tmp_path)
    out = tmp_path / "base"
    assert (
        main(["pretrain", "--data", str(data), "--out", str(out), "--max-steps", "3", "--eval-every", "0", *NANO]) == 0
    )
    final = [x for x in rows(out) if x.get("final")][-1]
    ck = load_checkpoint(out)
    tok, model = ck.tokenizer, ck.model.eval()
    from chatstack.data.shards import TokenDataset

    val = torch.from_numpy(TokenDataset(data).split("val").tokens.astype("int64"))
    T = 32
    n = (len(val) - 1) // T
    x = val[: n * T].view(n, T)
    y = val[1 : n * T + 1].view(n, T)
    with torch.no_grad():
        nll = torch.nn.functional.cross_entropy(
            model(x).reshape(-1, model.config.vocab_size), y.reshape(-1), reduction="none"
        )
    text_tok = y.reshape(-1) != tok.eot_id
    nats = nll[text_tok].double().sum().item()
    text = tok.decode([t for t in y.reshape(-1).tolist() if t != tok.eot_id])
    assert final["val_bpb"] == pytest.approx(nats / math.log(2) / len(text.encode("utf-8")), rel=1e-5)
    assert final["val_bpc"] == pytest.approx(nats / math.log(2) / len(text), rel=1e-5)
    assert final["val_loss"] == pytest.approx(nats / int(text_tok.sum()), rel=1e-5)


def test_tokenizer_mismatch_is_a_clear_error(tmp_path, capsys):
    data = make_dataset(tmp_path)
    other = tmp_path / "other"
    tiny_tokenizer(280).save(other)
    rc = main(
        [
            "pretrain",
            "--data",
            str(data),
            "--tokenizer",
            str(other),
            "--out",
            str(tmp_path / "x"),
            "--max-steps",
            "2",
            *NANO,
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "meta.json" in err and "re-run `chatstack data prepare`" in err
    rc = main(["pretrain", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x"), *NANO])
    assert rc == 2 and "nowhere: no such dataset directory" in capsys.readouterr().err


def test_batch_tokens_sets_accumulation(tmp_path):
    from chatstack.stages.pretrain import PretrainConfig, run

    data = make_dataset(tmp_path)
    cfg = PretrainConfig(
        data=str(data),
        out=str(tmp_path / "b"),
        preset="nano",
        block_size=32,
        batch_size=4,
        batch_tokens=4 * 32 * 3,
        max_steps=1,
        eval_every=0,
        progress=False,
        sample_tokens=0,
    )
    run(cfg)
    assert cfg.grad_accum == 3
    assert rows(tmp_path / "b")[0]["tokens"] == 4 * 32 * 3


# ---- subprocess tests: SIGKILL + resume, torchrun ---------------------------------------------------------
def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _cli(*args):
    return [sys.executable, "-m", "chatstack.cli", "pretrain", *args]


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_gives_the_uninterrupted_curve(tmp_path):
    data = make_dataset(tmp_path)
    common = [
        "--data",
        str(data),
        "--max-steps",
        "300",
        "--log-every",
        "1",
        "--eval-every",
        "50",
        "--save-every",
        "40",
        *NANO,
    ]
    subprocess.run(_cli("--out", str(tmp_path / "ref"), *common), env=_env(), check=True, capture_output=True)
    out = tmp_path / "run"
    p = subprocess.Popen(
        _cli("--out", str(out), *common), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    killed_at = None
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        m = out / "metrics.jsonl"
        if m.exists():
            steps = [json.loads(l)["step"] for l in m.read_text().splitlines() if l.strip().endswith("}")]
            if steps and max(steps) >= 130:
                p.send_signal(signal.SIGKILL)
                killed_at = max(steps)
                break
        time.sleep(0.02)
    p.wait()
    assert killed_at is not None and killed_at < 300, "the run finished before it could be killed"
    subprocess.run(_cli("--out", str(out), "--resume", *common), env=_env(), check=True, capture_output=True)
    assert curve(out) == curve(tmp_path / "ref")  # exactly, step by step
    ev = lambda p: [(r["step"], r["val_loss"]) for r in rows(p) if "val_loss" in r]
    assert ev(out) == ev(tmp_path / "ref")


def _torchrun(n, *args):
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={n}",
        "-m",
        "chatstack.cli",
        "pretrain",
        *args,
    ]


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tmp_path):
    data = make_dataset(tmp_path)
    common = ["--data", str(data), "--max-steps", "12", "--log-every", "1", "--eval-every", "6", *NANO]
    subprocess.run(
        _cli("--out", str(tmp_path / "one"), "--grad-accum", "2", *common), env=_env(), check=True, capture_output=True
    )
    r = subprocess.run(
        _torchrun(2, "--out", str(tmp_path / "two"), "--grad-accum", "1", *common),
        env=_env(),
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = curve(tmp_path / "one"), curve(tmp_path / "two")
    assert [s for s, _ in one] == [s for s, _ in two] == list(range(1, 13))
    for (_, a), (_, b) in zip(one, two):
        assert a == pytest.approx(b, rel=1e-4)
    ev = lambda p: [r["val_loss"] for r in rows(p) if "val_loss" in r]
    assert ev(tmp_path / "one") == pytest.approx(ev(tmp_path / "two"), rel=1e-4)
    assert rows(tmp_path / "two")[0]["tokens"] == 2 * 4 * 32  # tokens counted over both ranks


@pytest.mark.slow
def test_fsdp_smoke_on_gloo(tmp_path):
    data = make_dataset(tmp_path)
    common = [
        "--data",
        str(data),
        "--max-steps",
        "6",
        "--log-every",
        "1",
        "--eval-every",
        "3",
        "--save-every",
        "3",
        *NANO,
    ]
    r = subprocess.run(
        _torchrun(2, "--out", str(tmp_path / "fsdp"), "--parallel", "fsdp", *common),
        env=_env(),
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    subprocess.run(
        _cli("--out", str(tmp_path / "one"), "--grad-accum", "2", *common), env=_env(), check=True, capture_output=True
    )
    for (s1, a), (s2, b) in zip(curve(tmp_path / "one"), curve(tmp_path / "fsdp")):
        assert s1 == s2 and a == pytest.approx(b, rel=1e-4)
    ck = load_checkpoint(tmp_path / "fsdp", with_state=True)
    ref = load_checkpoint(tmp_path / "one")
    for (n, p), (_, q) in zip(ck.model.named_parameters(), ref.model.named_parameters()):
        assert torch.allclose(p, q, atol=1e-4), n


def test_pretrain_init_continues_from_a_checkpoint(tmp_path, capsys):
    data = make_dataset(tmp_path)
    first = tmp_path / "base"
    assert main(["pretrain", "--data", str(data), "--out", str(first), "--max-steps", "4", *NANO]) == 0
    start = load_checkpoint(first).model.state_dict()
    second = tmp_path / "more"
    # --init: the starting checkpoint's architecture and weights (the preset flags are ignored)
    rc = main(
        [
            "pretrain",
            "--data",
            str(data),
            "--out",
            str(second),
            "--max-steps",
            "1",
            "--lr",
            "0",
            "--min-lr",
            "0",
            "--init",
            str(first),
            "--preset",
            "tiny",
        ]
    )
    assert rc == 0
    ck = load_checkpoint(second)
    assert ck.config["parent"] == str(first) and ck.config["model"] == load_checkpoint(first).config["model"]
    for k, v in ck.model.state_dict().items():  # lr 0: the weights are the starting ones
        torch.testing.assert_close(v, start[k])
    capsys.readouterr()
    other = make_dataset(tmp_path, name="other", vocab_size=280)
    assert main(["pretrain", "--data", str(other), "--out", str(tmp_path / "x"), "--init", str(first)]) == 2
    assert "--init" in capsys.readouterr().err
