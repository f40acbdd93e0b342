"""The recipes other trainers offer, one at a time, on the toy world: what each teaches and what it makes the model forget.

Every row teaches the shipped toy model "purple" with the LoRA lesson's recipe (`teach_config`: rank 8 on the UNet's
attention, lr 2e-3, 200 steps of 8 purple pictures with 8 base pictures beside them as `--reg_data_dir`) and changes
one setting. Each LoRA is scored by the toy world's evaluator on 6 pictures per prompt (fixed seeds): purple learned,
each base colour and the shapes kept, with the steps and the seconds of training. The lesson 08e_toy_recipes reads
the result. Usage: `python bench/toy_recipes.py --out bench/results/toy-recipes.json` (about fifteen minutes on two
CPU cores); `--recipes "label|label"` reruns some rows and keeps the others.
"""
import json
import tempfile
import time
from pathlib import Path

from sd_lora.core import quiet
from sd_lora.run import forget_accelerate_state
from sd_lora.toy.lora import concept_data, base_data, teach_config, lora_scores
from sd_lora.train import train
from sweep import sweep_arguments, write_sweep

# label -> (where the base pictures go: "reg" beside the data, "mixed" into its folder, "none"; changes to the recipe)
RECIPES = {
    "the recipe (--reg_data_dir, 8 + 8 a step)": ("reg", {}),
    "the recipe, seed 1": ("reg", dict(seed=1)),
    "the recipe, seed 2": ("reg", dict(seed=2)),
    "no base pictures": ("none", {}),
    "base pictures mixed into the folder (16 a step)": ("mixed", dict(train_batch_size=16)),
    "--prior_loss_weight 0.5": ("reg", dict(prior_loss_weight=0.5)),
    "--loss_type l1": ("reg", dict(loss_type="l1")),
    "--loss_type huber": ("reg", dict(loss_type="huber")),
    "--loss_type smooth_l1": ("reg", dict(loss_type="smooth_l1")),
    "--snr_gamma 5": ("reg", dict(snr_gamma=5.0)),
    "--debiased_estimation_loss": ("reg", dict(debiased_estimation_loss=True)),
    "--timestep_sampling logit_normal": ("reg", dict(timestep_sampling="logit_normal")),
    "--min_timestep 500": ("reg", dict(min_timestep=500)),
    "--max_timestep 500": ("reg", dict(max_timestep=500)),
    "--noise_offset 0.1": ("reg", dict(noise_offset=0.1)),
    "--input_perturbation 0.1": ("reg", dict(input_perturbation=0.1)),
    "--caption_dropout_rate 0.1": ("reg", dict(caption_dropout_rate=0.1)),
    "--optimizer prodigy (lr 1)": ("reg", dict(optimizer="prodigy", learning_rate=1.0)),
    "--optimizer adafactor": ("reg", dict(optimizer="adafactor")),
    "--optimizer lion (lr 2e-4)": ("reg", dict(optimizer="lion", learning_rate=2e-4)),
    "--optimizer adamw_schedulefree": ("reg", dict(optimizer="adamw_schedulefree", lr_scheduler="constant")),
    "--use_dora": ("reg", dict(use_dora=True)),
    "--lora_type loha": ("reg", dict(lora_type="loha")),
    "--lora_type lokr": ("reg", dict(lora_type="lokr")),
    "--train_text_encoder": ("reg", dict(train_text_encoder=True)),
}


def run_recipe(root: Path, base: str, steps: int, n: int, **kw) -> dict:
    "Train one recipe in `root` and score it: the evaluator's figures, with the steps and seconds of training."
    data = concept_data(root / "data", base_per_new=1.0 if base == "mixed" else 0.0)
    reg = base_data(root / "base") if base == "reg" else None
    cfg = teach_config(data, root / "run", reg, max_train_steps=steps, **kw)
    t0 = time.perf_counter()
    res = train(cfg)
    seconds = time.perf_counter() - t0
    forget_accelerate_state()
    return {**lora_scores(res.lora_path, n=n), "steps": steps, "seconds": round(seconds, 1),
            "samples_per_step": cfg.train_batch_size * (2 if reg else 1)}


if __name__ == "__main__":
    args, labels, runs = sweep_arguments(__doc__, RECIPES)
    quiet()
    for label in labels:
        base, kw = RECIPES[label]
        with tempfile.TemporaryDirectory() as tmp:
            runs[label] = run_recipe(Path(tmp), base, args.steps, args.n, **kw)
        print(label, json.dumps(runs[label]), flush=True)
        write_sweep(args.out, "one recipe option at a time on the toy world's purple LoRA (08b's recipe, 200 steps), scored on "
                    f"{args.n} pictures per prompt (fixed seeds); 'new' is purple learned, 'base' what was kept", RECIPES, runs)
