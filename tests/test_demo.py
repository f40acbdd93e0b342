"The main job end to end: `sd_lora_demo` teaches the toy model purple and writes the LoRA, samples, loss curve and scores."
import json
import os
import subprocess
import numpy as np
import pytest
from PIL import Image
from sd_lora.models import TOY, load_pipeline
from sd_lora.inference import generate


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_VERBOSITY"}  # as a newcomer's shell has it
    r = subprocess.run(["sd_lora_demo", "--output_dir", str(out), "--max_train_steps", "120", "--eval_n", "4"],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| with the LoRA |" in r.stdout
    assert "requires torchvision" not in r.stdout + r.stderr  # transformers' notice says nothing about the run
    return out


def test_writes_the_files(demo_dir):
    for name in ("pytorch_lora_weights.safetensors", "samples.png", "loss.png", "scores.json", "scores.md"):
        assert (demo_dir / name).stat().st_size > 0, name
    assert Image.open(demo_dir / "samples.png").size[0] > 200
    assert "purple" in (demo_dir / "data" / "metadata.jsonl").read_text()
    cfg = json.loads((demo_dir / "train_config.json").read_text())  # the base pictures go to the trainer's prior preservation
    assert cfg["reg_data_dir"] == str(demo_dir / "base") and "purple" not in (demo_dir / "base" / "metadata.jsonl").read_text()


def test_scores_show_purple_learned(demo_dir):
    s = json.loads((demo_dir / "scores.json").read_text())
    before, after = s["base model"], s["with the LoRA"]
    assert after["new"]["purple"] >= before["new"]["purple"] + 0.3, s
    assert before["base"]["colour"] >= 0.85 and after["base"]["colour"] >= 0.7, s


def test_lora_changes_a_fresh_pipeline_and_disabling_restores_it(demo_dir):
    prompt, kw = ["a purple circle"], dict(num_inference_steps=8)
    pipe = load_pipeline(TOY)
    pipe.set_progress_bar_config(disable=True)
    base = np.asarray(generate(pipe, prompt, **kw)[0], dtype=float)
    pipe.load_lora_weights(demo_dir)
    lora = np.asarray(generate(pipe, prompt, **kw)[0], dtype=float)
    pipe.disable_lora()
    off = np.asarray(generate(pipe, prompt, **kw)[0], dtype=float)
    assert np.abs(lora - base).mean() > 1.0
    assert np.array_equal(off, base)


def test_other_models_keep_the_photo_demo(tmp_path):
    r = subprocess.run(["sd_lora_demo", "--output_dir", str(tmp_path), "--pretrained_model_name_or_path",
                        "sd_lora:tiny-sd", "--max_train_steps", "3"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "samples.png").exists() and not (tmp_path / "scores.md").exists()
    assert "astronaut" in (tmp_path / "data" / "metadata.jsonl").read_text()
