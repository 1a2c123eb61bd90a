"""Try one fine-tuning recipe for one task of the paper benchmark, on every held-out example (issue 15).

Fine-tunes the task on the benchmark's training data (setting and seed as given) with the recipe from the
command line, then reports accuracy, Matthews correlation and the majority-class rate on the whole
validation and test splits, not the benchmark's 250-example subsamples, so a recipe's gain over the
majority rate is measured on all the data there is:

    .venv/bin/python benchmarks/source_recipe.py --task cola --lr 5e-5 --steps 1600
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def measure(task: str, lr: float, steps: int, weight_decay: float, setting: str, seed: int) -> list[dict]:
    import torch

    from benchmarks.conditioned_sources import every_held_out_example
    from benchmarks.paper_report import majority_rate
    from benchmarks.paper_repro import load_plan, loaded_params
    from distac.evaluation import evaluate_task
    from distac.models import build_adapter
    from distac.pipeline.stages import task_data
    from distac.training import FinetuneRecipe, finetune

    torch.set_num_threads(1)
    params = loaded_params(load_plan(), setting, seed)
    data = task_data(every_held_out_example(params), task)
    adapter = build_adapter(params.model.adapter_spec())
    base = params.finetune
    recipe = FinetuneRecipe(lr=lr, steps=steps, batch_size=base.batch_size, weight_decay=weight_decay,
                            warmup_fraction=base.warmup_fraction, schedule=base.schedule, grad_clip=base.grad_clip,
                            seed=seed)
    start = time.perf_counter()
    model = finetune(adapter, data, recipe, progress=False).model
    minutes = (time.perf_counter() - start) / 60
    rows = []
    for split in ("validation", "test"):
        examples = getattr(data, split)
        majority = majority_rate(examples)
        evaluation = evaluate_task(model, examples, adapter.collate)
        rows.append({"task": task, "lr": lr, "steps": steps, "weight_decay": weight_decay, "setting": setting,
                     "seed": seed, "split": split, "examples": len(examples),
                     "accuracy": round(100 * evaluation.accuracy, 1), "mcc": round(evaluation.mcc, 3),
                     "majority": round(100 * majority, 1), "finetune_minutes": round(minutes, 1)})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True)
    parser.add_argument("--lr", type=float, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--setting", default="original", help="the benchmark setting whose data is used")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for row in measure(args.task, args.lr, args.steps, args.weight_decay, args.setting, args.seed):
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
