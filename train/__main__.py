"""``python -m z2z_chat.train CONFIG [--key value ...]`` (also the ``z2z-train`` console script)."""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    rc = _run(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # One of several processes: everything is written and closed (the trainer destroys its
        # process group), but gloo's threads can still abort the interpreter's own exit
        # (std::terminate in a static destructor: exit -6, which fails the whole launch after a
        # good run, seen in CI twice). Leave without running those destructors.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    return rc


def _run(argv: list[str] | None) -> int:
    p = argparse.ArgumentParser(prog="z2z-train", description="Train a zip2zip model (LoRA + hyper-encoders).",
                                epilog="Overrides: --optim.steps 200 --data.seq_len 256 --lora.r 8 ... "
                                       "Many GPUs: accelerate launch -m train CONFIG")
    p.add_argument("config", help="TOML or YAML config (see train/recipes/)")
    args, overrides = p.parse_known_args(argv)
    from z2z_chat.backends.errors import Z2ZError, needs_extra

    from z2z_chat.train.config import TrainConfigError, load_config

    try:
        cfg = load_config(args.config, overrides)
        try:
            from z2z_chat.train.trainer import train

            final = train(cfg)
        except ModuleNotFoundError as e:
            raise needs_extra(e, "training", "train") from None
    except Z2ZError as e:
        print(f"z2z-train: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, TrainConfigError) else 1
    except KeyboardInterrupt:
        print("z2z-train: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    if os.environ.get("RANK", "0") == "0":
        print(f"{'final checkpoint' if final.name == 'final' else 'checkpoint'}: {final}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
