"""``distac merge`` (stream checkpoints through a merge method) and ``distac materialize`` (write the model
one task is served with from a merge's output)."""

from __future__ import annotations

import argparse
import dataclasses
import re
from typing import Any

from distac import export, io
from distac.errors import ConfigError
from distac.merging import METHODS, get_method
from distac.merging.base import READ_AHEAD_BYTES
from distac.merging.streaming import materialize, merge_checkpoints

_SIZE_UNITS = {"": 1, "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3,
               "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3}


def parse_size(text: str) -> int:
    """'2GB', '500MB', '64MiB' or a byte count → bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else None
    if not match or unit not in _SIZE_UNITS or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (e.g. 2GB, 500MB, 64MiB)")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def parse_size_or_zero(text: str) -> int:
    """A size as ``parse_size`` takes it, or 0 (turns the budget off)."""
    return 0 if text.strip() == "0" else parse_size(text)


def parse_value(text: str, default: Any = None) -> Any:
    """A --set value, typed after the hyperparameter's default when it has one, else guessed:
    true/false → bool, int, float, a comma list → tuple of str, else the string."""
    lowered = text.strip().lower()
    if isinstance(default, tuple):
        return tuple(part.strip() for part in text.split(",") if part.strip())
    if isinstance(default, bool) or (default is None and lowered in ("true", "false")):
        if lowered not in ("true", "false", "1", "0", "yes", "no"):
            raise ConfigError(f"expected a boolean (true/false), got {text!r}")
        return lowered in ("true", "1", "yes")
    for kind in (int, float):
        if default is None or isinstance(default, kind) or (kind is float and isinstance(default, int)):
            try:
                return kind(text)
            except ValueError:
                pass
    if default is not None and isinstance(default, (int, float)):
        raise ConfigError(f"expected a number, got {text!r}")
    return tuple(p.strip() for p in text.split(",")) if "," in text else text


def hyperparameters_from_args(method_name: str, alpha: float | None, settings: list[str]) -> dict[str, Any]:
    """--alpha and --set key=value pairs → keyword arguments for the named method."""
    if method_name not in METHODS:
        raise ConfigError(f"unknown merge method {method_name!r}; available: {', '.join(sorted(METHODS))}")
    defaults = METHODS[method_name].hyperparameters()
    values: dict[str, Any] = {}
    if alpha is not None:
        values["alpha"] = alpha
    for setting in settings:
        key, sep, text = setting.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {setting!r}")
        if key not in defaults:
            raise ConfigError(f"{method_name} has no hyperparameter {key!r}; "
                              f"it accepts: {', '.join(sorted(defaults)) or 'none'}")
        try:
            values[key] = parse_value(text, defaults[key])
        except ConfigError as exc:
            raise ConfigError(f"--set {key}: {exc}") from None
    return values


def run_merge(args: argparse.Namespace) -> int:
    from distac.models.resolve import paired_backbones

    if (args.out_format == "lora") != (args.rank is not None):
        raise ConfigError("--out-format lora needs --rank R, and --rank is only for --out-format lora")

    method = get_method(args.method, **hyperparameters_from_args(args.method, args.alpha, args.set))
    pretrained, finetuned = paired_backbones(args.pretrained, args.finetuned)  # any model form; checked up front
    record = merge_checkpoints(method, pretrained, finetuned, args.out, include=args.include,
                               exclude=args.exclude, device=args.device, max_shard_bytes=args.shard_size,
                               progress=not args.no_progress, write_model=not args.no_model,
                               overwrite=args.overwrite, read_ahead_bytes=args.read_ahead,
                               lora_rank=args.rank if args.out_format == "lora" else None)
    settings = ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(method).items()) or "no hyperparameters"
    print(f"merged {record['num_tasks']} tasks over {record['num_tensors']} tensors with {method.name} "
          f"({settings}) into {args.out}")
    if record["scales"] is not None:
        print("per-task scales: " + ", ".join(f"{s:.6g}" for s in record["scales"]))
    outputs, auto_class = record["outputs"], export.AUTO_CLASSES.get(record["export"] or "")
    if outputs.get("lora"):
        lora = outputs["lora"]
        where = ", ".join(io.join_uri(args.out, d) if d != "." else str(args.out) for d in lora["adapters"])
        print(f"rank-{lora['rank']} LoRA adapter ({lora['lora']} tensors as B·A, relative Frobenius error max "
              f"{lora['max_relative_error']:.3g}, mean {lora['mean_relative_error']:.3g}; "
              f"{len(lora['modules_to_save'])} modules stored whole; per tensor: "
              f"{io.join_uri(args.out, lora['report'])}) at {where}: PeftModel.from_pretrained(base, ...)")
    elif outputs["model"] == ".":
        print(f"{args.out} is a transformers model: {auto_class}.from_pretrained({str(args.out)!r})")
    elif outputs["tasks"]:
        print(f"one transformers model per task ({auto_class}.from_pretrained): "
              + ", ".join(io.join_uri(args.out, name) for name in outputs["tasks"]))
    return 0


def run_materialize(args: argparse.Namespace) -> int:
    from distac.models.resolve import backbone_checkpoint, paired_backbones

    pretrained, finetuned = backbone_checkpoint(args.pretrained), None
    if args.finetuned:
        pretrained, (finetuned,) = paired_backbones(pretrained, [args.finetuned])  # checked before any work
    materialize(args.merged, pretrained, args.task, args.out, max_shard_bytes=args.shard_size,
                progress=not args.no_progress, overwrite=args.overwrite, finetuned_uri=finetuned)
    print(f"wrote the model for task {args.task} to {args.out}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "merge", help="merge fine-tuned checkpoints tensor by tensor",
        description="Stream fine-tuned checkpoints through a merge method; writes OUT/vector, OUT/masks (emr), "
                    "OUT/merge.json and the served model θ_pre + τ_m: for transformers causal LMs OUT itself loads "
                    "with from_pretrained (emr: OUT/task-<i>/ per task), for transformers sequence classifiers "
                    "OUT/task-<i>/ per task (its own head), else OUT/model (bare tensors; not for emr). "
                    "Methods: " + ", ".join(sorted(METHODS)))
    parser.add_argument("--method", required=True, help="merge method: " + ", ".join(sorted(METHODS)))
    parser.add_argument("--pretrained", required=True,
                        help="θ_pre: distac model directory, Hugging Face directory or hub id, or checkpoint "
                             "(file, directory or s3:// URI)")
    parser.add_argument("--finetuned", required=True, nargs="+",
                        help="fine-tuned models, one per task, in any of those forms")
    parser.add_argument("--out", required=True, help="output directory (local or s3://)")
    parser.add_argument("--alpha", type=float, help="scaling coefficient α (methods that have one)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a method hyperparameter, e.g. k=0.1 or exclude_2d=text_projection,proj (repeatable)")
    parser.add_argument("--include", nargs="+", metavar="RE", help="merge only keys matching one of these regexes")
    parser.add_argument("--exclude", nargs="+", metavar="RE", help="leave out keys matching one of these regexes")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="compute device (default: cuda when present)")
    parser.add_argument("--shard-size", type=parse_size, default=io.DEFAULT_SHARD_BYTES,
                        help="largest output shard, e.g. 2GB (default), 500MB")
    parser.add_argument("--read-ahead", type=parse_size_or_zero, default=READ_AHEAD_BYTES, metavar="SIZE",
                        help="read the next tensor's inputs (as float32, all tasks) while the current one merges "
                             "when they fit in SIZE, e.g. 1GB (default), 0 (off: half the input memory)")
    parser.add_argument("--out-format", choices=["model", "lora"], default="model",
                        help="model (default): the served model(s); lora: τ_m as a peft LoRA adapter at OUT "
                             "(classifiers: OUT/task-<i> with each task's head), by truncated SVD; the relative "
                             "error per tensor goes to OUT/lora_report.json (transformers models only; not emr)")
    parser.add_argument("--rank", type=int, help="LoRA rank R for --out-format lora")
    parser.add_argument("--no-model", action="store_true",
                        help="write only the merged vector (and emr's masks), not the served models")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out even if it holds files distac did not write (never an input)")
    parser.set_defaults(func=run_merge)

    parser = subparsers.add_parser(
        "materialize", help="write the model one task is served with after a merge",
        description="θ_pre + τ_m (emr: θ_pre + λ_i M_i ⊙ τ_uni) for task I: a directory transformers loads for "
                    "transformers causal LMs and sequence classifiers (with task I's head: give --finetuned), "
                    "else tensors.")
    parser.add_argument("--merged", required=True, help="output directory of `distac merge`")
    parser.add_argument("--pretrained", required=True, help="the pretrained model the merge used")
    parser.add_argument("--task", required=True, type=int, help="task index (order of --finetuned)")
    parser.add_argument("--finetuned",
                        help="task I's fine-tuned model; required for sequence classifiers (their head and pooler)")
    parser.add_argument("--out", required=True,
                        help="model to write (a directory; bare tensors may also go to .safetensors or .pt)")
    parser.add_argument("--shard-size", type=parse_size, default=io.DEFAULT_SHARD_BYTES, help="largest shard")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out even if it holds files distac did not write (never an input)")
    parser.set_defaults(func=run_materialize)
