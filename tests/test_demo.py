"The main job end to end: `sd_lora_demo` writes the LoRA, the samples and the loss curve."
import subprocess
import numpy as np
import pytest
from PIL import Image
from sd_lora.models import load_pipeline
from sd_lora.inference import generate


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    r = subprocess.run(["sd_lora_demo", "--output_dir", str(out), "--max_train_steps", "40"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_writes_the_three_files(demo_dir):
    for name in ("pytorch_lora_weights.safetensors", "samples.png", "loss.png"):
        assert (demo_dir / name).stat().st_size > 0, name
    assert Image.open(demo_dir / "samples.png").size[0] > 200
    assert (demo_dir / "data" / "metadata.jsonl").exists()


def test_lora_changes_a_fresh_pipeline_and_disabling_restores_it(demo_dir):
    prompt, kw = ["a ginger tabby cat looking to the side"], dict(num_inference_steps=8, height=64, width=64)
    pipe = load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    base = np.asarray(generate(pipe, prompt, **kw)[0], dtype=float)
    pipe.load_lora_weights(demo_dir)
    lora = np.asarray(generate(pipe, prompt, **kw)[0], dtype=float)
    pipe.disable_lora()
    off = np.asarray(generate(pipe, prompt, **kw)[0], dtype=float)
    assert np.abs(lora - base).mean() > 1.0
    assert np.array_equal(off, base)
