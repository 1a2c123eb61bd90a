"""``distac evaluate``: accuracy of the fine-tuned source models, and of a merge with normalized accuracy.

- ``--finetuned FT...``: each model (distac model directory or Hugging Face checkpoint) on its own task: the
  task in its meta.json, or ``--data`` (a built-in task or a data spec file per model; a checkpoint's
  ``id2label`` orders the classes and is checked against the data).
- ``+ --merged OUT --pretrained PRE``: the output of `distac merge` over the same models, in the same order;
  task i is served with θ_pre + merge-for-task-i and FT_i's head. Normalized accuracy divides by FT_i's.
- ``+ --method M --pretrained PRE [--alpha A | --search-alpha]``: merge the models' task vectors with M here;
  ``--search-alpha`` picks α on the validation split (merged once at α = 1, then scaled).

Causal LMs also get, per task, the perplexity of the gold completions after their prompts (exp of their summed
NLL / their token count), for the fine-tuned models and the merge; ``--text FILE`` adds each model's perplexity
on held-out free text (every token after the first, the prompt template not applied).
"""

from __future__ import annotations

import argparse
from typing import Any

from distac import io
from distac.cli.common import add_data_arguments
from distac.cli.extract import load_pretrained, set_threads
from distac.errors import ConfigError
from distac.evaluation import (DEFAULT_ALPHA_GRID, MergedEvaluation, evaluate_merged, evaluate_task,
                               merged_text_perplexity, per_task_table_markdown, perplexity_table_markdown,
                               search_alpha, text_perplexity)
from distac.vectors import TaskVector


def register(subparsers) -> None:
    parser = subparsers.add_parser("evaluate", help="accuracy of fine-tuned models and of merges",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--finetuned", required=True, nargs="+",
                        help="fine-tuned models (distac model directories or Hugging Face checkpoints), in merge order")
    parser.add_argument("--pretrained", help="θ_pre: distac or HF model directory, hub id, or checkpoint "
                                             "(needed for merges)")
    parser.add_argument("--merged", help="output directory of `distac merge`")
    parser.add_argument("--method", help="merge method to run here (with --search-alpha or --alpha)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="hyperparameter of --method (repeatable)")
    parser.add_argument("--alpha", type=float, help="α for --method (instead of a search)")
    parser.add_argument("--search-alpha", action="store_true", help="pick α on the validation split")
    parser.add_argument("--grid", type=float, nargs="+", default=list(DEFAULT_ALPHA_GRID), help="α grid")
    parser.add_argument("--split", default="test", choices=["validation", "test"])
    parser.add_argument("--max-eval", type=int, help="seeded subsample of the validation and test splits")
    parser.add_argument("--batch-size", type=int, default=64)
    add_data_arguments(parser, several=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when present")
    parser.add_argument("--threads", type=int, help="CPU threads for torch")
    parser.add_argument("--json", help="write the results as JSON here")
    parser.add_argument("--text", metavar="FILE",
                        help="causal LMs: held-out texts (.jsonl/.csv/.tsv/.parquet, a `text` column) to report "
                             "each model's perplexity on")
    parser.add_argument("--text-column", default="text", help="text column of --text (default: text)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.set_defaults(func=run)


def _check_args(args: argparse.Namespace) -> None:
    if args.merged and args.method:
        raise ConfigError("give --merged (an existing merge) or --method (merge here), not both")
    if (args.merged or args.method) and not args.pretrained:
        raise ConfigError("evaluating a merge needs --pretrained")
    if args.search_alpha and not args.method:
        raise ConfigError("--search-alpha needs --method")


def _ppl(value: float | None) -> str:
    return "–" if value is None else f"{value:.4g}"


def _label(evaluation: MergedEvaluation) -> str:
    return evaluation.method if evaluation.alpha is None else f"{evaluation.method} (α={evaluation.alpha:g})"


def _finetuned_table(rows: list[dict[str, Any]]) -> list[str]:
    """The fine-tuned models' markdown table: accuracy, and the perplexity columns a causal LM has."""
    columns = [("accuracy", "accuracy")] + [(key, title) for key, title in
                                            (("perplexity", "perplexity (gold completions)"),
                                             ("text_perplexity", "perplexity (--text)"))
                                            if any(row.get(key) is not None for row in rows)]
    lines = ["| Model | Task | " + " | ".join(title for _, title in columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    for row in rows:
        cells = [f"{100 * row['accuracy']:.1f}" if key == "accuracy" else _ppl(row.get(key)) for key, _ in columns]
        lines.append(f"| {row['model']} | {row['task']} | " + " | ".join(cells) + " |")
    return lines


def _held_out_texts(args: argparse.Namespace, loaded: list) -> list | None:
    """--text's texts (causal LMs only), or None without --text."""
    from distac.cli.condition import read_unlabeled_file
    from distac.conditioning import token_level

    if not args.text:
        return None
    if not all(token_level(m.model) for m in loaded):
        raise ConfigError(f"--text {args.text}: held-out text perplexity is for causal LMs; these models are "
                          f"{loaded[0].adapter.kind}")
    return read_unlabeled_file(args.text, args.text_column)


def run(args: argparse.Namespace) -> int:
    from distac.cli.common import data_specs, load_models, task_data
    from distac.cli.diagnose import plain_text_collate
    from distac.cli.merge import hyperparameters_from_args
    from distac.merging import merge
    from distac.merging.streaming import load_merged

    _check_args(args)
    set_threads(args.threads)
    progress = not args.no_progress
    specs = data_specs(args, len(args.finetuned))
    # each source alone may be of its own family (e.g. causal LMs without --pretrained); a merge needs one
    loaded = load_models(args.finetuned, args.pretrained, specs, args, same_family=bool(args.merged or args.method))
    tasks = [task_data(m, uri, spec, args, max_eval=args.max_eval)
             for m, uri, spec in zip(loaded, args.finetuned, specs)]
    adapter = loaded[0].adapter
    texts = _held_out_texts(args, loaded)
    rows = []
    for uri, model, task in zip(args.finetuned, loaded, tasks):
        text_collate = plain_text_collate(model.adapter) if texts is not None else None
        result = evaluate_task(model.model, getattr(task, args.split), model.adapter.collate, task=task.name,
                               batch_size=args.batch_size, progress=progress)
        row = {"model": uri, "task": task.name, "accuracy": result.accuracy, "perplexity": result.perplexity}
        if texts is not None:
            row["text_perplexity"] = text_perplexity(model.model, texts, text_collate, args.batch_size, progress)
        rows.append(row)
    finetuned = {row["task"]: row["accuracy"] for row in rows}  # merges need one source model per task
    report: dict[str, Any] = {"split": args.split, "finetuned": finetuned, "models": rows}
    if any(row["perplexity"] is not None for row in rows):
        report["finetuned_perplexity"] = {row["task"]: row["perplexity"] for row in rows}
    lines = _finetuned_table(rows)

    evaluation: MergedEvaluation | None = None
    heads = [m.model.head_state() for m in loaded]
    if args.merged or args.method:
        pretrained = load_pretrained(args.pretrained, list(loaded[0].model.backbone_state()))
        options = dict(split=args.split, finetuned_accuracy=finetuned, batch_size=args.batch_size, device=args.device,
                       progress=progress)
        if args.merged:
            merged = load_merged(args.merged)  # it carries its α (merged.alpha); it is never applied again
        else:
            vectors = [TaskVector.from_state_dicts(pretrained, m.model.backbone_state()) for m in loaded]
            hyperparams = hyperparameters_from_args(args.method, None, args.set)
            if args.search_alpha:
                search = search_alpha(args.method, vectors, adapter, pretrained, heads, tasks, grid=args.grid,
                                      hyperparams=hyperparams, batch_size=args.batch_size, device=args.device,
                                      progress=progress)
                report["alpha_search"] = search.to_dict()
                merged = search.merged
            else:
                scale = {} if args.alpha is None else {"alpha": args.alpha}  # no --alpha: the method's default
                merged = merge(args.method, vectors, **scale, **hyperparams)
        evaluation = evaluate_merged(adapter, pretrained, merged, heads, tasks, **options)
        report["merged"] = evaluation.to_dict()
        lines = [per_task_table_markdown([evaluation], finetuned_accuracy=finetuned)]
        perplexities = perplexity_table_markdown([evaluation], report.get("finetuned_perplexity"))
        if perplexities:
            lines += ["", perplexities]
        if texts is not None:
            merged_text = merged_text_perplexity(adapter, pretrained, merged, texts, batch_size=args.batch_size,
                                                 device=args.device, progress=progress,
                                                 collate=plain_text_collate(adapter))
            report["merged"]["text_perplexity"] = dict(zip([t.name for t in tasks], merged_text))
            lines += ["", f"| Perplexity on {args.text} | " + " | ".join(t.name for t in tasks) + " |",
                      "|---|" + "---|" * len(tasks),
                      "| Individual | " + " | ".join(_ppl(row["text_perplexity"]) for row in rows) + " |",
                      f"| {_label(evaluation)} | " + " | ".join(_ppl(v) for v in merged_text) + " |"]
    print("\n".join(lines))
    if args.json:
        io.write_json(report, args.json)
    return 0
