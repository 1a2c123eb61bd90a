"""``distac condition``: DisTaC on one fine-tuned model (a distac model directory or a Hugging Face
checkpoint), with unlabeled inputs from ``--unlabeled FILE``, else its task's training inputs.

Writes under OUT (all at once: staged, then moved into place)::

    task_vector/   the conditioned task vector τ' (sharded safetensors)
    model/         a distac model directory with θ_pre + τ' and the task head (what `distac merge` and
                   `distac evaluate` take as a fine-tuned model)
    history.json   κ, norms, teacher statistics, the config and the logged steps
    history.png    ‖τ'‖, teacher agreement and student entropy over the steps (when matplotlib is installed)

and, for transformers models (a causal LM, or a sequence classifier with its head), OUT itself is θ_pre + τ'
as a directory `from_pretrained` loads: config.json, tokenizer, model*.safetensors, README.md model card.
"""

from __future__ import annotations

import argparse
import logging
import os
from io import BytesIO

import torch

from distac import io
from distac.cli.common import (add_data_arguments, add_dataclass_arguments, dataclass_from_args, data_specs,
                               load_model_for, task_data)
from distac.cli.extract import load_pretrained, set_threads
from distac.conditioning import ConditioningResult, DistacConfig, condition
from distac.errors import ConfigError
from distac.merging.base import default_device
from distac.outputs import guard_output
from distac.vectors import TaskVector

log = logging.getLogger(__name__)
HISTORY = "history.json"


def register(subparsers) -> None:
    parser = subparsers.add_parser("condition", help="condition a task vector with DisTaC", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained", required=True,
                        help="θ_pre: distac or HF model directory, hub id, model spec (.json) or checkpoint")
    parser.add_argument("--finetuned", required=True,
                        help="the fine-tuned model: a distac model directory or a Hugging Face checkpoint")
    parser.add_argument("--out", required=True, help="output directory (local or s3://)")
    parser.add_argument("--unlabeled", metavar="FILE",
                        help="inputs to condition on (.csv/.tsv/.jsonl/.parquet or a datasets directory; labels "
                             "not needed) instead of the task's training inputs")
    parser.add_argument("--text-column", default="text", help="text column of --unlabeled (default: text)")
    parser.add_argument("--text-pair-column", help="second-sentence column of --unlabeled, for sentence pairs")
    add_data_arguments(parser, several=False)
    config = parser.add_argument_group("DisTaC (distac.conditioning.DistacConfig)")
    parser.set_defaults(config_fields=add_dataclass_arguments(
        config, DistacConfig,
        aliases={"teacher_temperature": ["--t-teacher"], "student_temperature": ["--t-student"],
                 "cache_teacher": ["--teacher-cache"]},
        helps={"kappa": "norm scale κ of the anchor θ_pre + κτ",
               "target_norm": "shrink τ to this norm (κ = min(1, target/‖τ‖)); exclusive with --kappa",
               "teacher_temperature": "T_tcr", "student_temperature": "T_stu (> T_tcr sharpens a low-confidence model)",
               "beta": "weight of β‖θ − θ_0‖²", "grad_clip": "0 disables clipping",
               "num_unlabeled": "unlabeled inputs to use (default: all)",
               "batch_size": "unlabeled inputs per step; every step runs the student forward and backward on "
                             "a batch (and the teacher forward, unless cached; causal LMs always), so time grows "
                             "with batch × steps × sequence length: 128 × 500 steps is the paper's GPU setting, "
                             "and 40 such steps took 9 minutes on 2 CPU cores; on a CPU try --batch-size 16 "
                             "--steps 100 (docs/own-models.md)",
               "cache_teacher": "recompute the teacher on every step (the published code's behaviour; slower)"}))
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when present")
    parser.add_argument("--threads", type=int, help="CPU threads for torch")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out even if it holds files distac did not write (never an input)")
    parser.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> DistacConfig:
    return dataclass_from_args(DistacConfig, args, [f for f in args.config_fields if f != "grad_clip"],
                               grad_clip=args.grad_clip or None)


def read_unlabeled_file(path: str, text_column: str = "text", text_pair_column: str | None = None) -> list:
    """The inputs of an unlabeled file (.csv/.tsv/.jsonl/.parquet or a datasets directory; a label column is
    ignored) as TextExamples without labels; a missing file, column or row is an error naming the file."""
    from distac.data import UnlabeledSpec, read_unlabeled

    return read_unlabeled(UnlabeledSpec(path=path), text_column, text_pair_column)


def unlabeled_inputs(args: argparse.Namespace, loaded) -> tuple[str, list]:
    """(task name, unlabeled inputs): --unlabeled, else the training inputs of --data or the model's task."""
    from distac.data.examples import subsample

    if args.unlabeled:
        inputs = read_unlabeled_file(args.unlabeled, args.text_column, args.text_pair_column)
        task = loaded.task or os.path.basename(str(args.finetuned).rstrip("/"))
        return task, subsample(inputs, args.num_unlabeled, f"unlabeled-{args.seed}")
    spec = data_specs(args, 1)[0]
    if spec is None and not loaded.task:
        raise ConfigError(f"{args.finetuned} names no task, so there is no unlabeled data to use; give "
                          "--unlabeled FILE (or --data)")
    data = task_data(loaded, args.finetuned, spec, args)
    return data.name, data.unlabeled(args.num_unlabeled, seed=args.seed)


def plot_history(result: ConditioningResult, uri: str) -> bool:
    """A three-panel PNG of the logged steps; False when matplotlib is missing or nothing was logged."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed; skipping the history plot")
        return False
    if not result.history:
        return False
    steps = [h["step"] for h in result.history]
    figure, axes = plt.subplots(1, 3, figsize=(11, 3))
    panels = (("norm", "‖τ'‖"), ("teacher_agreement", "teacher agreement"), ("student_entropy", "student entropy"))
    for axis, (key, title) in zip(axes, panels):
        axis.plot(steps, [h[key] for h in result.history], marker=".")
        axis.set_title(title)
        axis.set_xlabel("step")
    axes[0].axhline(result.anchor_norm, color="grey", linestyle="--", linewidth=1, label="anchor κ‖τ‖")
    axes[0].legend()
    figure.suptitle(f"DisTaC: κ={result.kappa:.3g}, T_tcr={result.config.teacher_temperature:g}, "
                    f"T_stu={result.config.student_temperature:g}")
    figure.tight_layout()
    buffer = BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    io.write_bytes_atomic(buffer.getvalue(), uri)
    return True


def run(args: argparse.Namespace) -> int:
    from distac.export import AUTO_CLASSES, write_conditioned
    from distac.merging.streaming import staged_directory
    from distac.models.store import save_task_model

    set_threads(args.threads)
    guard_output(args.out, kind="conditioned", inputs=[args.pretrained, args.finetuned], overwrite=args.overwrite)
    config = config_from_args(args)
    loaded = load_model_for(args.finetuned, args.pretrained, data_specs(args, 1)[0], args)
    pretrained = load_pretrained(args.pretrained, list(loaded.model.backbone_state()))
    vector = TaskVector.from_state_dicts(pretrained, loaded.model.backbone_state())
    task_name, unlabeled = unlabeled_inputs(args, loaded)
    device = torch.device(args.device) if args.device else default_device()
    model = loaded.model.to(device)

    result = condition(model, pretrained, vector, unlabeled, loaded.adapter.collate, config,
                       progress=not args.no_progress)

    out = str(args.out).rstrip("/")
    summary = {k: v for k, v in result.to_dict().items() if k not in ("history", "config")}
    with staged_directory(out, args.overwrite, inputs=[args.pretrained, args.finetuned], kind="conditioned",
                          last=HISTORY) as staging:  # all of OUT appears at once, history.json last
        result.vector.save(os.path.join(staging, "task_vector"))
        model.load_backbone(result.vector.apply_to(pretrained))
        extra = {**loaded.meta.get("extra", {}), "distac": {**summary, "config": result.config.to_dict()},
                 "source": str(args.finetuned)}
        save_task_model(os.path.join(staging, "model"), model.cpu(), loaded.adapter, task_name,
                        loaded.meta["num_classes"], loaded.class_names or None, extra=extra)
        exported = write_conditioned(staging, args.pretrained, args.finetuned, pretrained, result.vector,
                                     result.config.to_dict(), summary)
        plotted = plot_history(result, os.path.join(staging, "history.png"))
        io.write_json(result.to_dict(), os.path.join(staging, HISTORY))
    if exported:
        print(f"{out} is a transformers model: {AUTO_CLASSES[exported]}.from_pretrained({out!r})")
    last = result.history[-1] if result.history else {}
    print(f"DisTaC on {task_name}: κ={result.kappa:.4g}, ‖τ‖ {result.original_norm:.4g} → ‖τ'‖ "
          f"{result.final_norm:.4g} in {config.steps} steps on {len(unlabeled)} unlabeled inputs"
          + (f", teacher agreement {last['teacher_agreement']:.3f}" if last else "")
          + f"; saved to {out}" + ("" if plotted else " (no plot)"))
    return 0
