"""``distac extract``: the task vector τ = θ_ft − θ_pre of one fine-tuned model, streamed tensor by tensor.

PRE and FT may be any model form, local or s3://: distac model directories (``distac finetune`` output: the
backbone is used), Hugging Face checkpoints (directory or cached hub id: the encoder, without pooler and
classifier) or raw checkpoints (safetensors file or directory, index JSON, .pt/.bin). θ_pre is checked
against FT before any work. The helpers here also serve the other DisTaC commands.
"""

from __future__ import annotations

import argparse

import torch

from distac import io
from distac.errors import ConfigError
from distac.models import store
from distac.outputs import guard_output
from distac.vectors import LazyTaskVector


def is_model_dir(uri: str) -> bool:
    """Whether ``uri`` is a distac model directory (it has a meta.json)."""
    fs, path = io.url_to_fs(store.meta_uri(uri))
    return fs.exists(path)


def checkpoint_uri(uri: str) -> str:
    """A distac model directory's backbone checkpoint, or ``uri`` itself for a raw checkpoint."""
    return store.backbone_uri(uri) if is_model_dir(uri) else str(uri)


def load_pretrained(uri: str, keys: list[str] | None = None) -> dict[str, torch.Tensor]:
    """θ_pre's backbone (optionally only ``keys``) from any model form."""
    from distac.models.resolve import load_pretrained_state

    return load_pretrained_state(uri, keys)


def set_threads(threads: int | None) -> None:
    if threads is not None:
        if threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)


def register(subparsers) -> None:
    parser = subparsers.add_parser("extract", help="write the task vector of a fine-tuned model",
                                   description=__doc__)
    parser.add_argument("--pretrained", required=True, help="θ_pre: model directory, HF checkpoint or checkpoint file")
    parser.add_argument("--finetuned", required=True, help="fine-tuned model: distac or HF directory, or checkpoint")
    parser.add_argument("--out", required=True, help="task vector to write: directory, .safetensors or .pt")
    parser.add_argument("--include", nargs="+", metavar="RE", help="keep only keys matching one of these regexes")
    parser.add_argument("--exclude", nargs="+", metavar="RE", help="leave out keys matching one of these regexes")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out even if it holds files distac did not write (never an input)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    guard_output(args.out, kind="checkpoint", inputs=[args.pretrained, args.finetuned], overwrite=args.overwrite)
    from distac.models.resolve import paired_backbones

    pretrained, (finetuned,) = paired_backbones(args.pretrained, [args.finetuned])
    vector = LazyTaskVector(pretrained, finetuned, include=args.include, exclude=args.exclude, name=args.finetuned)
    squared = 0.0
    if args.out.endswith((io.SAFETENSORS_SUFFIX, *io.TORCH_SUFFIXES)):
        tensors = dict(vector.items())
        squared = sum(float(t.double().pow(2).sum()) for t in tensors.values())
        io.save_state_dict(tensors, args.out, metadata={"distac": "task_vector"}, overwrite=args.overwrite)
    else:
        with io.ShardedSafetensorsWriter(args.out, metadata={"distac": "task_vector"},
                                         overwrite=args.overwrite) as writer:
            for key, tensor in vector.items():  # one tensor in memory at a time
                squared += float(tensor.double().pow(2).sum())
                writer.add(key, tensor)
    print(f"task vector: {len(vector)} tensors, norm {squared ** 0.5:.6g}; saved to {args.out}")
    return 0
