"""Data the project builds itself, offline: for the demo, the tests and benchmarks.

- `builtin:stdlib-docs`: real English prose, the docstrings of the installed Python standard
  library (read with `ast`, nothing imported), one document per module/class/function.
- `builtin:sft-tasks`: instruction pairs of varied lengths generated from a seed (arithmetic,
  spelling numbers, reversing, sorting, counting).
- `builtin:chat-tasks`: conversations of one to three of those exchanges, as chat messages.

Use them as `data.train=builtin:stdlib-docs`, or write them out:
`python -m toolkit.demo_data --out data/` (jsonl files, e.g. for `toolkit.evaluate --data`).
"""

from __future__ import annotations

import argparse
import ast
import json
import random
import sysconfig
from pathlib import Path

import datasets

MIN_CHARS = 200  # shorter docstrings are mostly one-liners ("Return self.")


def stdlib_docs():
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if any(p in ("site-packages", "test", "tests", "idlelib", "lib2to3") or p.startswith("_") and p != "__init__.py"
               for p in parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in [tree, *ast.walk(tree)]:
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= MIN_CHARS:
                    yield {"text": doc}


_ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen " \
        "sixteen seventeen eighteen nineteen".split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_WORDS = ("river mountain lantern harbor garden compass meadow pencil window orchard thunder violin "
          "marble candle forest bridge anchor feather island ribbon").split()


def _spell(n: int) -> str:
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else "-" + _ONES[n % 10])
    rest = n % 100
    return _ONES[n // 100] + " hundred" + ("" if rest == 0 else " " + _spell(rest))


def sft_tasks(n: int = 3000, seed: int = 0):
    rng = random.Random(seed)
    for _ in range(n):
        kind = rng.randrange(5)
        if kind == 0:
            a, b = rng.randrange(1000), rng.randrange(1000)
            yield {"prompt": f"What is {a} plus {b}?\nAnswer:", "response": f" {a} plus {b} is {a + b}."}
        elif kind == 1:
            k = rng.randrange(1000)
            yield {"prompt": f"Write the number {k} in words.\nAnswer:", "response": f" {_spell(k)}"}
        elif kind == 2:
            word = rng.choice(_WORDS)
            yield {"prompt": f"Reverse the letters of '{word}'.\nAnswer:", "response": f" {word[::-1]}"}
        elif kind == 3:
            nums = [rng.randrange(100) for _ in range(rng.randrange(2, 9))]
            yield {"prompt": f"Sort from smallest to largest: {', '.join(map(str, nums))}\nAnswer:",
                   "response": " " + ", ".join(map(str, sorted(nums)))}
        else:
            words = rng.sample(_WORDS, rng.randrange(1, 7))
            yield {"prompt": f"How many words are in this list: {' '.join(words)}?\nAnswer:",
                   "response": f" There are {_spell(len(words))} words: {', '.join(words)}."}


def chat_tasks(n: int = 1500, seed: int = 1):
    """Conversations of one to three sft-tasks exchanges (role/content messages), some with a system turn."""
    rng = random.Random(seed)
    pairs = sft_tasks(n * 3, seed)
    for _ in range(n):
        messages = [{"role": "system", "content": "You answer in one line."}] if rng.random() < 0.3 else []
        for _ in range(rng.randrange(1, 4)):
            pair = next(pairs)
            messages += [{"role": "user", "content": pair["prompt"].removesuffix("\nAnswer:")},
                         {"role": "assistant", "content": pair["response"].strip()}]
        yield {"messages": messages}


BUILTIN = {"stdlib-docs": stdlib_docs, "sft-tasks": sft_tasks, "chat-tasks": chat_tasks}


def load_builtin(name: str) -> datasets.Dataset:
    """A built-in data set by name (`datasets` caches it by the generator's fingerprint)."""
    from .config import UserError

    if name not in BUILTIN:
        raise UserError(f"unknown built-in data builtin:{name}; choose one of "
                        + ", ".join(f"builtin:{n}" for n in BUILTIN))
    return datasets.Dataset.from_generator(BUILTIN[name])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="toolkit.demo_data", description="Write the built-in data sets as jsonl.")
    parser.add_argument("--out", default="data", help="directory to write <name>.jsonl files into")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, generate in BUILTIN.items():
        path = out / f"{name}.jsonl"
        with path.open("w") as f:
            count = sum(f.write(json.dumps(row) + "\n") > 0 for row in generate())
        print(f"wrote {count} examples to {path}")


if __name__ == "__main__":
    main()
