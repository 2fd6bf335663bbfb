"""Fuzz the server's OpenAPI schema with schemathesis: no input may produce a 5xx.

schemathesis generates valid and invalid requests for every operation in /openapi.json (coverage and
fuzzing phases) and fails on any server error. Slow (minutes on a busy 2-core machine): deselected by default.

    python -m pytest tests/test_serve_fuzz.py -q -m slow
"""

import shutil
import subprocess

import pytest

from chatstack.serve.app import create_app
from chatstack.serve.testing import LiveServer, make_tiny_checkpoint

SCHEMATHESIS = shutil.which("schemathesis") or shutil.which("st")


@pytest.mark.slow
@pytest.mark.skipif(SCHEMATHESIS is None, reason="pip install schemathesis")
def test_openapi_fuzz_finds_no_5xx(tmp_path):
    ckpt = make_tiny_checkpoint(tmp_path / "nano-chat", block_size=96)  # short context: fuzzed max_tokens stay cheap
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Hello"}\n')
    # any_model: random model ids reach the generation code instead of stopping at 404
    app = create_app(
        ckpt,
        api_keys=("sk-fuzz",),
        any_model=True,
        rankings=str(tmp_path / "rankings.jsonl"),
        rank_prompts=str(prompts),
    )
    with LiveServer(app) as srv:
        cmd = [
            SCHEMATHESIS,
            "run",
            srv.url + "/openapi.json",
            "--checks",
            "not_a_server_error",
            "-H",
            "Authorization: Bearer sk-fuzz",
            "--max-examples",
            "15",
            "--workers",
            "1",
            "--phases",
            "examples,coverage,fuzzing",
            "--request-timeout",
            "120",
            "--generation-deterministic",
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        metrics = srv.app.state.chatstack.metrics
        server_errors = {k: v for k, v in metrics.requests.values.items() if k[1].startswith("5")}
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert not server_errors, server_errors
    total = sum(metrics.requests.values.values())
    assert total > 200, f"the fuzzer sent only {total} requests"
