"""``distac condition``: DisTaC on one fine-tuned model, with its task's training inputs as unlabeled data.

Writes under OUT::

    task_vector/   the conditioned task vector τ' (sharded safetensors)
    model/         a distac model directory with θ_pre + τ' and the task head (what `distac merge` and
                   `distac evaluate` take as a fine-tuned model)
    history.json   κ, norms, teacher statistics, the config and the logged steps
    history.png    ‖τ'‖, teacher agreement and student entropy over the steps (when matplotlib is installed)
"""

from __future__ import annotations

import argparse
import logging
from io import BytesIO

import torch

from distac import io
from distac.cli.extract import load_pretrained, set_threads
from distac.conditioning import ConditioningResult, DistacConfig, condition
from distac.errors import ConfigError
from distac.merging.base import default_device
from distac.outputs import guard_output
from distac.vectors import TaskVector

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    parser = subparsers.add_parser("condition", help="condition a task vector with DisTaC", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained", required=True, help="θ_pre: model directory or checkpoint")
    parser.add_argument("--finetuned", required=True, help="the fine-tuned model directory (`distac finetune`)")
    parser.add_argument("--out", required=True, help="output directory (local or s3://)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out even if it holds files distac did not write (never an input)")
    scale = parser.add_mutually_exclusive_group()
    scale.add_argument("--kappa", type=float, help="norm scale κ of the anchor θ_pre + κτ")
    scale.add_argument("--target-norm", type=float, help="shrink τ to this norm (κ = min(1, target/‖τ‖))")
    defaults = DistacConfig()
    parser.add_argument("--t-teacher", type=float, default=defaults.teacher_temperature, help="T_tcr")
    parser.add_argument("--t-student", type=float, default=defaults.student_temperature,
                        help="T_stu (> T_tcr sharpens a low-confidence model)")
    parser.add_argument("--beta", type=float, default=defaults.beta, help="weight of β‖θ − θ_0‖²")
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--grad-clip", type=float, default=defaults.grad_clip, help="0 disables clipping")
    parser.add_argument("--num-unlabeled", type=int, help="unlabeled training inputs to use (default: all)")
    parser.add_argument("--log-every", type=int, default=defaults.log_every)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--no-teacher-cache", action="store_true",
                        help="recompute the teacher on every step (the published code's behaviour; slower)")
    parser.add_argument("--glue-dir", "--data-root", dest="data_root", help="GLUE directory or vision data root")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when present")
    parser.add_argument("--threads", type=int, help="CPU threads for torch")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> DistacConfig:
    return DistacConfig(kappa=args.kappa, target_norm=args.target_norm, teacher_temperature=args.t_teacher,
                        student_temperature=args.t_student, beta=args.beta, lr=args.lr,
                        weight_decay=args.weight_decay, steps=args.steps, batch_size=args.batch_size,
                        grad_clip=args.grad_clip or None, num_unlabeled=args.num_unlabeled,
                        log_every=args.log_every, seed=args.seed, cache_teacher=not args.no_teacher_cache)


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
    from distac.data import load_task
    from distac.models.store import load_task_model, save_task_model

    set_threads(args.threads)
    guard_output(args.out, kind="conditioned", inputs=[args.pretrained, args.finetuned], overwrite=args.overwrite)
    config = config_from_args(args)
    loaded = load_task_model(args.finetuned)
    task_name = loaded.meta.get("task")
    if not task_name:
        raise ConfigError(f"{args.finetuned}: meta.json names no task, so there is no unlabeled data to use")
    pretrained = load_pretrained(args.pretrained)
    vector = TaskVector.from_state_dicts(pretrained, loaded.model.backbone_state())
    data = load_task(task_name, root=args.data_root, seed=args.seed)
    unlabeled = data.unlabeled(args.num_unlabeled, seed=args.seed)
    device = torch.device(args.device) if args.device else default_device()
    model = loaded.model.to(device)

    result = condition(model, pretrained, vector, unlabeled, loaded.adapter.collate, config,
                       progress=not args.no_progress)

    out = str(args.out).rstrip("/")
    result.vector.save(io.join_uri(out, "task_vector"))
    model.load_backbone(result.vector.apply_to(pretrained))
    extra = {**loaded.meta.get("extra", {}), "distac": {k: v for k, v in result.to_dict().items() if k != "history"},
             "source": str(args.finetuned)}
    save_task_model(io.join_uri(out, "model"), model.cpu(), loaded.adapter, task_name, loaded.meta["num_classes"],
                    loaded.meta.get("class_names"), extra=extra)
    io.write_json(result.to_dict(), io.join_uri(out, "history.json"))
    plotted = plot_history(result, io.join_uri(out, "history.png"))
    last = result.history[-1] if result.history else {}
    print(f"DisTaC on {task_name}: κ={result.kappa:.4g}, ‖τ‖ {result.original_norm:.4g} → ‖τ'‖ "
          f"{result.final_norm:.4g} in {config.steps} steps"
          + (f", teacher agreement {last['teacher_agreement']:.3f}" if last else "")
          + f"; saved to {out}" + ("" if plotted else " (no plot)"))
    return 0
