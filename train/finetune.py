#!/usr/bin/env python3
"""Run a training recipe: the same as `smoljax train`.

    python train/finetune.py configs/tiny-smoke.yaml --set out_dir=runs/smoke --set steps=100 [--resume]

On several hosts, run this same command on every host (see the README's multi-host section).
"""

import sys

from smoljax.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
