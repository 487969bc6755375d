"""Two versions of cnnkit timed side by side in one run, alternating, on the same data:
training images/s of `benchmarks/throughput.py` (each tree's own copy) and the training
seconds of whole runs through the public API (`cnnkit.train`, engine and loop included).

    git worktree add /tmp/cnnkit-old OLD_COMMIT
    python benchmarks/side_by_side.py /tmp/cnnkit-old . --rounds 3
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

RUN = """
import json, sys, tempfile, cnnkit
with tempfile.TemporaryDirectory() as d:
    r = cnnkit.train(data=sys.argv[1], epochs=int(sys.argv[2]), val_fraction=0.2, seed=0,
                     out=d + "/r", log=lambda s: None, **json.loads(sys.argv[3]))
print(json.dumps([m["seconds"] for m in r.metrics]))
"""
RUNS = {"fast (fastnet 32/128/128)": {}, "tutorial (seed-cnn, batch 32)": {"recipe": "tutorial"}}


def in_tree(tree: Path, args: list[str]) -> str:
    env = {**os.environ, "PYTHONPATH": str(tree / "src"), "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, *args], env=env, check=True, capture_output=True,
                          text=True, cwd=tree).stdout


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("old", type=Path)
    p.add_argument("new", type=Path)
    p.add_argument("--data", default="../shared/data/cifar10-subset/cifar-10-batches-py")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default="benchmarks/side-by-side.json")
    a = p.parse_args()
    data = str(Path(a.data).resolve())
    results = {"old": {}, "new": {}}
    for _ in range(a.rounds):
        for side, tree in (("old", a.old.resolve()), ("new", a.new.resolve())):
            table = in_tree(tree, ["benchmarks/throughput.py", "--models", "fastnet:32,128,128",
                                   "seed-cnn", "--batch-sizes", "128", "--steps", "10"])
            for line in table.splitlines():
                cells = [c.strip() for c in line.split("|")]
                if len(cells) > 4 and cells[3] == "128":
                    results[side].setdefault(f"throughput {cells[1]} img/s", []).append(
                        float(cells[4]))
            for name, settings in RUNS.items():
                seconds = json.loads(in_tree(tree, ["-c", RUN, data, str(a.epochs),
                                                    json.dumps(settings)]))
                # epoch 0 pays one-off costs; the rest is the loop's steady state
                results[side].setdefault(f"train s/epoch, {name}", []).append(
                    statistics.mean(seconds[1:]))
    print(f"| measure (median of {a.rounds} alternating rounds) | old | new | new / old |")
    print("|---|---|---|---|")
    for key in results["old"]:
        old, new = statistics.median(results["old"][key]), statistics.median(results["new"][key])
        print(f"| {key} | {old:.2f} | {new:.2f} | {new / old:.3f} |")
    Path(a.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
