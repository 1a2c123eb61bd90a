"""TIES's global threshold passes, this tree against an earlier commit, side by side (issue 13).

Writes the merge benchmark's synthetic checkpoints, then times ``top_k_thresholds`` of both versions over
the same lazy task vectors, alternating which goes first each round, and checks the thresholds are equal:

    .venv/bin/python benchmarks/ties_threshold_ab.py --old 6ccd345 --scale 0.5 --rounds 4
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import merge_bench  # noqa: E402

from distac import io  # noqa: E402
from distac.merging import ties as current  # noqa: E402
from distac.vectors import LastKeyCache, LazyTaskVector  # noqa: E402


def module_at(commit: str, workdir: Path):
    """distac/merging/ties.py as it was at ``commit``, imported under another name."""
    source = subprocess.run(["git", "show", f"{commit}:distac/merging/ties.py"], check=True,
                            capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent).stdout
    path = workdir / "ties_at_commit.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("ties_at_commit", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", required=True, help="the commit to compare against")
    parser.add_argument("--scale", type=float, default=0.5)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--k", type=float, default=0.2)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        inputs = merge_bench.write_checkpoints(workdir, args.scale, args.tasks)
        versions = {"old": module_at(args.old, workdir), "new": current}

        def vectors():
            pretrained = LastKeyCache(io.open_checkpoint(inputs["pretrained"]))
            return [LazyTaskVector(pretrained, io.open_checkpoint(path)) for path in inputs["finetuned"]]

        keys = list(vectors()[0])
        seconds: dict[str, list[float]] = {name: [] for name in versions}
        for round_ in range(args.rounds):
            order = list(versions) if round_ % 2 == 0 else list(reversed(versions))
            thresholds = {}
            for name in order:
                started = time.perf_counter()
                thresholds[name] = versions[name].top_k_thresholds(vectors(), keys, args.k, torch.device("cpu"))
                seconds[name].append(time.perf_counter() - started)
            if thresholds["old"] != thresholds["new"]:
                raise SystemExit(f"thresholds differ: {thresholds}")
    for name, values in seconds.items():
        print(f"{name}: " + " ".join(f"{v:.2f}" for v in values) + " s")
    print(f"best old/new {min(seconds['old']) / min(seconds['new']):.2f} (thresholds equal)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
