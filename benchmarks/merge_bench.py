"""Merge speed and memory: distac streaming, a plain load-all script, distac in-memory and (optionally)
FusionBench, side by side on the same checkpoints, in one run.

Writes one pretrained and T fine-tuned checkpoints with the parameter shapes of CLIP ViT-B/32's image tower
(built from open_clip's ViT-B-32 config on the meta device: 152 tensors, 87.8 M parameters at --scale 1),
then for each method runs, each in a fresh subprocess so its peak RSS is its own:

  stream       distac.merging.streaming.merge_checkpoints: tensor by tensor, writes vector/ and model/
  plain        the baseline streaming is held to: safetensors.torch.load_file every checkpoint, subtract,
               distac's in-memory ``merge``, safetensors.torch.save_file the vector and the model
  memory       the distac API in memory: io.load_state_dict, TaskVector.from_state_dicts, merge, io.save
  fusionbench  (--fusionbench) FusionBench's implementation of the method on the same files, run by the
               interpreter of a separate virtual environment that this script creates and fills with
               ``pip install -c constraints.txt fusion-bench==VERSION`` (torch stays the pinned CPU build)

Times are wall seconds of loading + merging + saving (imports excluded); peak RSS is ru_maxrss of the child.
The modes alternate (their order rotates from method to method and round to round) and with --repeats N
each mode's fastest round counts, since a shared machine's load drifts. Reported ratios: stream/plain
(goal ≤ 1.2), stream peak RSS / (imports + T × largest tensor + one output shard) (goal ≤ 1.5), and
memory/fusionbench (goals: TA, consensus, EMR ≤ 1.0; TSV, Iso-C, Iso-CTS ≤ 0.5). Results are compared:
max |Δ| of the merged vector against distac in memory, and FusionBench's ‖Δ‖/‖τ_m‖ (consensus has no
FusionBench counterpart with the same output: its TALL-mask method returns one model per task, timed only).
A child whose RSS passes --max-rss-gib is stopped and reported as such (FusionBench's TIES needs > 17 GB at
full scale). WUDI's 300 Adam steps per matrix are slow on CPU; --wudi-steps lowers them for every mode.

  python benchmarks/merge_bench.py --scale 0.25 --tasks 4 --methods task_arithmetic tsv   # a quick look
  python benchmarks/merge_bench.py --fusionbench --wudi-steps 20 --repeats 2               # the full table
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "merge_bench.json"
FUSIONBENCH_VENV = ROOT / "benchmarks" / ".fusionbench-venv"
FUSIONBENCH_VERSION = "0.2.33"
METHOD_NAMES = ["task_arithmetic", "ties", "consensus", "tsv", "iso_c", "iso_cts", "emr", "wudi"]
DISTAC_MODES = ["stream", "plain", "memory"]
MIB = 1024**2

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
    sizes = [torch.Size(s).numel() for s in shapes.values()]
    return {"pretrained": str(workdir / "pretrained.safetensors"), "finetuned": finetuned, "tensors": len(shapes),
            "parameters": sum(sizes), "largest_tensor_bytes": 4 * max(sizes)}


def hyperparameters(method: str, wudi_steps: int) -> dict:
    return {"steps": wudi_steps} if method == "wudi" else {}


# ------------------------------------------------------------------------------------------------ children


def _peaks(start: float, import_rss: int, merge_seconds: float | None = None) -> dict:
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return {"seconds": seconds, "merge_seconds": merge_seconds, "peak_rss_bytes": peak, "import_rss_bytes": import_rss}


def run_distac_child(args: argparse.Namespace) -> dict:
    """One measured distac merge (stream, plain or memory)."""
    import torch
    from safetensors.torch import load_file, save_file

    from distac import io
    from distac.merging import METHODS, merge
    from distac.merging.streaming import merge_checkpoints
    from distac.vectors import TaskVector

    torch.set_num_threads(args.threads)
    params = hyperparameters(args.method, args.wudi_steps)
    out = Path(args.out)
    import_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # interpreter + torch, before any work
    start = time.perf_counter()
    merge_seconds = 0.0  # task vectors + merge, without reading or writing (not separable when streaming)
    if args.child == "stream":
        read_ahead = {} if args.read_ahead_bytes is None else {"read_ahead_bytes": args.read_ahead_bytes}
        merge_checkpoints(METHODS[args.method].create(**params), args.pretrained, args.finetuned, str(out),
                          device="cpu", max_shard_bytes=args.shard_bytes, progress=False, **read_ahead)
        merge_seconds = None
    elif args.child == "plain":
        pretrained = load_file(args.pretrained)
        vectors = []
        for uri in args.finetuned:
            finetuned = load_file(uri)
            tick = time.perf_counter()
            vectors.append({key: tensor - pretrained[key] for key, tensor in finetuned.items()})
            merge_seconds += time.perf_counter() - tick
        tick = time.perf_counter()
        merged = merge(args.method, vectors, device="cpu", **params)
        merge_seconds += time.perf_counter() - tick
        (out / "vector").mkdir(parents=True)
        save_file(dict(merged.vector), str(out / "vector" / "model.safetensors"))
        if merged.masks:
            for i, mask in enumerate(merged.masks):
                save_file(mask, str(out / f"mask-{i}.safetensors"))
        else:
            save_file({key: pretrained[key] + merged.vector[key] for key in pretrained}, str(out / "model.safetensors"))
    else:
        pretrained = io.load_state_dict(args.pretrained)
        vectors = []
        for uri in args.finetuned:
            finetuned = io.load_state_dict(uri)
            tick = time.perf_counter()
            vectors.append(TaskVector.from_state_dicts(pretrained, finetuned))
            merge_seconds += time.perf_counter() - tick
        tick = time.perf_counter()
        merged = merge(args.method, vectors, device="cpu", **params)
        merge_seconds += time.perf_counter() - tick
        merged.vector.save(out / "vector", max_shard_bytes=args.shard_bytes)
        if not merged.masks:
            io.save_state_dict(merged.vector.apply_to(pretrained), out / "model", max_shard_bytes=args.shard_bytes)
        else:
            for i, mask in enumerate(merged.masks):
                io.save_state_dict(mask, out / f"masks/task-{i}", max_shard_bytes=args.shard_bytes)
    return _peaks(start, import_rss, merge_seconds)


def _module_from_state(state: dict):
    """An nn.Module whose state dict is ``state`` (FusionBench's model pools hold modules). Plain tensors
    (buffers): FusionBench's TALL-mask method mixes them with ``keep_vars`` state dicts and refuses Parameters."""
    from torch import nn

    root = nn.Module()
    for key, tensor in state.items():
        *path, name = key.split(".")
        module = root
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, nn.Module())
            module = getattr(module, part)
        module.register_buffer(name, tensor)
    return root


def _plain(state: dict) -> dict:
    return {k: v.detach().contiguous() for k, v in state.items()}


def _fusionbench_algorithm(method: str, wudi_steps: int):
    """FusionBench's counterpart of a distac method, with distac's default hyperparameters."""
    from fusion_bench import method as fb
    from fusion_bench.method.emr_merging.emr_merging import EMRMerging

    return {
        "task_arithmetic": lambda: fb.TaskArithmeticAlgorithm(scaling_factor=1.0),
        "ties": lambda: fb.TiesMergingAlgorithm(scaling_factor=1.0, threshold=20, remove_keys=[], merge_func="mean"),
        "consensus": lambda: fb.TallMaskTaskArithmeticAlgorithm(tall_mask_lambda=0.5),
        "tsv": lambda: fb.TaskSingularVectorMerging(alpha=1.0),
        "iso_c": lambda: fb.IsotropicMergingInCommonSubspace(scaling_factor=1.0),
        "iso_cts": lambda: fb.IsotropicMergingInCommonAndTaskSubspace(scaling_factor=1.0, common_space_fraction=0.8),
        "emr": lambda: EMRMerging(),
        "wudi": lambda: fb.WUDIMerging(iter_num=wudi_steps, exclude_keys=[]),
    }[method]()


def run_fusionbench_child(args: argparse.Namespace) -> dict:
    """One measured FusionBench merge; runs in FusionBench's environment (no distac imports)."""
    import logging

    import torch
    from safetensors.torch import load_file, save_file

    from fusion_bench.modelpool import BaseModelPool

    logging.disable(logging.WARNING)  # the pool warns on every load of a pre-built module
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True)
    algorithm = _fusionbench_algorithm(args.method, args.wudi_steps)
    import_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    pretrained = load_file(args.pretrained)
    models = {"_pretrained_": _module_from_state({k: v.clone() for k, v in pretrained.items()})}
    for i, uri in enumerate(args.finetuned):
        models[f"task-{i}"] = _module_from_state(load_file(uri))
    tick = time.perf_counter()
    result = algorithm.run(BaseModelPool(models))  # task vectors + merge (+ adding the result to θ_pre)
    merge_seconds = time.perf_counter() - tick
    if args.method == "emr":
        save_file(_plain(result.unified_task_vector.state_dict()), str(out / "vector.safetensors"))
        for i, name in enumerate(result.modulators):
            save_file(_plain(result.modulators[name].mask.state_dict()), str(out / f"mask-{i}.safetensors"))
    elif args.method == "consensus":  # one model per task
        for i, model in enumerate(result["models"].values()):
            save_file(_plain(model.state_dict()), str(out / f"model-{i}.safetensors"))
    else:
        merged = _plain(result.state_dict())
        save_file(merged, str(out / "model.safetensors"))
    measured = _peaks(start, import_rss, merge_seconds)
    if args.method not in ("emr", "consensus"):  # the merged vector, for the comparison (not timed)
        save_file({k: merged[k] - pretrained[k] for k in pretrained}, str(out / "vector.safetensors"))
    return measured


def compare(first: str, second: str) -> dict:
    """max |a − b| and ‖a − b‖ / ‖b‖ over two checkpoints' common tensors."""
    import math

    from distac import io

    a, b = io.open_checkpoint(first), io.open_checkpoint(second)
    worst, diff, norm = 0.0, 0.0, 0.0
    for key in b:
        x, y = a[key].double(), b[key].double()
        worst = max(worst, float((x - y).abs().max()) if y.numel() else 0.0)
        diff += float((x - y).pow(2).sum())
        norm += float(y.pow(2).sum())
    return {"max_abs": worst, "relative": math.sqrt(diff / norm) if norm else math.sqrt(diff)}


# ----------------------------------------------------------------------------------------------- parent


def _rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def in_child(arguments: list[str], python: str = sys.executable, max_rss: float = float("inf")) -> dict:
    """Run this script with ``arguments`` in a fresh interpreter; its last stdout line is JSON.

    A child whose RSS passes ``max_rss`` bytes is killed: {"error": "..."} instead of its result.
    """
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        child = subprocess.Popen([python, __file__, *arguments], stdout=stdout, stderr=stderr,
                                 env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""})
        while child.poll() is None:
            if _rss_bytes(child.pid) > max_rss:
                child.kill()
                child.wait()
                return {"error": f"stopped: RSS passed {max_rss / 1024**3:.0f} GiB"}
            time.sleep(0.1)
        stdout.seek(0)
        stderr.seek(0)
        if child.returncode != 0:
            return {"error": f"exit {child.returncode}: {stderr.read()[-1500:]}"}
        return json.loads(stdout.read().strip().splitlines()[-1])


def ensure_fusionbench(venv: Path) -> str:
    """FusionBench's interpreter: a separate virtual environment, created and filled on first use."""
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import fusion_bench"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return str(python)
    print(f"installing fusion-bench=={FUSIONBENCH_VERSION} into {venv} (torch pinned by constraints.txt)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    (venv / ".gitignore").write_text("*\n")  # never committed
    subprocess.run([str(python), "-m", "pip", "install", "-q", "-c", str(ROOT / "constraints.txt"),
                    f"fusion-bench=={FUSIONBENCH_VERSION}"], check=True)
    subprocess.run(probe, check=True)
    return str(python)


def measure(mode: str, method: str, inputs: dict, out: Path, args, python: str) -> dict:
    arguments = ["--child", mode, "--method", method, "--pretrained", inputs["pretrained"],
                 "--finetuned", *inputs["finetuned"], "--out", str(out), "--wudi-steps", str(args.wudi_steps),
                 "--shard-bytes", str(args.shard_bytes), "--threads", str(args.threads)]
    if mode == "stream" and args.read_ahead_bytes is not None:
        arguments += ["--read-ahead-bytes", str(args.read_ahead_bytes)]
    return in_child(arguments, python=python, max_rss=args.max_rss_gib * 1024**3)


def vector_path(mode: str, run_dir: Path) -> Path:
    return run_dir / ("vector.safetensors" if mode == "fusionbench" else "vector")


def measure_method(method: str, modes: list[str], inputs: dict, workdir: Path, args, pythons: dict,
                   rotation: int) -> dict:
    """Every mode of one method, ``args.repeats`` rounds in rotating order; the fastest round of each mode."""
    runs: dict[str, list[dict]] = {mode: [] for mode in modes}
    for round_index in range(args.repeats):
        shift = (rotation + round_index) % len(modes)
        for mode in modes[shift:] + modes[:shift]:
            run_dir = workdir / f"{method}-{mode}-{round_index}"
            runs[mode].append({**measure(mode, method, inputs, run_dir, args, pythons[mode]), "dir": run_dir.name})
    row: dict = {"method": method, "hyperparameters": hyperparameters(method, args.wudi_steps)}
    for mode, results in runs.items():
        ok = [r for r in results if "error" not in r]
        row[mode] = min(ok, key=lambda r: r["seconds"]) if ok else results[-1]
        row[mode]["rounds_seconds"] = [r.get("seconds") for r in results]
    reference = vector_path("memory", workdir / row["memory"]["dir"])
    row["difference"] = {}
    for mode in modes:
        if mode == "memory" or "error" in row[mode] or (mode == "fusionbench" and method == "consensus"):
            continue
        row["difference"][mode] = in_child(["--child", "compare", "--finetuned",
                                            str(vector_path(mode, workdir / row[mode]["dir"])), str(reference)])
    return row


def _ratio(a: dict, b: dict, key: str) -> float | None:
    return a[key] / b[key] if a.get(key) is not None and b.get(key) else None


def summarize(row: dict, inputs: dict, args) -> dict:
    """The ratios the goals are stated in."""
    stream = row["stream"]
    bound = (stream.get("import_rss_bytes", 0) + len(inputs["finetuned"]) * inputs["largest_tensor_bytes"]
             + min(args.shard_bytes, 4 * inputs["parameters"]))
    summary = {"stream_over_plain_time": _ratio(stream, row["plain"], "seconds"),
               "stream_over_plain_rss": _ratio(stream, row["plain"], "peak_rss_bytes"),
               "rss_bound_bytes": bound,
               "stream_rss_over_bound": stream["peak_rss_bytes"] / bound if "peak_rss_bytes" in stream else None}
    if "fusionbench" in row:
        summary["memory_over_fusionbench_time"] = _ratio(row["memory"], row["fusionbench"], "seconds")
        summary["memory_over_fusionbench_merge_time"] = _ratio(row["memory"], row["fusionbench"], "merge_seconds")
        summary["memory_over_fusionbench_rss"] = _ratio(row["memory"], row["fusionbench"], "peak_rss_bytes")
        summary["stream_over_fusionbench_time"] = _ratio(stream, row["fusionbench"], "seconds")
    return summary


def _cell(value: float | None, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def format_table(rows: list[dict]) -> str:
    """A markdown table: times, peak RSS, the goal ratios, result differences."""
    fusionbench = any("fusionbench" in row for row in rows)
    modes = DISTAC_MODES + (["fusionbench"] if fusionbench else [])
    names = {"stream": "stream", "plain": "plain", "memory": "memory", "fusionbench": "FB"}
    header = (["method"] + [f"{names[m]} s" for m in modes] + [f"{names[m]} MiB" for m in modes]
              + (["memory merge s", "FB merge s"] if fusionbench else [])
              + ["stream/plain s", "stream RSS/bound"]
              + (["memory/FB s", "memory/FB merge s", "stream/FB s"] if fusionbench else [])
              + ["stream max|Δ|"] + (["FB ‖Δ‖/‖τ‖"] if fusionbench else []))
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        s = row["summary"]
        cells = [row["label"]]
        cells += [_cell(row[m].get("seconds"), ".1f") if "error" not in row[m] else "failed" for m in modes]
        cells += [_cell(row[m].get("peak_rss_bytes", 0) / MIB, ".0f") if "error" not in row[m] else "—"
                  for m in modes]
        if fusionbench:
            cells += [_cell(row[m].get("merge_seconds"), ".1f") for m in ("memory", "fusionbench")]
        cells += [_cell(s["stream_over_plain_time"], ".2f"), _cell(s["stream_rss_over_bound"], ".2f")]
        if fusionbench:
            cells += [_cell(s.get(f"memory_over_fusionbench_{k}"), ".2f") for k in ("time", "merge_time")]
            cells.append(_cell(s.get("stream_over_fusionbench_time"), ".2f"))
        cells.append(_cell(row["difference"].get("stream", {}).get("max_abs"), ".1e"))
        if fusionbench:
            cells.append(_cell(row["difference"].get("fusionbench", {}).get("relative"), ".1e"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine_load() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=8, help="number of fine-tuned checkpoints (default 8)")
    parser.add_argument("--methods", nargs="+", default=METHOD_NAMES, choices=METHOD_NAMES)
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of ViT-B/32's widths (1 = 87.8 M params)")
    parser.add_argument("--wudi-steps", type=int, default=300, help="Adam steps per matrix for wudi (reference 300)")
    parser.add_argument("--shard-bytes", type=int, default=256 * MIB, help="output shard size of distac's modes")
    parser.add_argument("--read-ahead-bytes", type=int,
                        help="stream mode: the merge's read-ahead budget (default: distac's; 0 = off)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads per merge")
    parser.add_argument("--repeats", type=int, default=1, help="rounds per method; each mode's fastest counts")
    parser.add_argument("--fusionbench", action="store_true",
                        help=f"also run FusionBench {FUSIONBENCH_VERSION} (installed into {FUSIONBENCH_VENV} "
                             "on first use)")
    parser.add_argument("--fusionbench-venv", default=str(FUSIONBENCH_VENV), help=argparse.SUPPRESS)
    parser.add_argument("--max-rss-gib", type=float, default=12.0, help="stop a child whose RSS passes this")
    parser.add_argument("--workdir", help="where to write checkpoints (default: a temporary directory)")
    parser.add_argument("--json", default=str(DEFAULT_OUT), help=f"results file (default {DEFAULT_OUT})")
    parser.add_argument("--child", choices=[*DISTAC_MODES, "fusionbench", "generate", "compare"],
                        help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--pretrained", help=argparse.SUPPRESS)
    parser.add_argument("--finetuned", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child == "generate":
        print(json.dumps(write_checkpoints(Path(args.out), args.scale, args.tasks)))
        return 0
    if args.child == "compare":
        print(json.dumps(compare(*args.finetuned)))
        return 0
    if args.child:
        run = run_fusionbench_child if args.child == "fusionbench" else run_distac_child
        print(json.dumps(run(args)))
        return 0

    modes = list(DISTAC_MODES)
    pythons = {mode: sys.executable for mode in modes}
    if args.fusionbench:
        pythons["fusionbench"] = ensure_fusionbench(Path(args.fusionbench_venv))
        modes.append("fusionbench")
    command = " ".join(["python", "benchmarks/merge_bench.py", *(argv if argv is not None else sys.argv[1:])])
    load_before = machine_load()
    print(f"{command}\n{load_before}", flush=True)
    with tempfile.TemporaryDirectory(prefix="merge-bench-", dir=args.workdir) as tmp:
        workdir = Path(tmp)
        inputs = in_child(["--child", "generate", "--out", str(workdir), "--scale", str(args.scale),
                           "--tasks", str(args.tasks)])
        params = inputs["parameters"]
        print(f"wrote {args.tasks + 1} checkpoints: {inputs['tensors']} tensors, {params / 1e6:.1f} M parameters, "
              f"{params * 4 / MIB:.0f} MiB each (fp32)", flush=True)
        rows = []
        for rotation, method in enumerate(args.methods):
            row = measure_method(method, modes, inputs, workdir, args, pythons, rotation)
            row["label"] = method + (f" ({args.wudi_steps} st)" if method == "wudi" else "")
            row["summary"] = summarize(row, inputs, args)
            rows.append(row)
            print(format_table([row]).splitlines()[-1], flush=True)
    load_after = machine_load()
    table = format_table(rows)
    print(f"\n{table}\n{load_after}")
    result = {"command": command, "load_before": load_before, "load_after": load_after,
              "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs",
              "tasks": args.tasks, "scale": args.scale, "tensors": inputs["tensors"], "parameters": params,
              "largest_tensor_bytes": inputs["largest_tensor_bytes"], "wudi_steps": args.wudi_steps,
              "shard_bytes": args.shard_bytes, "threads": args.threads, "repeats": args.repeats, "device": "cpu",
              "fusionbench": FUSIONBENCH_VERSION if args.fusionbench else None, "table": table, "results": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
