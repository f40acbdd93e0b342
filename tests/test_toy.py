"The toy world: the shipped weights reach the base scores, short LoRAs learn purple and stripes and keep the rest, the rebuild command runs."
import json
import subprocess
import sys
from pathlib import Path
import numpy as np
import pytest
from PIL import Image
from sd_lora.models import TOY, resolve_model, load_pipeline
from sd_lora.toy.world import BASE_COLOURS, NEW_COLOURS, COLOURS, world, read_colour, read_shape, prompts_for, sample, score
from sd_lora.toy.lora import concept_data, base_data, teach_config, lora_scores, toy_pipeline
from sd_lora.toy.texture import read_texture, read_stripe_colour, texture_data, texture_scores, texture_table
from sd_lora.train import train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def toy():
    pipe = load_pipeline(TOY)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_evaluator_reads_the_worlds_own_pictures():
    items = world(list(COLOURS), 6, seed=11)
    assert sum(read_colour(i) == t.split()[1] for i, t in items) >= len(items) - 1
    assert sum(read_shape(i) == t.split()[2] for i, t in items) >= len(items) - 2


def test_read_colour_reads_only_the_masked_pixels():
    a = np.full((32, 32, 3), 255, dtype=np.uint8)
    a[8:24, 8:16], a[8:24, 16:24] = COLOURS["red"], COLOURS["blue"]
    img, left, right = Image.fromarray(a), np.zeros((32, 32), bool), np.zeros((32, 32), bool)
    left[8:24, 4:16], right[8:24, 16:28] = True, True  # a third of each is background: the median is the shape's
    assert read_colour(img, mask=left) == "red" and read_colour(img, mask=right) == "blue"
    assert read_colour(img, mask=np.zeros((32, 32), bool)) == "none"


def test_shipped_weights_are_small_and_recorded():
    folder = Path(resolve_model(TOY))
    assert folder.is_relative_to(ROOT / "sd_lora")
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size < 6e6, size
    card = json.loads((folder / "toy_world.json").read_text())
    assert card["command"].startswith("sd_lora_pretrain_toy") and card["settings"]["seed"] == 0
    assert "recursive-include sd_lora/toy/model" in (ROOT / "MANIFEST.in").read_text()
    assert "sd_lora_pretrain_toy=sd_lora.toy.pretrain:pretrain_cli" in (ROOT / "settings.ini").read_text()


def test_shipped_weights_reach_the_base_scores(toy):
    s = score(sample(toy, prompts_for(list(BASE_COLOURS)), n=4, seed=1))
    assert s["colour"] >= 0.9 and s["shape"] >= 0.9, s
    assert score(sample(toy, prompts_for(list(NEW_COLOURS)), n=4, seed=1))["purple"] <= 0.25


def test_default_scheduler_samples_cleanly(toy):
    "`load_pipeline(TOY)` with the pipeline's own defaults (50 DDIM steps, guidance 7.5) draws the prompt."
    import torch
    images = toy(["a blue square", "a yellow triangle"], generator=torch.Generator().manual_seed(0)).images
    assert [read_colour(i) for i in images] == ["blue", "yellow"]


def test_short_lora_learns_purple_and_keeps_the_base_colours(tmp_path):
    data, reg = concept_data(tmp_path / "data"), base_data(tmp_path / "base")
    res = train(teach_config(data, tmp_path / "lora", reg, max_train_steps=200))
    before, after = lora_scores(None, n=4, seed=3), lora_scores(res.lora_path, n=4, seed=3)
    # 12 purple pictures each: a rise of at least 0.5 is far beyond what sampling noise does to a fixed-seed score
    assert after["new"]["purple"] - before["new"]["purple"] >= 0.5, (before, after)
    for c in BASE_COLOURS: assert after["base"][c] >= 0.75, (c, after)
    assert after["base"]["shape"] >= 0.85, after


def test_rebuild_command_runs_a_few_steps(tmp_path):
    out = tmp_path / "toy"
    r = subprocess.run([sys.executable, "-m", "sd_lora.toy.pretrain", "--output_dir", str(out), "--vae_steps", "2",
                        "--unet_steps", "2", "--n_per_concept", "1", "--eval_n", "0"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    card = json.loads((out / "toy_world.json").read_text())
    assert card["settings"]["unet_steps"] == 2
    pipe = load_pipeline(str(out))
    assert pipe.unet.dtype == pipe.vae.dtype == pipe.text_encoder.dtype
    assert pipe.scheduler.config.timestep_spacing == "leading"


def test_texture_evaluator_tells_striped_from_plain_in_every_colour():
    plain, striped = world(list(COLOURS), 4, seed=12), world(list(COLOURS), 4, seed=12, texture="striped")
    assert [read_texture(i) for i, _ in plain] == ["plain"] * len(plain)
    assert [read_texture(i) for i, _ in striped] == ["striped"] * len(striped)
    assert [read_stripe_colour(i) for i, _ in striped] == [t.split()[2] for _, t in striped]
    assert read_texture(Image.new("RGB", (32, 32), "white")) == "none"


def test_short_lora_learns_stripes_and_plain_prompts_stay_plain(tmp_path):
    res = train(teach_config(texture_data(tmp_path / "data"), tmp_path / "lora", base_data(tmp_path / "plain"),
                             max_train_steps=200, target_modules="attention_ff_conv"))
    before, after = texture_scores(None, n=3, seed=5), texture_scores(res.lora_path, n=3, seed=5)
    # 36 striped pictures: from near 0 to most of them is far beyond sampling noise at fixed seeds
    assert after["striped"]["texture"] - before["striped"]["texture"] >= 0.5, (before, after)
    assert after["plain"]["texture"] >= 0.85 and after["plain colours"]["colour"] >= 0.85, after
    # the scores sample with the LoRA fused (faster); fused or not, a LoRA on attention, feed-forward and convs
    # draws the same pictures to a pixel level
    prompts = ["a red striped circle", "a blue square"]
    unfused, fused = (np.stack([np.asarray(i, dtype=float) for i, _ in sample(p, prompts, n=2, seed=0)])
                      for p in (toy_pipeline(res.lora_path, fuse=False), toy_pipeline(res.lora_path)))
    assert np.abs(unfused - fused).max() <= 3


def test_texture_table_reads_the_texture_it_is_given():
    part = lambda t, c, s: {"texture": t, "colour": c, "shape": s}
    row = {"dotted": part(1.0, 0.5, 0.25), "plain": part(0.75, float("nan"), 1.0), "plain colours": part(0, 1.0, 0.9)}
    table = texture_table({"a run": row}, texture="dotted")
    assert "| run | dotted prompts: dotted |" in table
    assert "| a run | 100% | 50% | 25% | 75% | 100% | 90% |" in table
