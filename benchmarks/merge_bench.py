"""Streaming vs in-memory merge: time and peak RSS for every merge method.

Writes one pretrained and T fine-tuned checkpoints with the parameter shapes of CLIP ViT-B/32's image tower
(built from open_clip's ViT-B-32 config on the meta device: 152 tensors, 87.8 M parameters at --scale 1),
then for each method runs, each in a fresh subprocess so peak RSS is its own:

  stream  distac.merging.streaming.merge_checkpoints (reads tensor by tensor, writes vector/ and model/)
  memory  load every checkpoint into memory, build the task vectors, ``merge``, save the vector and the model

and reports wall time of the merge (imports excluded), peak RSS (ru_maxrss of the child), their ratios,
the RSS a child had after its imports, before any work ("base"), and the largest difference between the
two merged vectors. WUDI's 300 Adam steps per matrix are very slow
on CPU; --wudi-steps lowers them and the table says so.

  python benchmarks/merge_bench.py --scale 0.5 --wudi-steps 10
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "merge_bench.json"
METHOD_NAMES = ["task_arithmetic", "ties", "consensus", "tsv", "iso_c", "iso_cts", "emr", "wudi"]

# The parent stays lean (no torch): Linux keeps ru_maxrss across fork + exec, so a child's peak RSS would
# otherwise start at the parent's. Everything heavy (writing checkpoints, merging, comparing) runs in children.


def image_tower_shapes(scale: float) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of open_clip ViT-B-32's image tower, widths scaled (multiples of the 64-wide head)."""
    import distac  # noqa: F401  (applies the torchvision fix open_clip needs)
    import open_clip
    import torch

    config = open_clip.get_model_config("ViT-B-32")
    vision = dict(config["vision_cfg"])
    vision["width"] = max(64, round(vision["width"] * scale / 64) * 64)
    embed_dim = max(64, round(config["embed_dim"] * scale / 64) * 64)
    text = dict(context_length=4, vocab_size=8, width=64, heads=1, layers=1)  # discarded
    with torch.device("meta"):
        model = open_clip.CLIP(embed_dim=embed_dim, vision_cfg=vision, text_cfg=text)
    return {f"visual.{k}": tuple(v.shape) for k, v in model.visual.state_dict().items()}


def write_checkpoints(workdir: Path, scale: float, tasks: int) -> dict:
    """θ_pre ~ N(0, 0.02²) and θ_t = θ_pre + N(0, (1e-3·(t+1))²): one safetensors file each, one model in memory."""
    import torch

    from distac import io

    shapes = image_tower_shapes(scale)
    generator = torch.Generator().manual_seed(0)
    pretrained = {k: 0.02 * torch.randn(s, generator=generator) for k, s in shapes.items()}
    io.save_state_dict(pretrained, workdir / "pretrained.safetensors")
    finetuned = []
    for t in range(tasks):
        path = workdir / f"finetuned-{t}.safetensors"
        io.save_state_dict({k: v + 1e-3 * (t + 1) * torch.randn(v.shape, generator=generator)
                            for k, v in pretrained.items()}, path)
        finetuned.append(str(path))
    return {"pretrained": str(workdir / "pretrained.safetensors"), "finetuned": finetuned, "tensors": len(shapes),
            "parameters": sum(torch.Size(s).numel() for s in shapes.values())}


def hyperparameters(method: str, wudi_steps: int) -> dict:
    return {"steps": wudi_steps} if method == "wudi" else {}


# ------------------------------------------------------------------------------------------------ child


def run_child(args: argparse.Namespace) -> None:
    """One measured merge; prints a JSON line with its seconds and peak RSS."""
    import torch

    from distac import io
    from distac.merging import METHODS, merge
    from distac.merging.streaming import merge_checkpoints
    from distac.vectors import TaskVector

    torch.set_num_threads(args.threads)
    params = hyperparameters(args.method, args.wudi_steps)
    import_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # interpreter + torch, before any work
    start = time.perf_counter()
    if args.child == "stream":
        merge_checkpoints(METHODS[args.method].create(**params), args.pretrained, args.finetuned, args.out,
                          device="cpu", max_shard_bytes=args.shard_bytes, progress=False)
    else:
        pretrained = io.load_state_dict(args.pretrained)
        vectors = [TaskVector.from_state_dicts(pretrained, io.load_state_dict(uri)) for uri in args.finetuned]
        merged = merge(args.method, vectors, device="cpu", **params)
        merged.vector.save(os.path.join(args.out, "vector"), max_shard_bytes=args.shard_bytes)
        if not merged.masks:
            io.save_state_dict(merged.vector.apply_to(pretrained), os.path.join(args.out, "model"),
                               max_shard_bytes=args.shard_bytes)
        else:
            for i, mask in enumerate(merged.masks):
                io.save_state_dict(mask, os.path.join(args.out, f"masks/task-{i}"), max_shard_bytes=args.shard_bytes)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    print(json.dumps({"seconds": seconds, "peak_rss_bytes": peak, "import_rss_bytes": import_rss,
                      "vm_hwm_bytes": _vm_hwm_bytes()}))


def _vm_hwm_bytes() -> int | None:
    """This process's own peak RSS (VmHWM, not inherited across exec): a cross-check of ru_maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# ----------------------------------------------------------------------------------------------- parent


def in_child(*arguments: str) -> dict:
    """Run this script with ``arguments`` in a fresh interpreter; its last stdout line is JSON."""
    result = subprocess.run([sys.executable, __file__, *arguments], capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(arguments[:4])} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def measure(path: str, method: str, inputs: dict, out: Path, args) -> dict:
    return in_child("--child", path, "--method", method, "--pretrained", inputs["pretrained"],
                    "--finetuned", *inputs["finetuned"], "--out", str(out), "--wudi-steps", str(args.wudi_steps),
                    "--shard-bytes", str(args.shard_bytes), "--threads", str(args.threads))


def max_difference(first: str, second: str) -> float:
    """The largest |difference| between two checkpoints' tensors."""
    from distac import io

    a, b = io.open_checkpoint(first), io.open_checkpoint(second)
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def format_table(rows: list[dict]) -> str:
    mib = 1024**2
    header = (f"{'method':<16}{'stream s':>10}{'memory s':>10}{'time ×':>8}"
              f"{'stream MiB':>12}{'memory MiB':>12}{'RSS ×':>8}{'base MiB':>10}{'max |Δ|':>10}")
    lines = [header, "-" * len(header)]
    for row in rows:
        s, m = row["stream"], row["memory"]
        lines.append(f"{row['label']:<16}{s['seconds']:>10.1f}{m['seconds']:>10.1f}{s['seconds'] / m['seconds']:>8.2f}"
                     f"{s['peak_rss_bytes'] / mib:>12.0f}{m['peak_rss_bytes'] / mib:>12.0f}"
                     f"{s['peak_rss_bytes'] / m['peak_rss_bytes']:>8.2f}{s['import_rss_bytes'] / mib:>10.0f}"
                     f"{row['max_abs_difference']:>10.1e}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=8, help="number of fine-tuned checkpoints (default 8)")
    parser.add_argument("--methods", nargs="+", default=METHOD_NAMES, choices=METHOD_NAMES)
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of ViT-B/32's widths (1 = 87.8 M params)")
    parser.add_argument("--wudi-steps", type=int, default=300, help="Adam steps per matrix for wudi (reference 300)")
    parser.add_argument("--shard-bytes", type=int, default=256 * 1024**2, help="output shard size, both paths")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads per merge")
    parser.add_argument("--workdir", help="where to write checkpoints (default: a temporary directory)")
    parser.add_argument("--json", default=str(DEFAULT_OUT), help=f"results file (default {DEFAULT_OUT})")
    parser.add_argument("--child", choices=["stream", "memory", "generate", "compare"], help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--pretrained", help=argparse.SUPPRESS)
    parser.add_argument("--finetuned", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child == "generate":
        print(json.dumps(write_checkpoints(Path(args.out), args.scale, args.tasks)))
        return 0
    if args.child == "compare":
        print(json.dumps(max_difference(*args.finetuned)))
        return 0
    if args.child:
        run_child(args)
        return 0

    with tempfile.TemporaryDirectory(prefix="merge-bench-", dir=args.workdir) as tmp:
        workdir = Path(tmp)
        inputs = in_child("--child", "generate", "--out", str(workdir), "--scale", str(args.scale),
                          "--tasks", str(args.tasks))
        params = inputs["parameters"]
        print(f"wrote {args.tasks + 1} checkpoints: {inputs['tensors']} tensors, {params / 1e6:.1f} M parameters, "
              f"{params * 4 / 1024**2:.0f} MiB each (fp32)", flush=True)
        rows = []
        for method in args.methods:
            row = {"method": method, "hyperparameters": hyperparameters(method, args.wudi_steps),
                   "label": method + (f" ({args.wudi_steps} st)" if method == "wudi" else "")}
            for path in ("stream", "memory"):
                row[path] = measure(path, method, inputs, workdir / f"{method}-{path}", args)
            row["max_abs_difference"] = in_child("--child", "compare", "--finetuned",
                                                 str(workdir / f"{method}-stream" / "vector"),
                                                 str(workdir / f"{method}-memory" / "vector"))
            rows.append(row)
            print(format_table([row]).splitlines()[-1], flush=True)
    print()
    print(format_table(rows))
    if "wudi" in args.methods and args.wudi_steps != 300:
        print(f"wudi ran {args.wudi_steps} Adam steps per matrix, not the reference 300.")
    result = {"tasks": args.tasks, "scale": args.scale, "tensors": inputs["tensors"], "parameters": params,
              "wudi_steps": args.wudi_steps, "shard_bytes": args.shard_bytes, "threads": args.threads,
              "device": "cpu", "results": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
