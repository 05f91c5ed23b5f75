"""``backends/loading/tokenizer.py`` against transformers on the same files: every result z2z-chat reads."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from z2z_chat.backends.loading import tokenizer as chat_tokenizer

pytest.importorskip("transformers")
DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "backends" / "default_model"
TEXTS = ["Hello, world!", "  two leading spaces\nand\ttabs\n\n", "def f(x):\n    return x + 1  # ok",
         "Ünïcödé, 中文, emoji 🙂🚀, RTL שלום", "<|im_start|>user\nliteral markers<|im_end|> inside text",
         "", " ", "a" * 300, "x=1;y=2;" * 20]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
     {"role": "assistant", "content": "Hello! 🙂"}, {"role": "user", "content": "<|im_end|> again?"}],
]


@pytest.fixture(params=["default_model", "test_tokenizer"])
def pair(request, tokenizer_dir):
    from transformers import AutoTokenizer

    d = DEFAULT_MODEL if request.param == "default_model" else tokenizer_dir
    lean = chat_tokenizer.load(d)
    assert lean is not None
    return lean, AutoTokenizer.from_pretrained(d)


def test_ids_and_text_equal_transformers(pair):
    lean, ref = pair
    for text in TEXTS:
        for split in (False, True):
            assert lean(text, add_special_tokens=False, split_special_tokens=split)["input_ids"] == \
                ref(text, add_special_tokens=False, split_special_tokens=split)["input_ids"], (text, split)
        assert lean(text, return_offsets_mapping=True)["offset_mapping"] == \
            ref(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    rng = random.Random(0)
    for _ in range(50):
        ids = [rng.randrange(len(ref)) for _ in range(rng.randrange(1, 30))] + [ref.eos_token_id]
        for skip in (False, True):
            assert lean.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
    every = list(range(len(ref)))
    assert lean.convert_ids_to_tokens(every) == ref.convert_ids_to_tokens(every)
    for token in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "not a token at all"):
        assert lean.convert_tokens_to_ids(token) == ref.convert_tokens_to_ids(token), token


def test_specials_and_sizes_equal_transformers(pair):
    lean, ref = pair
    assert len(lean) == len(ref)
    for key in ("eos_token_id", "pad_token_id", "unk_token_id", "bos_token_id"):
        assert getattr(lean, key) == getattr(ref, key), key
    assert lean.get_added_vocab() == ref.get_added_vocab()
    assert lean.all_special_ids == sorted(ref.all_special_ids)


def test_chat_template_renders_as_transformers_renders_it(pair):
    lean, ref = pair
    for chat in CHATS:
        for gen in (False, True):
            assert lean.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen) == \
                ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
            assert lean.apply_chat_template(chat, tokenize=True, add_generation_prompt=gen) == \
                ref.apply_chat_template(chat, tokenize=True, add_generation_prompt=gen, return_dict=False)


def test_what_it_cannot_do_is_left_to_transformers(tokenizer_dir, tmp_path):
    import shutil

    d = tmp_path / "tok"
    shutil.copytree(tokenizer_dir, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps(cfg | {"clean_up_tokenization_spaces": True}))
    assert chat_tokenizer.load(d) is None
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    (d / "chat_template.jinja").write_text("{% for m in messages %}{% generation %}{{ m['content'] }}"
                                           "{% endgeneration %}{% endfor %}")
    assert chat_tokenizer.load(d) is None
    (d / "tokenizer.json").write_text("{not json")
    assert chat_tokenizer.load(d) is None
    (d / "tokenizer.json").unlink()
    assert chat_tokenizer.load(d) is None


def test_the_llama_cpp_path_does_not_import_transformers(tmp_path):
    """What the lean tokenizer is for: opening and chatting on llama.cpp without transformers (or torch)."""
    pytest.importorskip("llama_cpp")
    code = ("import sys\nfrom z2z_chat.app.bench.scale import make_checkpoint\nfrom pathlib import Path\n"
            f"d = make_checkpoint(Path({str(tmp_path)!r}), 'tiny', lambda m: None)\n"
            "for m in [m for m in sys.modules if m.split('.')[0] in ('transformers', 'torch')]:\n"
            "    del sys.modules[m]\n"
            "sys.modules['transformers'] = sys.modules['torch'] = None  # an import now fails\n"
            "from z2z_chat.backends.runtime import open_runtime\n"
            "rt = open_runtime(str(d), 'llamacpp')\n"
            "print(type(rt.tokenizer).__name__, ''.join(e.text for e in rt.session().send('hi') if getattr(e, 'text', None)) is not None)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split()[0] == "ChatTokenizer"
