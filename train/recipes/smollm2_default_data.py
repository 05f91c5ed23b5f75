"""Offline training data for the embedded default model (zip2zip SmolLM2-135M-Instruct).

Everything comes from this Debian machine, plus answers the base model writes itself (so the
adapter keeps its instruct behaviour):

- ``code.jsonl``: Python standard-library sources;
- ``english.jsonl``: English man pages (rendered) and the Python language reference topics;
- ``multilingual.jsonl``: French, German and Spanish man pages;
- ``chat.jsonl``: ChatML conversations, the base model's greedy answers to generated prompts;
- ``heldout/{code,english,french}.txt``: held-out text for byte-level perplexity (never trained on).

Usage: python train/recipes/smollm2_default_data.py OUT_DIR [--chat-prompts N]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import subprocess
import sys
import sysconfig
from pathlib import Path

MAX_CHARS = 12_000  # longer documents are cut: many short ones beat a few huge ones here


def heldout(name: str, percent: int = 8) -> bool:
    return int(hashlib.sha256(name.encode()).hexdigest(), 16) % 100 < percent


def render_man(path: Path) -> str:
    r = subprocess.run(["man", "-l", str(path)], capture_output=True, text=True,
                       env={"MANWIDTH": "80", "LANG": "C.UTF-8", "PATH": "/usr/bin:/bin"}, timeout=30)
    col = subprocess.run(["col", "-bx"], input=r.stdout, capture_output=True, text=True)
    return col.stdout.strip()


def write_jsonl(path: Path, docs: list[str]) -> None:
    with open(path, "w") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")


def code_docs() -> tuple[list[str], list[str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    train, held = [], []
    for p in sorted(root.rglob("*.py")):
        if any(part in ("test", "tests", "idlelib", "lib2to3", "site-packages") for part in p.parts):
            continue
        text = p.read_text(encoding="utf-8", errors="replace")[:MAX_CHARS]
        if len(text) > 500:
            (held if heldout(p.name) else train).append(text)
    return train, held


def man_pages(lang_dir: str, limit: int, rng: random.Random) -> list[Path]:
    pages = sorted(Path("/usr/share/man", lang_dir).glob("man[158]/*.gz"))
    rng.shuffle(pages)
    return pages[:limit]


def prose_docs(rng: random.Random) -> tuple[list[str], list[str], list[str], list[str]]:
    eng, eng_held, multi, fr_held = [], [], [], []
    for p in man_pages("", 700, rng):
        t = render_man(p)[:MAX_CHARS]
        if len(t) > 400:
            (eng_held if heldout(p.name) else eng).append(t)
    from pydoc_data.topics import topics

    eng += [t[:MAX_CHARS] for t in topics.values() if len(t) > 400]
    for lang in ("fr", "de", "es"):
        for p in man_pages(lang, 400, rng):
            t = render_man(p)[:MAX_CHARS]
            if len(t) > 400:
                (fr_held if lang == "fr" and heldout(p.name, 15) else multi).append(t)
    return eng, eng_held, multi, fr_held


TASKS = ["reverses a string", "checks whether a number is prime", "computes the factorial of n",
         "returns the n-th Fibonacci number", "counts the words in a text", "removes duplicates from a list",
         "merges two sorted lists", "finds the largest element of a list", "converts Celsius to Fahrenheit",
         "checks whether a string is a palindrome", "reads a CSV file and prints each row",
         "sorts a list of dictionaries by a key", "flattens a nested list", "computes the mean and median",
         "counts character frequencies", "validates an email address with a regular expression",
         "implements binary search", "computes the greatest common divisor", "transposes a matrix",
         "parses a date string", "writes a list of lines to a file", "generates a random password",
         "implements a stack class", "implements a queue with two stacks", "returns the sum of digits",
         "checks if two strings are anagrams", "finds all files with a given extension in a directory",
         "downloads nothing but formats a table of numbers", "computes the power set of a list",
         "implements bubble sort", "implements quicksort", "computes a running average",
         "splits a list into chunks of size n", "counts vowels in a sentence", "capitalizes each word",
         "computes the dot product of two vectors", "checks balanced parentheses", "rotates a list by k",
         "converts a number to binary", "finds the second largest number"]
CONCEPTS = ["recursion", "a hash table", "photosynthesis", "gravity", "a linked list", "inflation",
            "the water cycle", "an API", "machine learning", "a database index", "encryption",
            "the internet", "a compiler", "version control with git", "object-oriented programming",
            "climate change", "the immune system", "a black hole", "electricity", "democracy",
            "a virtual machine", "unit testing", "the stock market", "vaccines", "the moon's phases",
            "a neural network", "Big O notation", "caching", "a REST API", "regular expressions"]
QUESTIONS = ["What is the capital of France?", "How many days are in a leap year?",
             "What is the boiling point of water?", "Who wrote Romeo and Juliet?",
             "What is the largest planet in the solar system?", "How do I make a cup of tea?",
             "Give me three tips for better sleep.", "What are the primary colors?",
             "How does a bicycle work?", "Why is the sky blue?", "What is 12 times 12?",
             "Name three programming languages.", "What does a CPU do?", "How do plants grow?",
             "Quelle est la capitale de l'Allemagne ?", "Wie spät ist es in Tokio, wenn es in Berlin Mittag ist?",
             "¿Cuál es el océano más grande?", "Explique ce qu'est une fonction en Python.",
             "Write a haiku about autumn.", "Write a short poem about the sea.",
             "Summarize the plot of Cinderella in three sentences.", "List five fruits.",
             "What is the difference between a list and a tuple in Python?",
             "How do I create a virtual environment in Python?", "What is a for loop?"]


def chat_prompts(n: int, rng: random.Random) -> list[str]:
    out = [f"Write a Python function that {t}." for t in TASKS]
    out += [f"Explain {c} in simple terms." for c in CONCEPTS]
    out += QUESTIONS
    out += [f"Write a short Python script that {t}, with a docstring and an example." for t in TASKS]
    rng.shuffle(out)
    return out[:n]


def generate_chat(prompts: list[str], gguf: Path, log) -> list[dict]:
    """The base model's greedy answers, written by llama.cpp (several times transformers' speed on a
    CPU: docs/BENCHMARKS.md) from the prompt as the tokenizer's chat template renders it."""
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    llm = Llama(str(gguf), n_ctx=1024, n_threads=os.cpu_count(), verbose=False, seed=0)
    records = []
    for i, p in enumerate(prompts, 1):
        prompt = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        out = llm.create_completion(prompt, max_tokens=220, temperature=0.0, repeat_penalty=1.1)
        answer = out["choices"][0]["text"].strip()
        records.append({"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": answer}]})
        if i % 8 == 0 or i == len(prompts):
            log(f"chat: {i}/{len(prompts)} answers")
    return records


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--chat-prompts", type=int, default=160)
    ap.add_argument("--gguf", help="SmolLM2 GGUF (default: the cached one)")
    args = ap.parse_args(argv)
    from z2z_chat.backends.loading.assets import smollm2_gguf

    out = Path(args.out)
    (out / "heldout").mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    code, code_held = code_docs()
    write_jsonl(out / "code.jsonl", code)
    (out / "heldout" / "code.txt").write_text("\n\n".join(code_held))
    log(f"code: {len(code)} train / {len(code_held)} held-out files")
    eng, eng_held, multi, fr_held = prose_docs(rng)
    write_jsonl(out / "english.jsonl", eng)
    write_jsonl(out / "multilingual.jsonl", multi)
    (out / "heldout" / "english.txt").write_text("\n\n".join(eng_held))
    (out / "heldout" / "french.txt").write_text("\n\n".join(fr_held))
    log(f"prose: {len(eng)} English, {len(multi)} fr/de/es; held out {len(eng_held)} English, {len(fr_held)} French")
    if args.chat_prompts:
        recs = generate_chat(chat_prompts(args.chat_prompts, rng), Path(args.gguf) if args.gguf else smollm2_gguf(), log)
        with open(out / "chat.jsonl", "w") as f:
            for r in recs:
                f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
