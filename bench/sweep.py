"""The command line and the JSON record shared by the toy world's sweeps (`bench/toy_recipes.py`,
`bench/toy_finetune.py`): which recipes to run, the figures of an earlier run kept when only some are rerun."""
import argparse
import json
import os
import shlex
import sys
from pathlib import Path


def sweep_arguments(doc: str, recipes: dict):
    "Parse `--steps --n --recipes --out`; return the arguments, the labels to run, and the runs already recorded."
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--n", type=int, default=6, help="pictures per prompt for the evaluator")
    p.add_argument("--recipes", help="labels separated by | (default: all); the others' figures stay")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    labels = args.recipes.split("|") if args.recipes else list(recipes)
    unknown = [label for label in labels if label not in recipes]
    if unknown: p.error(f"unknown recipes {unknown}: choose from {list(recipes)}")
    out = Path(args.out)
    runs = json.loads(out.read_text())["runs"] if args.recipes and out.exists() else {}
    return args, labels, runs


def write_sweep(out: str, what: str, recipes: dict, runs: dict):
    "Write the sweep's record: what it measured, the command that made it, and its runs in the recipes' order."
    Path(out).write_text(json.dumps({
        "what": what, "command": shlex.join(["python", "bench/" + Path(sys.argv[0]).name, *sys.argv[1:]]),
        "cpu_threads": os.cpu_count(), "runs": {k: runs[k] for k in recipes if k in runs}}, indent=1) + "\n")
