"""LoRA against full fine-tuning on the toy world, with and without EMA and base pictures: what each learns and forgets.

Every recipe teaches the shipped toy model "purple" on the same pictures (32 of each purple shape, and, for "base 1:1",
as many pictures of the base colours), for the same number of steps, and is scored by the toy world's evaluator on 6
pictures per prompt (fixed seeds): purple learned, each base colour and the shapes kept. The lesson 08d_toy_finetune
reads the result, and the pictures beside it (the .png of the same name). Usage: `python bench/toy_finetune.py --out bench/results/toy-finetune-vs-lora.json` (about ten minutes
on two CPU cores).
"""
import json
import tempfile
import time
import matplotlib
matplotlib.use("Agg")
from pathlib import Path

from sd_lora.core import quiet
from sd_lora.mixing import comparison_grid
from sd_lora.toy.lora import concept_data, teach_config, lora_scores, toy_pipeline
from sd_lora.toy.world import sample
from sd_lora.train import train
from sweep import sweep_arguments, write_sweep

PROMPTS = ["a purple circle", "a purple square", "a purple triangle", "a red circle", "a green square",
           "a blue triangle", "a yellow circle"]

# label -> (base pictures per purple one, changes to the recipe); LoRA at teach_config's lr (2e-3), the whole UNet at
# a twentieth and at a half of it
RECIPES = {
    "LoRA, purple only": (0.0, {}),
    "LoRA, purple only, EMA": (0.0, dict(use_ema=True)),
    "LoRA, base 1:1": (1.0, {}),
    "LoRA, base 1:1, EMA": (1.0, dict(use_ema=True)),
    "full fine-tune, purple only": (0.0, dict(finetune=True, learning_rate=1e-4)),
    "full fine-tune, purple only, EMA": (0.0, dict(finetune=True, learning_rate=1e-4, use_ema=True)),
    "full fine-tune, base 1:1": (1.0, dict(finetune=True, learning_rate=1e-4)),
    "full fine-tune, base 1:1, EMA": (1.0, dict(finetune=True, learning_rate=1e-4, use_ema=True)),
    "full fine-tune at lr 1e-3, purple only": (0.0, dict(finetune=True, learning_rate=1e-3)),
    "full fine-tune at lr 1e-3, base 1:1": (1.0, dict(finetune=True, learning_rate=1e-3)),
    "full fine-tune at lr 1e-3, base 1:1, EMA": (1.0, dict(finetune=True, learning_rate=1e-3, use_ema=True)),
}


def run_recipe(root: Path, base_per_new: float, steps: int, n: int, **kw) -> tuple[dict, list]:
    "Train one recipe in `root` and score it: the evaluator's figures, the steps and seconds of training; and pictures."
    data = concept_data(root / f"data-{base_per_new}", n_new=32, base_per_new=base_per_new)
    cfg = teach_config(data, root / "run", max_train_steps=steps, **kw)
    t0 = time.perf_counter()
    res = train(cfg)
    seconds = time.perf_counter() - t0
    model = dict(pretrained_model_name_or_path=str(res.output_dir)) if cfg.finetune else {}
    lora = None if cfg.finetune else res.lora_path
    scores = lora_scores(lora, n=n, **model)
    pictures = [i for i, _ in sample(toy_pipeline(lora, **model), PROMPTS, n=1, seed=0)]
    return ({**scores, "steps": steps, "seconds": round(seconds, 1),
             "trained_parameters": sum(v.numel() for v in res.lora.values())}, pictures)


if __name__ == "__main__":
    args, labels, runs = sweep_arguments(__doc__, RECIPES)  # some recipes again: the others' figures stay, not their pictures
    quiet()
    rows = {"base model": [i for i, _ in sample(toy_pipeline(), PROMPTS, n=1, seed=0)]}
    for label in labels:
        base_per_new, kw = RECIPES[label]
        with tempfile.TemporaryDirectory() as tmp:
            runs[label], rows[label] = run_recipe(Path(tmp), base_per_new, args.steps, args.n, **kw)
        comparison_grid(rows, PROMPTS, size=1.0).savefig(Path(args.out).with_suffix(".png"), dpi=80, bbox_inches="tight")
        print(label, json.dumps(runs[label]), flush=True)
        write_sweep(args.out, "LoRA against full fine-tuning of the toy model on purple, same data and steps, scored on "
                    f"{args.n} pictures per prompt (fixed seeds); 'new' is purple learned, 'base' what was kept", RECIPES, runs)
