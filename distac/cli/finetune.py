"""``distac finetune``: fine-tune one source model on one task and store it (optionally θ_pre beside it)."""

from __future__ import annotations

import argparse
import json
import logging
import time

from distac.cli.common import add_dataclass_arguments, dataclass_from_args, read_data_spec
from distac.errors import ConfigError
from distac.training import SCHEDULES, FinetuneRecipe

logger = logging.getLogger(__name__)

def register(subparsers) -> None:
    parser = subparsers.add_parser("finetune", help="fine-tune a model on a task and save it",
                                   description=__doc__)
    parser.add_argument("--task", required=True, help="cola, mrpc, rte, sst2, vision:<Class> or imagefolder:<path>")
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--model-spec", help='adapter spec as JSON, e.g. \'{"kind": "hf_text", "max_length": 64}\'')
    model.add_argument("--model", help="shorthand for an hf_text encoder: 'minilm' (default) or a model id/path")
    parser.add_argument("--out", required=True, help="output directory or s3:// URI of the fine-tuned model")
    parser.add_argument("--pretrained-out", help="also save θ_pre (the pretrained backbone) here")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out even if it holds files distac did not write (never an input)")
    recipe = parser.add_argument_group("recipe (distac.training.FinetuneRecipe)")
    parser.set_defaults(recipe_fields=add_dataclass_arguments(recipe, FinetuneRecipe, choices={"schedule": SCHEDULES},
                                                              helps={"grad_clip": "0 disables clipping"}))
    parser.add_argument("--max-train", type=int, help="seeded subsample of the training split")
    parser.add_argument("--max-eval", type=int, help="seeded subsample of the validation and test splits")
    parser.add_argument("--data", metavar="SPEC", help="a YAML/JSON data spec file (train/test files, columns; "
                                                       "docs/own-models.md) for a task of your own named by --task")
    parser.add_argument("--glue-dir", "--data-root", dest="data_root",
                        help="GLUE directory (or torchvision data root)")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (on a busy machine 1 can be much faster)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(func=run)


def model_spec(args: argparse.Namespace) -> dict:
    if args.model_spec:
        try:
            spec = json.loads(args.model_spec)
        except ValueError as exc:
            raise ConfigError(f"--model-spec is not valid JSON ({exc})") from None
        if not isinstance(spec, dict):
            raise ConfigError(f"--model-spec must be a JSON object, got {args.model_spec}")
        return spec
    return {"kind": "hf_text", "name_or_path": args.model or "minilm"}


def run(args: argparse.Namespace) -> int:
    from distac.data import load_task, load_task_data
    from distac.models import build_adapter
    from distac.models.store import save_pretrained, save_task_model
    from distac.outputs import guard_output
    from distac.training import finetune

    from distac.cli.extract import set_threads

    set_threads(args.threads)
    for out in filter(None, (args.out, args.pretrained_out)):  # before any work: never over foreign files
        guard_output(out, kind="model", overwrite=args.overwrite)
    recipe = dataclass_from_args(FinetuneRecipe, args, [f for f in args.recipe_fields if f != "grad_clip"],
                                 grad_clip=args.grad_clip or None)
    if args.data:
        task = load_task_data(args.task, read_data_spec(args.data), max_train=args.max_train, max_eval=args.max_eval,
                              seed=args.seed)
    else:
        task = load_task(args.task, root=args.data_root, max_train=args.max_train, max_eval=args.max_eval,
                         seed=args.seed)
    adapter = build_adapter(model_spec(args))
    logger.info("fine-tuning %s on %s with %s", adapter.spec(), task, recipe)
    started = time.perf_counter()
    result = finetune(adapter, task, recipe, progress=not args.no_progress)
    seconds = time.perf_counter() - started
    history = result.history
    extra = {"recipe": recipe.to_dict(), "train_examples": len(task.train), "seconds": round(seconds, 2),
             "first_loss": history[0]["loss"], "final_loss": history[-1]["loss"]}
    save_task_model(args.out, result.model, adapter, task.name, task.num_classes, task.class_names, extra=extra)
    if args.pretrained_out:
        save_pretrained(adapter, args.pretrained_out)
    print(f"fine-tuned {task.name}: {recipe.steps} steps in {seconds:.1f}s, "
          f"loss {history[0]['loss']:.4f} -> {history[-1]['loss']:.4f}; saved to {args.out}")
    return 0
