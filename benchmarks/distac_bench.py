"""DisTaC speed: teacher logits cached once vs recomputed on every step (what the published code does).

Same model, data, batch and seed for both modes; each mode runs in a fresh subprocess so its peak RSS is
its own. The model is the bundled MiniLM (``--tiny``: a 2-layer random BERT) whose source is θ_pre plus a
seeded perturbation with a seeded head (speed does not depend on how the source was trained); the unlabeled
inputs are SST-2 training sentences.

Reported per mode: wall time of ``condition`` (the cached mode includes building its cache), end-to-end
steps/s, steady-state steps/s (median step interval after the first), teacher forward passes, peak RSS of
the child (ru_maxrss) and peak CUDA memory when on a GPU; then the cached/uncached speed ratios. The modes
alternate for ``--repeats`` rounds and each mode's fastest run counts (a shared machine's load drifts).

  python benchmarks/distac_bench.py                 # MiniLM, 20 steps, batch 32, 128 unlabeled inputs
  python benchmarks/distac_bench.py --tiny --steps 50
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "distac_bench.json"
MODES = ("cached", "uncached")

# The parent stays lean (no torch import): ru_maxrss survives fork + exec, so a heavy parent would set
# its children's peak-RSS floor.


def run_child(args: argparse.Namespace) -> dict:
    """One DisTaC run in this process; returns its measurements."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import tempfile

    import torch

    from distac.conditioning import DistacConfig, condition
    from distac.data import load_task
    from distac.models import build_adapter
    from distac.models.text import create_random_encoder
    from distac.vectors import TaskVector

    if args.threads:
        torch.set_num_threads(args.threads)
    name = create_random_encoder(tempfile.mkdtemp(prefix="distac-bench-")) if args.tiny else "minilm"
    adapter = build_adapter({"kind": "hf_text", "name_or_path": name, "max_length": args.max_length})
    data = load_task("sst2", root=args.glue_dir, max_train=args.num_unlabeled, max_eval=8)
    unlabeled = data.unlabeled()
    pretrained = adapter.pretrained_backbone_state()
    generator = torch.Generator().manual_seed(0)
    vector = TaskVector({k: 1e-3 * torch.randn(v.shape, generator=generator) for k, v in pretrained.items()})
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = adapter.build(data.num_classes, data.class_names, seed=1).to(device)
    config = DistacConfig(kappa=0.5, lr=1e-5, steps=args.steps, batch_size=args.batch_size, log_every=1,
                          cache_teacher=args.child == "cached")
    stamps: list[float] = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    started = time.perf_counter()
    result = condition(model, pretrained, vector, unlabeled, adapter.collate, config, progress=False,
                       on_log=lambda step, metrics: stamps.append(time.perf_counter()))
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    intervals = [b - a for a, b in zip(stamps, stamps[1:])]
    return {
        "mode": args.child, "device": str(device), "seconds": seconds, "steps_per_s": args.steps / seconds,
        "steady_steps_per_s": 1 / statistics.median(intervals) if intervals else None,
        "teacher_forward_passes": result.teacher_forward_passes, "teacher_cache_hits": result.teacher_cache_hits,
        "final_norm": result.final_norm, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
        "parameters": sum(v.numel() for v in pretrained.values()), "unlabeled": len(unlabeled),
    }


def spawn(args: argparse.Namespace, mode: str) -> dict:
    command = [sys.executable, __file__, "--child", mode, "--steps", str(args.steps), "--batch-size",
               str(args.batch_size), "--num-unlabeled", str(args.num_unlabeled), "--max-length",
               str(args.max_length)]
    command += ["--tiny"] if args.tiny else []
    command += ["--threads", str(args.threads)] if args.threads else []
    command += ["--glue-dir", args.glue_dir] if args.glue_dir else []
    completed = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if completed.returncode != 0:
        raise SystemExit(f"{mode} run failed:\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def table(runs: dict[str, dict]) -> str:
    lines = ["| mode | wall s | steps/s | steady steps/s | teacher fwd | peak RSS MB | peak CUDA MB |",
             "|---|---|---|---|---|---|---|"]
    for mode, r in runs.items():
        cuda = "–" if r["peak_cuda_mb"] is None else f"{r['peak_cuda_mb']:.0f}"
        lines.append(f"| {mode} | {r['seconds']:.2f} | {r['steps_per_s']:.3f} | {r['steady_steps_per_s']:.3f} | "
                     f"{r['teacher_forward_passes']} | {r['peak_rss_mb']:.0f} | {cuda} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a 2-layer random BERT instead of MiniLM")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-unlabeled", type=int, default=128)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--threads", type=int, help="torch CPU threads in the children")
    parser.add_argument("--repeats", type=int, default=2, help="runs per mode, alternating; the fastest counts")
    parser.add_argument("--glue-dir", help="GLUE directory (default: found beside the checkout)")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_child(args)))
        return

    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    attempts: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for _ in range(args.repeats):  # alternate the modes so load drifts on a shared machine hit both alike
        for mode in MODES:
            attempts[mode].append(spawn(args, mode))
    runs = {mode: max(tries, key=lambda r: r["steps_per_s"]) for mode, tries in attempts.items()}
    cached, uncached = runs["cached"], runs["uncached"]
    summary = {
        "speedup_end_to_end": cached["steps_per_s"] / uncached["steps_per_s"],
        "speedup_steady_state": cached["steady_steps_per_s"] / uncached["steady_steps_per_s"],
        "same_result": abs(cached["final_norm"] - uncached["final_norm"]) <= 1e-4 * uncached["final_norm"],
    }
    settings = {"model": "tiny random BERT" if args.tiny else "MiniLM-L6 (bundled)", "steps": args.steps,
                "batch_size": args.batch_size, "num_unlabeled": args.num_unlabeled, "max_length": args.max_length,
                "threads": args.threads, "repeats": args.repeats, "cpu_count": os.cpu_count(),
                "machine": platform.machine(), "load_average": os.getloadavg()}
    print(f"DisTaC, {settings['model']}: {args.steps} steps, batch {args.batch_size}, "
          f"{args.num_unlabeled} unlabeled inputs, {cached['device']}")
    print(table(runs))
    print(f"cached / uncached: {summary['speedup_end_to_end']:.2f}x end to end (cache build included), "
          f"{summary['speedup_steady_state']:.2f}x per step; same result: {summary['same_result']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staged = out.with_suffix(".json.tmp")  # atomic: readers never see a half-written file
    staged.write_text(json.dumps({"settings": settings, "runs": runs, "summary": summary, "attempts": attempts},
                                 indent=2) + "\n")
    os.replace(staged, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
