"""Record the embedded default model's first greedy codes for a fixed prompt (torch, CPU, float32)
into ``backends/default_model/recorded_codes.json``; ``tests/test_default_model.py`` replays them.

Usage: python train/recipes/record_default_codes.py [N]
"""

from __future__ import annotations

import json
import sys

from z2z_chat.backends.loading.defaults import DEFAULT_MODEL_DIR
from z2z_chat.backends.engine.events import GenerationSettings, Token
from z2z_chat.backends.runtime import open_runtime

PROMPT = "What is the capital of France?"


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 16
    rt = open_runtime(None, "torch", "cpu", "float32")
    events = list(rt.session().send(PROMPT, GenerationSettings(max_tokens=n)))
    codes = [e.code for e in events if isinstance(e, Token) and e.code is not None]
    text = "".join(e.text for e in events if isinstance(e, Token))
    out = {"prompt": PROMPT, "backend": "torch cpu float32", "max_tokens": n, "codes": codes, "text": text}
    (DEFAULT_MODEL_DIR / "recorded_codes.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
