"""DisTaC speed: the library's ``condition`` against the reference loop, side by side in one run.

The reference is the published DisTaC loop, kept fixed in this file so the baseline does not move when the
library changes: every step tokenises its batch, runs the frozen teacher on it, puts β‖θ − θ_0‖² through
autograd and steps torch's default Adam. The library collates the unlabeled set once, caches the teacher's
logits, adds the regulariser's gradient 2β(θ − θ_0) with multi-tensor ops and steps a fused Adam; the
third mode adds length bucketing (``length_bucketing=True``: other batches, so other, equally good, weights).

Every mode sees the same model, inputs, seed, κ, lr and β (the first two the very same batches); each runs
in a fresh subprocess so its peak RSS is its own; they alternate for ``--repeats`` rounds and each mode's fastest run counts (a shared
machine's load drifts). The model is the bundled MiniLM (``--tiny``: a 2-layer random BERT) whose source is
θ_pre plus a seeded perturbation with a seeded, scaled head (speed does not depend on how the source was
trained); the unlabeled inputs are training sentences of ``--task``.

Reported per mode: wall time of the whole conditioning (the library's includes collating the set and
building the teacher cache), steps/s, teacher forward passes, peak RSS, peak CUDA memory on a GPU; then the
library/reference speed ratios, each mode's final KL(teacher ‖ student) over all unlabeled inputs (how
well it distilled; comparable across batchings), and how far apart the reference's and the library's
(same batches) final task vectors are (max |Δ| and ‖Δ‖ relative to how far the student moved from
its anchor, with and without the attention key biases, whose true gradient is zero so Adam turns rounding
noise in it into ±lr steps that change no output).

  python benchmarks/distac_bench.py                           # MiniLM, SST-2, 40 steps, batch 32, 256 inputs
  python benchmarks/distac_bench.py --tiny --steps 20 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "distac_bench.json"
MODES = ("reference", "distac", "distac_bucketed")
ZERO_GRADIENT_SUFFIX = "attention.self.key.bias"  # softmax is invariant to it: its true gradient is 0

# The parent stays lean (no torch import until every child has run): ru_maxrss survives fork + exec, so a
# heavy parent would set its children's peak-RSS floor.


def reference_condition(model, pretrained, vector, examples, collate, config):
    """The published DisTaC loop (the baseline): per-step tokenisation and teacher forward, the regulariser
    through autograd, torch's default Adam. Returns τ' = θ − θ_pre on the CPU."""
    import copy

    import torch

    from distac.conditioning import _BatchSampler, distillation_loss

    device = next(model.parameters()).device
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else torch.autocast("cpu", enabled=False))
    model.eval().head.requires_grad_(False)
    own = model.backbone.state_dict()
    with torch.no_grad():
        for key, value in vector.items():
            own[key].copy_(pretrained[key].to(device) + value.to(device))
    teacher = copy.deepcopy(model).requires_grad_(False)
    with torch.no_grad():
        for key, value in vector.items():
            own[key].copy_(pretrained[key].to(device) + config.kappa * value.to(device))
    named = dict(model.backbone.named_parameters())
    params = {k: named[k] for k in vector if k in named}
    anchor = {k: p.detach().clone() for k, p in params.items()}
    optimizer = torch.optim.Adam(params.values(), lr=config.lr, weight_decay=config.weight_decay)
    sampler = _BatchSampler(len(examples), config.batch_size, config.seed)
    for _ in range(config.steps):
        index = sampler.next()
        inputs = {k: v.to(device) for k, v in collate([examples[i] for i in index.tolist()]).items()}
        with torch.no_grad(), autocast:
            target = teacher(inputs).float()
        with autocast:
            student = model(inputs)
        kd = distillation_loss(student, target, config.teacher_temperature, config.student_temperature)
        reg = sum(((p - anchor[k]) ** 2).sum() for k, p in params.items())
        loss = kd + config.beta * reg
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params.values(), config.grad_clip)
        optimizer.step()
    state = model.backbone.state_dict()
    return {k: (state[k].float() - pretrained[k].to(device)).cpu() for k in vector}


def distillation_gap(adapter, student, pretrained, vector, unlabeled, device) -> float:
    """KL(teacher ‖ student) averaged over every unlabeled input after the run: how well each mode
    distilled, comparable across batchings (outside the timed part)."""
    import torch

    from distac.conditioning import distillation_loss

    teacher = adapter.build(student.head.out_features, seed=1).to(device)
    teacher.load_head(student.head_state())
    teacher.load_backbone(vector.apply_to(pretrained))
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(unlabeled), 64):
            inputs = {k: v.to(device) for k, v in adapter.collate(unlabeled[start:start + 64]).items()}
            count = min(64, len(unlabeled) - start)
            total += count * float(distillation_loss(student.eval()(inputs), teacher.eval()(inputs), 1.0, 1.0))
    return total / len(unlabeled)


def run_child(args: argparse.Namespace) -> dict:
    """One DisTaC run in this process; saves its final vector to ``args.vector_out``; returns measurements."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from distac import io
    from distac.conditioning import DistacConfig, condition
    from distac.data import load_task
    from distac.models import build_adapter
    from distac.models.text import create_random_encoder
    from distac.vectors import TaskVector

    if args.threads:
        torch.set_num_threads(args.threads)
    # the tiny encoder lives beside the vector, in the parent's scratch directory, and goes with it
    name = create_random_encoder(f"{args.vector_out}.encoder") if args.tiny else "minilm"
    adapter = build_adapter({"kind": "hf_text", "name_or_path": name, "max_length": args.max_length})
    data = load_task(args.task, root=args.glue_dir, max_train=2000, max_eval=8)
    unlabeled = data.unlabeled(args.num_unlabeled, 0)
    pretrained = adapter.pretrained_backbone_state()
    generator = torch.Generator().manual_seed(0)
    vector = TaskVector({k: 1e-3 * torch.randn(v.shape, generator=generator) for k, v in pretrained.items()})
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = adapter.build(data.num_classes, data.class_names, seed=1).to(device)
    with torch.no_grad():
        model.head.weight.mul_(20)  # a confident teacher, so distillation has something to recover
    config = DistacConfig(kappa=0.5, lr=args.lr, beta=0.1, steps=args.steps, batch_size=args.batch_size,
                          log_every=args.steps, length_bucketing=args.child == "distac_bucketed")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    started = time.perf_counter()
    if args.child == "reference":
        final, forward_passes = reference_condition(model, pretrained, vector, unlabeled, adapter.collate,
                                                    config), args.steps
    else:
        result = condition(model, pretrained, vector, unlabeled, adapter.collate, config, progress=False)
        final, forward_passes = dict(result.vector), result.teacher_forward_passes
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    final_kd = distillation_gap(adapter, model, pretrained, vector, unlabeled, device)
    io.save_state_dict({k: v.contiguous() for k, v in final.items()}, args.vector_out)
    io.save_state_dict({k: config.kappa * v for k, v in vector.items()}, args.vector_out + ".anchor")
    return {
        "mode": args.child, "device": str(device), "seconds": seconds, "steps_per_s": args.steps / seconds,
        "teacher_forward_passes": forward_passes, "final_kd": final_kd,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
        "parameters": sum(v.numel() for v in pretrained.values()), "unlabeled": len(unlabeled),
    }


def spawn(args: argparse.Namespace, mode: str, vector_out: str) -> dict:
    command = [sys.executable, __file__, "--child", mode, "--vector-out", vector_out, "--task", args.task,
               "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--num-unlabeled",
               str(args.num_unlabeled), "--max-length", str(args.max_length), "--lr", str(args.lr)]
    command += ["--tiny"] if args.tiny else []
    command += ["--threads", str(args.threads)] if args.threads else []
    command += ["--glue-dir", args.glue_dir] if args.glue_dir else []
    completed = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if completed.returncode != 0:
        raise SystemExit(f"{mode} run failed:\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def compare_vectors(reference_uri: str, distac_uri: str) -> dict:
    """How far apart the two final vectors are: bit-identical?, max |Δ|, and ‖Δ‖ / ‖τ' − κτ‖ (relative to
    how far the reference student moved from its anchor), with and without the zero-gradient key biases."""
    import torch

    from distac import io

    reference, distac = io.load_state_dict(reference_uri), io.load_state_dict(distac_uri)
    anchor = io.load_state_dict(reference_uri + ".anchor")
    out = {"bit_identical": all(torch.equal(reference[k], distac[k]) for k in reference)}
    for label, keys in (("all", list(reference)),
                        ("without_key_biases", [k for k in reference if not k.endswith(ZERO_GRADIENT_SUFFIX)])):
        diff = {k: (reference[k].double() - distac[k].double()) for k in keys}
        out[label] = {"max_abs_diff": max(float(d.abs().max()) for d in diff.values()),
                      "diff_norm": sum(float(d.pow(2).sum()) for d in diff.values()) ** 0.5,
                      "moved_norm": sum(float((reference[k].double() - anchor[k].double()).pow(2).sum())
                                        for k in keys) ** 0.5}
        out[label]["relative_diff"] = out[label]["diff_norm"] / out[label]["moved_norm"]
    return out


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def table(runs: dict[str, dict]) -> str:
    lines = ["| mode | wall s | steps/s | × reference | final KD | teacher fwd | peak RSS MB | peak CUDA MB |",
             "|---|---|---|---|---|---|---|---|"]
    for mode, r in runs.items():
        cuda = "–" if r["peak_cuda_mb"] is None else f"{r['peak_cuda_mb']:.0f}"
        ratio = r["steps_per_s"] / runs["reference"]["steps_per_s"]
        lines.append(f"| {mode} | {r['seconds']:.2f} | {r['steps_per_s']:.3f} | {ratio:.2f} | {r['final_kd']:.4g} | "
                     f"{r['teacher_forward_passes']} | {r['peak_rss_mb']:.0f} | {cuda} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a 2-layer random BERT instead of MiniLM")
    parser.add_argument("--task", default="sst2", help="GLUE task whose training sentences are the inputs")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-unlabeled", type=int, default=256)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, help="torch CPU threads in the children")
    parser.add_argument("--repeats", type=int, default=2, help="runs per mode, alternating; the fastest counts")
    parser.add_argument("--glue-dir", help="GLUE directory (default: found beside the checkout)")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--vector-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_child(args)))
        return

    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    command = " ".join(shlex.quote(part) for part in [Path(sys.executable).name, *sys.argv])
    load_before = uptime()
    attempts: dict[str, list[dict]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory(prefix="distac-bench-") as scratch:
        for _ in range(args.repeats):  # alternate the modes so load drifts on a shared machine hit both alike
            for mode in MODES:
                attempts[mode].append(spawn(args, mode, os.path.join(scratch, f"{mode}.safetensors")))
        agreement = compare_vectors(os.path.join(scratch, "reference.safetensors"),
                                    os.path.join(scratch, "distac.safetensors"))
    runs = {mode: max(tries, key=lambda r: r["steps_per_s"]) for mode, tries in attempts.items()}
    summary = {"speedup": runs["distac"]["steps_per_s"] / runs["reference"]["steps_per_s"],
               "speedup_bucketed": runs["distac_bucketed"]["steps_per_s"] / runs["reference"]["steps_per_s"],
               "agreement": agreement}
    settings = {"model": "tiny random BERT" if args.tiny else "MiniLM-L6 (bundled)", "task": args.task,
                "steps": args.steps, "batch_size": args.batch_size, "num_unlabeled": args.num_unlabeled,
                "max_length": args.max_length, "lr": args.lr, "threads": args.threads, "repeats": args.repeats,
                "cpu_count": os.cpu_count(), "machine": platform.machine(), "command": command,
                "uptime_before": load_before, "uptime_after": uptime()}
    print(f"DisTaC, {settings['model']} on {args.task}: {args.steps} steps, batch {args.batch_size}, "
          f"{args.num_unlabeled} unlabeled inputs, {runs['distac']['device']}; {settings['uptime_after']}")
    print(table(runs))
    rest = agreement["without_key_biases"]
    print(f"distac / reference: {summary['speedup']:.2f}x steps/s (length-bucketed: "
          f"{summary['speedup_bucketed']:.2f}x); distac vs reference final vectors bit-identical: "
          f"{agreement['bit_identical']}, ‖Δ‖/‖τ' − κτ‖ {agreement['all']['relative_diff']:.2e} "
          f"({rest['relative_diff']:.2e} without the attention key biases, max |Δ| {rest['max_abs_diff']:.2e})")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staged = out.with_suffix(".json.tmp")  # atomic: readers never see a half-written file
    staged.write_text(json.dumps({"settings": settings, "runs": runs, "summary": summary, "attempts": attempts},
                                 indent=2) + "\n")
    os.replace(staged, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
