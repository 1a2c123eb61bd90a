"""Iso-C's α after DisTaC (issue 23.4): accuracy over a wide α grid, as-is and after DisTaC, on a finished run.

Iso-C replaces every singular value of Σ_t τ_t by their mean, so its merged vector's scale follows the sum's
spectrum: shrinking a long task vector (norm conditioning) shrinks the mean singular value, and the merged
update with it. If the α search's grid stops below the α the conditioned merge needs, Iso-C looks worse after
DisTaC for a reason that has nothing to do with the conditioned vectors. This script measures it on the
stored task vectors of a pipeline run (e.g. `make run`'s `runs/`): per variant, the merge at α = 1 (its norm),
then the mean validation accuracy and the mean normalized test accuracy at every α of a wide grid.

    .venv/bin/python -m benchmarks.iso_c_alpha --params params.yaml            # after `make run`
    .venv/bin/python -m benchmarks.iso_c_alpha --params params.yaml --methods iso_c task_arithmetic
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
WIDE_GRID = (0.5, 1.0, 1.5, 2.25, 3.0, 4.0, 5.0, 6.5, 8.0)


def measure(params_file: str, methods: list[str], grid: tuple[float, ...] = WIDE_GRID) -> dict[str, Any]:
    """Per method and variant: the α-1 merge's norm, and per α the validation mean and test normalized means."""
    from distac.evaluation import evaluate_served
    from distac.merging import merge
    from distac.pipeline import RunStore, load_params
    from distac.pipeline.stages import adapter, task_data

    params = load_params(params_file)
    store = RunStore.of(params)
    tasks = [task_data(params, t) for t in params.task_names]
    heads = [store.head(t) for t in params.task_names]
    finetuned = store.finetuned_accuracy(params.task_names, "test")
    pretrained = store.pretrained_backbone()
    builder = adapter(params)
    out: dict[str, Any] = {"params": params_file, "grid": list(grid), "tasks": params.task_names, "methods": {}}
    for method in methods:
        hyperparams = params.merge.method(method).hyperparams if method in params.method_names else {}
        for variant in params.merge.variants:
            vectors = [store.merge_input(t, variant) for t in params.task_names]
            merged = merge(method, vectors, alpha=1.0, **hyperparams)

            def served(i: int, merged=merged) -> dict[float, Any]:
                vector = merged.for_task(i)
                return {a: vector.apply_to(pretrained, a) for a in grid}

            rows = {}
            for split in ("validation", "test"):
                per_alpha = evaluate_served(builder, served, heads, tasks, split=split, finetuned_accuracy=finetuned,
                                            batch_size=64, perplexity=False)
                for alpha, results in per_alpha.items():
                    row = rows.setdefault(alpha, {"alpha": alpha})
                    row[f"{split}_mean"] = 100 * sum(r.accuracy for r in results) / len(results)
                    if split == "test":
                        row["test_norm"] = {r.task: 100 * r.normalized_accuracy for r in results}
                        row["test_mean_norm"] = sum(row["test_norm"].values()) / len(results)
            chosen = store.merge_record(method, variant) if method in params.method_names else {}
            out["methods"].setdefault(method, {})[variant] = {
                "merged_norm_at_alpha_1": merged.vector.norm(),
                "vector_norms": {t: v.norm() for t, v in zip(params.task_names, vectors)},
                "pipeline_alpha": (chosen.get("alpha_search") or {}).get("alpha"),
                "rows": list(rows.values())}
            print(f"{method} / {variant}: ‖merge(α=1)‖ = {merged.vector.norm():.3f}", flush=True)
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# α over a wide grid (`{result['params']}`)", "",
             "Validation mean accuracy / test mean normalized accuracy (%) per α; **bold**: the best validation α "
             "of the wide grid; the α the pipeline's search chose is in the heading.", ""]
    for method, variants in result["methods"].items():
        for variant, data in variants.items():
            best = max(data["rows"], key=lambda r: r["validation_mean"])["alpha"]
            lines += [f"## {method}, {variant} (pipeline α = {data['pipeline_alpha']}; ‖merge at α = 1‖ = "
                      f"{data['merged_norm_at_alpha_1']:.2f}; task-vector norms "
                      + ", ".join(f"{t} {n:.2f}" for t, n in data["vector_norms"].items()) + ")", "",
                      "| α | validation mean | test mean norm. | " + " | ".join(result["tasks"]) + " |",
                      "|---|---|---|" + "---|" * len(result["tasks"])]
            for row in data["rows"]:
                alpha = f"**{row['alpha']:g}**" if row["alpha"] == best else f"{row['alpha']:g}"
                lines.append(f"| {alpha} | {row['validation_mean']:.1f} | {row['test_mean_norm']:.1f} | "
                             + " | ".join(f"{row['test_norm'][t]:.1f}" for t in result["tasks"]) + " |")
            lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml", help="params file of a finished pipeline run")
    parser.add_argument("--methods", nargs="+", default=["iso_c"])
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "iso_c_alpha"))
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = measure(args.params, args.methods)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(result, indent=1) + "\n")
    Path(args.out + ".md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
