"""Chat conversations whose replies reuse the conversation: data for default model v2.

A zip2zip model only writes a hypertoken when it has learnt that the sequence it is about to
write already occurred in the conversation. This script writes multi-turn ChatML conversations
(``{"messages": [...]}`` per line, rendered with the model's chat template by ``train/data.py``)
in which the assistant repeats, edits, reformats or quotes text from earlier turns, with exact
answers computed by program, so every reply is right by construction:

- code (functions cut from the Python standard library's training files): repeat, rename an
  identifier, replace an expression, wrap in a fence, then a follow-up edit of the result;
- lists and records: JSON array, sorted lines, numbered list, Markdown table, CSV, YAML, reversed;
- sentences in English, French, German, Spanish, Chinese, Japanese, Korean and emoji: repeat N
  times, one per line, upper case, quote the first or last sentence;
- follow-ups: capitals and arithmetic where the second question must be answered, not the first.

Material comes from files this machine has: the standard library, the man pages that
``smollm2_default_data.py`` renders (its ``english.jsonl`` / ``multilingual.jsonl``) and the CJK man
pages. Files held out by ``smollm2_default_data.py`` are not used, and the published evaluation
prompts (``backends/default_model/eval/prompts.jsonl``) are kept out: their texts, word lists and
countries do not occur here (checked at the end).

Usage: python train/recipes/chat_reuse_data.py OUT_DIR --v0-data out/smollm2-data [--n 6000]
"""

from __future__ import annotations

import argparse
import ast
import json
import keyword
import random
import re
import subprocess
import sys
import sysconfig
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from smollm2_default_data import heldout  # noqa: E402

Messages = list[dict[str, str]]

# Kept out because the evaluation set uses them.
EVAL_WORDS = {"apples", "bananas", "cherries", "dates", "elderberries", "France", "Japan", "Italy",
              "Paris", "Tokyo", "Rome", "area", "perimeter", "quick brown fox", "hello world", "Ada"}

CAPITALS = {
    "Germany": "Berlin", "Spain": "Madrid", "Portugal": "Lisbon", "Austria": "Vienna", "Poland": "Warsaw",
    "Greece": "Athens", "Sweden": "Stockholm", "Norway": "Oslo", "Finland": "Helsinki", "Denmark": "Copenhagen",
    "Ireland": "Dublin", "Belgium": "Brussels", "the Netherlands": "Amsterdam", "Hungary": "Budapest",
    "the Czech Republic": "Prague", "Egypt": "Cairo", "Kenya": "Nairobi", "Nigeria": "Abuja", "Morocco": "Rabat",
    "Canada": "Ottawa", "Mexico": "Mexico City", "Brazil": "Brasília", "Argentina": "Buenos Aires",
    "Peru": "Lima", "Chile": "Santiago", "China": "Beijing", "India": "New Delhi", "South Korea": "Seoul",
    "Thailand": "Bangkok", "Vietnam": "Hanoi", "Indonesia": "Jakarta", "Australia": "Canberra",
    "New Zealand": "Wellington", "Turkey": "Ankara", "Russia": "Moscow", "Ukraine": "Kyiv",
    "the United Kingdom": "London", "the United States": "Washington, D.C.", "Switzerland": "Bern",
    "Iceland": "Reykjavík",
}
ITEMS = {
    "colours": ["red", "orange", "yellow", "green", "blue", "indigo", "violet", "purple", "teal", "crimson"],
    "animals": ["otter", "badger", "falcon", "walrus", "lynx", "heron", "gecko", "bison", "panda", "koala"],
    "vegetables": ["carrots", "leeks", "onions", "peppers", "radishes", "spinach", "turnips", "kale", "celery"],
    "cities": ["Lyon", "Porto", "Krakow", "Ghent", "Bergen", "Graz", "Seville", "Turin", "Leipzig", "Utrecht"],
    "tools": ["hammer", "chisel", "wrench", "pliers", "saw", "drill", "level", "file", "clamp", "trowel"],
    "metals": ["iron", "copper", "zinc", "nickel", "cobalt", "silver", "tin", "lead", "titanium", "platinum"],
}
NAMES = ["Grace", "Alan", "Linus", "Edsger", "Barbara", "Donald", "Margaret", "Ken", "Dennis", "Guido",
         "Frances", "John", "Katherine", "Niklaus", "Hedy", "Claude", "Radia", "Tim", "Sophie", "Karen"]
FIELDS = ["compilers", "networks", "databases", "graphics", "cryptography", "operating systems", "logic"]
EMOJI = ["😀", "😂", "😍", "🤔", "😎", "🙃", "😴", "🥳", "👍", "👋", "🙏", "💪", "🎉", "🔥", "⭐", "🌈",
         "🌙", "☀️", "🍕", "🍣", "🍩", "☕", "🐱", "🐶", "🦊", "🐢", "🌸", "🌲", "⚽", "🎸", "📚", "💡",
         "✈️", "🚲", "🏠", "⏰", "❤️", "💙", "✅", "❌"]
REPEAT_ASK = {
    "en": ["Repeat this text {n} times:", "Write the following {n} times:", "Say this {n} times, please:"],
    "fr": ["Répète ce texte {n} fois :", "Écris la phrase suivante {n} fois :"],
    "de": ["Wiederhole diesen Text {n} Mal:", "Schreibe den folgenden Satz {n} Mal:"],
    "es": ["Repite este texto {n} veces:", "Escribe la siguiente frase {n} veces:"],
    "zh": ["把下面这段话重复{n}遍：", "请将这句话写{n}次："],
    "ja": ["次の文を{n}回繰り返してください：", "この文を{n}回書いてください："],
    "ko": ["다음 문장을 {n}번 반복하세요:", "이 문장을 {n}번 써 주세요:"],
}
REPEAT_REPLY = {"en": "Here it is {n} times:", "fr": "Voici le texte {n} fois :", "de": "Hier ist der Text {n} Mal:",
                "es": "Aquí está {n} veces:", "zh": "好的，重复{n}遍：", "ja": "{n}回繰り返します：",
                "ko": "{n}번 반복합니다:"}


class Material:
    """Code snippets and sentences per language, from the files this machine has."""

    def __init__(self, v0_data: Path):
        self.functions = stdlib_functions()
        self.renamable = [f for f in self.functions if len(identifiers(f)) >= 2]
        self.sentences = {"en": [], "fr": [], "de": [], "es": [], "zh": [], "ja": [], "ko": []}
        for line in open(v0_data / "english.jsonl"):
            self.sentences["en"] += sentences(json.loads(line)["text"])
        for line in open(v0_data / "multilingual.jsonl"):
            text = json.loads(line)["text"]
            self.sentences[guess_language(text)] += sentences(text)
        for lang, d in (("zh", "zh_CN"), ("ja", "ja"), ("ko", "ko")):
            for p in sorted(Path("/usr/share/man", d).glob("man*/*.gz")):
                if not heldout(p.name):
                    self.sentences[lang] += sentences(render_cjk_man(p), lang)
        for lang, s in self.sentences.items():
            self.sentences[lang] = sorted({x for x in s if not any(w in x for w in EVAL_WORDS)})
            if not self.sentences[lang]:
                raise SystemExit(f"no {lang} sentences found; is {v0_data} the output of smollm2_default_data.py?")

    def sentence(self, rng: random.Random, lang: str = "en", k: int = 1) -> str:
        i = rng.randrange(len(self.sentences[lang]) - k)
        sep = "" if lang in ("zh", "ja") else " "
        return sep.join(self.sentences[lang][i:i + k])


def render_cjk_man(path: Path) -> str:
    """The page as text ("" when man fails or hangs on it, as one Japanese page does here)."""
    try:
        r = subprocess.run(["man", "-l", str(path)], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                           env={"MANWIDTH": "80", "LANG": "C.UTF-8", "PATH": "/usr/bin:/bin"}, timeout=10)
    except subprocess.TimeoutExpired:
        return ""
    return subprocess.run(["col", "-bx"], input=r.stdout, capture_output=True, text=True).stdout


def stdlib_functions() -> list[str]:
    """Top-level functions of 4-30 lines from the stdlib files the v0 recipe trains on."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for p in sorted(root.rglob("*.py")):
        if any(part in ("test", "tests", "idlelib", "lib2to3", "site-packages") for part in p.parts) or heldout(p.name):
            continue
        src = p.read_text(encoding="utf-8", errors="replace")
        try:
            tree = ast.parse(src)
        except SyntaxError:
            continue
        lines = src.splitlines()
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and 4 <= node.end_lineno - node.lineno + 1 <= 30:
                code = "\n".join(lines[node.lineno - 1:node.end_lineno])
                if "\t" not in code and not any(w in code for w in EVAL_WORDS):
                    out.append(code)
    return out


SENTENCE = re.compile(r"[^.!?。！？\n]{20,220}[.!?。！？]")
CJK = re.compile(r"[\u3040-\u30ff\u4e00-\u9fff\uac00-\ud7af]")


def sentences(text: str, lang: str = "en") -> list[str]:
    if lang in ("zh", "ja"):  # no spaces between words: lines join directly
        flat = re.sub(r"\s*\n\s*", "", text)
    else:  # Korean man pages are justified with runs of spaces
        flat = re.sub(r"\s*\n\s*", " ", text)
        flat = re.sub(r" {2,}", " ", flat) if lang == "ko" else flat
    out = []
    for s in (x.strip() for x in SENTENCE.findall(flat)):
        if "  " in s or re.search(r"[<>{}\\|_=]|--|\.\w", s):  # formatting debris, options, file names
            continue
        if CJK.search(s) if lang in ("zh", "ja", "ko") else s[0].isupper():
            out.append(s)
    return out


def guess_language(text: str) -> str:
    words = re.findall(r"\w+", text.lower()[:4000])
    score = {lang: sum(words.count(w) for w in ws) for lang, ws in
             {"fr": ("le", "la", "les", "des", "est"), "de": ("der", "die", "und", "das", "ist"),
              "es": ("el", "los", "las", "del", "es")}.items()}
    return max(score, key=score.get)


def fence(code: str) -> str:
    return f"```python\n{code}\n```"


def identifiers(code: str) -> list[str]:
    """Parameters and assigned local names used at least twice: good rename targets."""
    node = ast.parse(code).body[0]
    names = {a.arg for a in ast.walk(node.args) if isinstance(a, ast.arg)} - {"self", "cls"}
    names |= {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    return sorted(n for n in names if len(n) > 2 and len(re.findall(rf"\b{n}\b", code)) >= 2)


def new_name(old: str, rng: random.Random) -> str:
    return rng.choice([old[0], old[:3], f"{old}_value", f"the_{old}", old.upper(), f"new_{old}", f"{old}2"])


def rename(code: str, old: str, new: str) -> str:
    return re.sub(rf"\b{re.escape(old)}\b", new, code)


# Each task returns the messages of one conversation (user and assistant turns alternating).

def code_repeat(m: Material, rng: random.Random) -> Messages:
    code = rng.choice(m.functions)
    ask = rng.choice(["Repeat this code exactly:", "Copy this function exactly, in a code block:",
                      "Show this code again, unchanged:"])
    return [{"role": "user", "content": f"{ask}\n\n{code}"},
            {"role": "assistant", "content": f"Here is the code, unchanged:\n\n{fence(code)}"}]


def code_rename(m: Material, rng: random.Random, turns: int = 1) -> Messages:
    code = rng.choice(m.renamable)
    msgs: Messages = []
    for _ in range(turns):
        names = identifiers(code)
        if not names:
            break
        old = rng.choice(names)
        new = new_name(old, rng)
        if keyword.iskeyword(new) or re.search(rf"\b{re.escape(new)}\b", code):  # taken: would merge two names
            continue
        before, code = code, rename(code, old, new)
        ask = (rng.choice(["Rename {o} to {n} in this code and show the whole code:",
                           "In the following function, rename `{o}` to `{n}`. Show the full result.",
                           "Please rename the variable {o} to {n}:"]).format(o=old, n=new)
               + f"\n\n{before}") if not msgs else \
            rng.choice(["Now rename {o} to {n} in it and show the whole code.", "Also rename `{o}` to `{n}`.",
                        "Next, rename {o} to {n} as well."]).format(o=old, n=new)
        msgs += [{"role": "user", "content": ask},
                 {"role": "assistant", "content": f"Here is the code with `{old}` renamed to `{new}`:\n\n{fence(code)}"}]
    return msgs or code_repeat(m, rng)


def code_replace(m: Material, rng: random.Random) -> Messages:
    code = rng.choice(m.functions)
    exprs = sorted({e for e in re.findall(r"\b\w+ (?:[-+*<>]|==|!=|<=|>=) \w+\b", code)})
    if not exprs:
        return code_repeat(m, rng)
    old = rng.choice(exprs)
    a, op, b = old.split(" ", 2)
    new = f"{b} {op} {a}" if op in ("+", "*", "==", "!=") else f"({old})"
    done = code.replace(old, new)
    return [{"role": "user", "content": f"In this code, replace `{old}` with `{new}` and show the whole code:\n\n{code}"},
            {"role": "assistant", "content": f"Here is the updated code:\n\n{fence(done)}"}]


def code_then_question(m: Material, rng: random.Random) -> Messages:
    code = rng.choice(m.functions)
    node = ast.parse(code).body[0]
    name, params = node.name, ast.unparse(node.args)
    first = code.splitlines()[0]
    return [{"role": "user", "content": f"Here is some code:\n\n{code}"},
            {"role": "assistant", "content": f"This defines the function `{name}`. Its first line is:\n\n{fence(first)}"},
            {"role": "user", "content": rng.choice(["What are its parameters?", "Which parameters does it take?"])},
            {"role": "assistant", "content": f"`{name}` takes these parameters: `{params}`." if params.strip()
             else f"`{name}` takes no parameters."},
            {"role": "user", "content": "Show the whole function again."},
            {"role": "assistant", "content": fence(code)}]


def record(rng: random.Random) -> dict[str, object]:
    return {"name": rng.choice(NAMES), "year": rng.randrange(1900, 2000), "field": rng.choice(FIELDS)}


def list_task(m: Material, rng: random.Random) -> Messages:
    kind = rng.choice(sorted(ITEMS))
    items = rng.sample(ITEMS[kind], rng.randrange(4, 9))
    given = ", ".join(items)
    task = rng.choice(["json", "sorted", "numbered", "table", "reversed", "upper", "csv"])
    ask, reply = {
        "json": ("Convert this list to a JSON array of strings: {g}", "```json\n" + json.dumps(items) + "\n```"),
        "sorted": ("Sort these words alphabetically, one per line: {g}", "\n".join(sorted(items))),
        "numbered": ("Make a numbered list of these {k}: {g}", "\n".join(f"{i}. {x}" for i, x in enumerate(items, 1))),
        "table": (f"Make a Markdown table with one column '{kind}' and one row per item: {{g}}",
                  f"| {kind} |\n|---|\n" + "\n".join(f"| {x} |" for x in items)),
        "reversed": ("Write these {k} in reverse order, separated by commas: {g}", ", ".join(reversed(items))),
        "upper": ("Write these {k} in upper case: {g}", ", ".join(x.upper() for x in items)),
        "csv": ("Put these {k} on one CSV line: {g}", ",".join(items)),
    }[task]
    msgs = [{"role": "user", "content": ask.format(g=given, k=kind)}, {"role": "assistant", "content": reply}]
    if rng.random() < 0.5:  # a follow-up on the same items
        msgs += [{"role": "user", "content": "Now sort them alphabetically, one per line."},
                 {"role": "assistant", "content": "\n".join(sorted(items))}]
    return msgs


def record_task(m: Material, rng: random.Random) -> Messages:
    r = record(rng)
    py = repr(r)
    task = rng.choice(["yaml", "json"])
    if task == "yaml":
        return [{"role": "user", "content": f"Convert this Python dictionary to YAML:\n\n{py}"},
                {"role": "assistant", "content": "```yaml\n" + "\n".join(f"{k}: {v}" for k, v in r.items()) + "\n```"}]
    return [{"role": "user", "content": f"Convert this Python dictionary to JSON:\n\n{py}"},
            {"role": "assistant", "content": "```json\n" + json.dumps(r, indent=2) + "\n```"}]


def repeat_text(m: Material, rng: random.Random) -> Messages:
    lang = rng.choice(["en", "en", "fr", "de", "es", "zh", "ja", "ko", "emoji"])
    n = rng.randrange(2, 6)
    if lang == "emoji":
        text = "".join(rng.sample(EMOJI, rng.randrange(3, 7)))
        ask, head = f"Repeat these emoji {n} times:", f"Here they are {n} times:"
    else:
        text = m.sentence(rng, lang, rng.randrange(1, 3))
        ask, head = rng.choice(REPEAT_ASK[lang]).format(n=n), REPEAT_REPLY[lang].format(n=n)
    sep = "\n" if rng.random() < 0.6 else " "
    return [{"role": "user", "content": f"{ask} {text}"}, {"role": "assistant", "content": f"{head}\n\n" + sep.join([text] * n)}]


def lines_task(m: Material, rng: random.Random) -> Messages:
    code_line = rng.choice([ln.strip() for f in rng.sample(m.functions, 5) for ln in f.splitlines()[1:] if len(ln.strip()) > 12])
    n = rng.randrange(3, 7)
    return [{"role": "user", "content": f"Repeat exactly, {n} times, one per line: {code_line}"},
            {"role": "assistant", "content": "\n".join([code_line] * n)}]


def sentence_task(m: Material, rng: random.Random) -> Messages:
    parts = [m.sentence(rng, "en") for _ in range(rng.randrange(2, 4))]
    text = " ".join(parts)
    task = rng.choice(["upper", "first", "last", "lines"])
    ask, reply = {
        "upper": ("Rewrite this text in upper case:", text.upper()),
        "first": ("Quote the first sentence of this text exactly:", f'"{parts[0]}"'),
        "last": ("Quote the last sentence of this text exactly:", f'"{parts[-1]}"'),
        "lines": ("Put each sentence of this text on its own line:", "\n".join(parts)),
    }[task]
    return [{"role": "user", "content": f"{ask} {text}"}, {"role": "assistant", "content": reply}]


def capitals(m: Material, rng: random.Random) -> Messages:
    countries = rng.sample(sorted(CAPITALS), rng.randrange(2, 4))
    first = countries[0]
    msgs = [{"role": "user", "content": f"What is the capital of {first}?"},
            {"role": "assistant", "content": f"The capital of {first} is {CAPITALS[first]}."}]
    for c in countries[1:]:
        ask = rng.choice([f"What is the capital of {c}?", f"And of {c}?", f"And the capital of {c}?"])
        msgs += [{"role": "user", "content": ask}, {"role": "assistant", "content": f"The capital of {c} is {CAPITALS[c]}."}]
    return msgs


def arithmetic(m: Material, rng: random.Random) -> Messages:
    a, b, c = rng.randrange(3, 50), rng.randrange(3, 50), rng.choice([2, 3, 4, 5, 6, 7, 8, 9, 11, 12])  # not the eval set's 2 + 2, x10
    s = a + b
    op = rng.choice(["Multiply that by {c}.", "Now add {c} to that.", "Subtract {c} from that."]).format(c=c)
    r = {"M": s * c, "N": s + c, "S": s - c}[op[0]]
    sym = {"M": "×", "N": "+", "S": "-"}[op[0]]
    return [{"role": "user", "content": f"What is {a} + {b}?"}, {"role": "assistant", "content": f"{a} + {b} = {s}."},
            {"role": "user", "content": op}, {"role": "assistant", "content": f"{s} {sym} {c} = {r}."}]


TASKS: list[tuple[Callable[[Material, random.Random], Messages], float]] = [
    (code_repeat, 1.0), (lambda m, r: code_rename(m, r, r.randrange(1, 4)), 2.0), (code_replace, 1.0),
    (code_then_question, 1.0), (list_task, 1.5), (record_task, 0.5), (repeat_text, 2.5), (lines_task, 0.5),
    (sentence_task, 1.5), (capitals, 0.7), (arithmetic, 0.7),
]


def conversations(m: Material, n: int, rng: random.Random) -> list[Messages]:
    """n conversations; most are one task, some chain two unrelated tasks in one conversation
    (the app keeps one codebook across a chat's turns, so training does too)."""
    fns, weights = zip(*TASKS)
    out = []
    for _ in range(n):
        msgs = rng.choices(fns, weights)[0](m, rng)
        if rng.random() < 0.3:
            msgs += rng.choices(fns, weights)[0](m, rng)
        out.append(msgs)
    return out


def check_eval_kept_out(convs: list[Messages], eval_file: Path) -> None:
    prompts = [t for line in open(eval_file) for t in json.loads(line)["turns"]]
    users = {msg["content"] for c in convs for msg in c if msg["role"] == "user"}
    clash = users & set(prompts)
    if clash:
        raise SystemExit(f"evaluation prompts leaked into the training data: {sorted(clash)[:3]}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--v0-data", default="out/smollm2-data", help="output of smollm2_default_data.py")
    ap.add_argument("--n", type=int, default=6000, help="conversations")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    material = Material(Path(args.v0_data))
    print(f"material: {len(material.functions)} functions; sentences "
          + ", ".join(f"{k} {len(v)}" for k, v in material.sentences.items()), file=sys.stderr)
    convs = conversations(material, args.n, rng)
    check_eval_kept_out(convs, Path(__file__).resolve().parents[2] / "backends/default_model/eval/prompts.jsonl")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "chat_reuse.jsonl", "w") as f:
        for c in convs:
            f.write(json.dumps({"messages": c}, ensure_ascii=False) + "\n")
    print(f"wrote {len(convs)} conversations to {out / 'chat_reuse.jsonl'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
