"""Does each conditioned task keep its own accuracy? A finished run's sources against their DisTaC students,
on the run's subsamples and on every held-out example (issue 15, deliverable 1).

The pipeline measures a conditioned student on the run's validation subsample (``data.max_eval``, 160 in the
default run), where one example is 0.6 points. This script evaluates the fine-tuned source and its conditioned
student (θ_pre + τ′ with the source's own head) on the whole validation split and the whole test split of
every task the run conditioned, and reports the difference on each and on both pooled:

    .venv/bin/python benchmarks/conditioned_sources.py --params params.yaml \
        --json benchmarks/results/conditioned_sources.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def accuracies(model, data, collate) -> dict[str, tuple[float, int]]:
    """Accuracy (%) and size of the validation and test splits."""
    from distac.evaluation import evaluate_task

    return {split: (100 * evaluate_task(model, getattr(data, split), collate).accuracy, len(getattr(data, split)))
            for split in ("validation", "test")}


def every_held_out_example(params):
    """``params`` with no cap on the validation and test examples (``data.max_eval``)."""
    return params.model_copy(update={"data": params.data.model_copy(update={"max_eval": None})})


def measure(params_path: str) -> dict:
    import torch

    from distac.pipeline.params import load_params
    from distac.pipeline.stages import task_data
    from distac.pipeline.store import RunStore

    torch.set_num_threads(1)
    params = load_params(params_path)
    everything = every_held_out_example(params)
    store = RunStore.of(params)
    pretrained = store.pretrained_backbone()
    rows = {}
    for task in store.conditioned_tasks():
        loaded = store.task_model(task)
        samples = {"subsample": task_data(params, task), "all": task_data(everything, task)}  # loaded once
        measured = {}
        for model_name, vector in (("source", None), ("conditioned", store.conditioned_vector(task))):
            if vector is not None:
                loaded.model.load_backbone(vector.apply_to(pretrained))
            measured[model_name] = {sample: accuracies(loaded.model, data, loaded.adapter.collate)
                                    for sample, data in samples.items()}
        rows[task] = measured
    return rows


def format_table(rows: dict) -> str:
    lines = ["| task | examples | split | source | conditioned | difference |", "|---|---|---|---|---|---|"]
    for task, measured in rows.items():
        for sample in ("subsample", "all"):
            source, student = measured["source"][sample], measured["conditioned"][sample]
            for split in ("validation", "test"):
                (a, n), (b, _) = source[split], student[split]
                lines.append(f"| {task} | {sample} ({n}) | {split} | {a:.1f} | {b:.1f} | {b - a:+.1f} |")
            total = sum(n for _, n in source.values())
            pooled = [sum(acc * n for acc, n in side.values()) / total for side in (source, student)]
            lines.append(f"| {task} | {sample} ({total}) | pooled | {pooled[0]:.1f} | {pooled[1]:.1f} | "
                         f"{pooled[1] - pooled[0]:+.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml", help="the finished run's params file")
    parser.add_argument("--json", help="also write the measurements here")
    args = parser.parse_args(argv)
    rows = measure(args.params)
    if not rows:
        print("the run conditioned no task (or has not run yet)")
        return 1
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"params": args.params, "tasks": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
