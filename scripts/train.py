"""Train or fine-tune a looped MoE with `transformers.Trainer` (thin CLI over `training_looped_moe`).

    python scripts/train.py --preset tiny --text_files my.txt --max_steps 200 --output_dir outputs/train
    accelerate launch --cpu --num_processes 2 scripts/train.py --preset tiny --per_device_train_batch_size 4

Without `--text_files` / `--dataset_name` it trains on Python's own documentation. Every `TrainingArguments` option
works (`--help`); see docs/TRAINING.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run from a clone without installing: the repository root holds the one package, `modeling_looped_moe`.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from modeling_looped_moe.training_looped_moe import main

if __name__ == "__main__":
    raise SystemExit(main())
