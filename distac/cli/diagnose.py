"""``distac diagnose``: norm and confidence diagnostics of the source models, before merging.

FT arguments that are distac model directories get the full diagnosis (confidence on unlabeled training
inputs of their task, ECE on its validation split); raw checkpoints get norms and cosines only.
Prints a markdown table and the recommendations; ``--json`` also writes them as JSON.
"""

from __future__ import annotations

import argparse
import os

from distac import io
from distac.cli.extract import checkpoint_uri, is_model_dir, load_pretrained, set_threads
from distac.diagnostics import (CONFIDENCE_THRESHOLD, NORM_RATIO_THRESHOLD, TARGET_CONFIDENCE, Diagnosis,
                                diagnose)
from distac.errors import ConfigError
from distac.evaluation import labels_of, predict_logits
from distac.vectors import TaskVector


def register(subparsers) -> None:
    parser = subparsers.add_parser("diagnose", help="norm / confidence diagnostics and DisTaC recommendations",
                                   description=__doc__)
    parser.add_argument("--pretrained", required=True, help="θ_pre: model directory or checkpoint")
    parser.add_argument("--finetuned", required=True, nargs="+", help="fine-tuned model directories or checkpoints")
    parser.add_argument("--names", nargs="+", help="task names in the order of --finetuned (default: from meta)")
    parser.add_argument("--json", help="write the diagnosis as JSON here")
    parser.add_argument("--markdown", help="write the markdown report here")
    parser.add_argument("--num-unlabeled", type=int, default=512, help="unlabeled inputs per task")
    parser.add_argument("--max-eval", type=int, default=512, help="validation examples per task (for ECE)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--glue-dir", "--data-root", dest="data_root", help="GLUE directory or vision data root")
    parser.add_argument("--norm-ratio-threshold", type=float, default=NORM_RATIO_THRESHOLD)
    parser.add_argument("--confidence-threshold", type=float, default=CONFIDENCE_THRESHOLD,
                        help="flag scaled confidence (max-prob − 1/C)/(1 − 1/C) below this")
    parser.add_argument("--target-confidence", type=float, default=TARGET_CONFIDENCE)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="CPU threads for torch")
    parser.set_defaults(func=run)


def _task_names(args: argparse.Namespace, metas: list[dict | None]) -> list[str]:
    if args.names:
        if len(args.names) != len(args.finetuned):
            raise ConfigError(f"--names gives {len(args.names)} names for {len(args.finetuned)} models")
        names = list(args.names)
    else:
        names = [(meta or {}).get("task") or os.path.basename(str(uri).rstrip("/"))
                 for meta, uri in zip(metas, args.finetuned)]
    if len(set(names)) != len(names):  # the same task fine-tuned twice: number them
        names = [f"{name}#{i}" for i, name in enumerate(names)]
    return names


def build_diagnosis(args: argparse.Namespace) -> Diagnosis:
    from distac.data import load_task
    from distac.models.store import load_meta, load_task_model

    pretrained = load_pretrained(args.pretrained)
    metas = [load_meta(uri) if is_model_dir(uri) else None for uri in args.finetuned]
    names = _task_names(args, metas)
    vectors, unlabeled_logits, validation = {}, {}, {}
    for name, uri, meta in zip(names, args.finetuned, metas):
        if meta is None or meta.get("role") != "finetuned":
            vectors[name] = TaskVector.from_checkpoints(checkpoint_uri(args.pretrained), checkpoint_uri(uri))
            continue
        loaded = load_task_model(uri)
        vectors[name] = TaskVector.from_state_dicts(pretrained, loaded.model.backbone_state())
        data = load_task(meta["task"], root=args.data_root, max_eval=args.max_eval, seed=args.seed)
        collate = loaded.adapter.collate
        unlabeled_logits[name] = predict_logits(loaded.model, data.unlabeled(args.num_unlabeled, args.seed),
                                                collate, args.batch_size)
        validation[name] = (predict_logits(loaded.model, data.validation, collate, args.batch_size),
                            labels_of(data.validation))
    return diagnose(vectors, unlabeled_logits, validation, norm_ratio_threshold=args.norm_ratio_threshold,
                    confidence_threshold=args.confidence_threshold, target_confidence=args.target_confidence)


def run(args: argparse.Namespace) -> int:
    set_threads(args.threads)
    diagnosis = build_diagnosis(args)
    markdown = diagnosis.to_markdown()
    print(markdown)
    if args.json:
        io.write_json(diagnosis.to_dict(), args.json)
    if args.markdown:
        io.write_bytes_atomic((markdown + "\n").encode(), args.markdown)
    return 0
