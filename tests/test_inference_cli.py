"`sd_lora_generate`: a grid PNG from the base model and a mix of two trained LoRAs (ours and kohya), fused or not."
import subprocess
import numpy as np
import pytest
from PIL import Image
from sd_lora.outputs import KOHYA_FILE
from sd_lora.train import train
from sd_lora.inference import inference_pipeline, generate, load_lora
from sd_lora.mixing import generate_cli, set_lora_weights
from helpers import tiny_config

PROMPTS = ["a red square", "a cat on a mat"]


@pytest.fixture(scope="module")
def loras(demo_data, tmp_path_factory):
    "Two LoRAs trained for 10 steps each, in run folders named 'style' and 'subject'."
    runs = {}
    for name, seed in [("style", 0), ("subject", 1)]:
        out = tmp_path_factory.mktemp("runs") / name
        runs[name] = train(tiny_config(demo_data, out, max_train_steps=10, seed=seed, rank=4, lora_alpha=8,
                                       eval_samples=0)).output_dir
    return runs


def cli(*args):
    r = subprocess.run(["sd_lora_generate", *map(str, args)], capture_output=True, text=True, timeout=300)
    return r


def prompt_args():
    return [a for p in PROMPTS for a in ("--prompt", p)]


def test_console_script_writes_a_grid_with_two_loras(loras, tmp_path):
    out = tmp_path / "sub" / "grid.png"
    r = cli("--lora", f"{loras['style']}:0.7", "--lora", f"{loras['subject'] / KOHYA_FILE}:0.5", *prompt_args(),
            "--seed", 3, "--num_inference_steps", 6, "--scheduler", "dpm", "--negative_prompt", "blurry",
            "--guidance_scale", 6, "--height", 64, "--width", 64, "--fuse", "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"Wrote {out}" in r.stdout and "rows base, style x0.7 + subject x0.5; 2 prompt columns" in r.stdout
    im = Image.open(out)
    assert im.format == "PNG" and im.size == (360, 360)  # 2 rows x 2 columns, 1.8 inches each at 100 dpi


def test_cli_fuse_changes_nothing_but_speed_and_no_base_drops_the_row(loras, tmp_path, capsys):
    args = ["--lora", f"{loras['style']}:0.7", "--lora", f"{loras['subject']}:0.5", *prompt_args(),
            "--num_inference_steps", "5", "--seed", "2"]
    generate_cli(args + ["--out", str(tmp_path / "plain.png")])
    generate_cli(args + ["--fuse", "--out", str(tmp_path / "fused.png")])
    plain, fused = (np.asarray(Image.open(tmp_path / f"{n}.png"), dtype=float) for n in ("plain", "fused"))
    assert plain.shape == fused.shape and np.abs(plain - fused).mean() < 0.5
    generate_cli(args + ["--no_base", "--out", str(tmp_path / "mix.png")])
    assert Image.open(tmp_path / "mix.png").height < plain.shape[0]
    assert "rows style x0.7 + subject x0.5; 2 prompt columns" in capsys.readouterr().out


def test_fused_mix_generates_the_unfused_images(loras):
    "What --fuse does, on the images themselves: fused and unfused pipelines agree to one grey level."
    images = []
    for fuse in (False, True):
        pipe = inference_pipeline(device="cpu")
        load_lora(pipe, loras["style"], "style")
        load_lora(pipe, loras["subject"], "subject")
        set_lora_weights(pipe, {"style": 0.7, "subject": 0.5})
        if fuse: pipe.fuse_lora(adapter_names=["style", "subject"])
        images.append(np.stack([np.asarray(i, dtype=float) for i in generate(pipe, PROMPTS, seed=2,
                                                                             num_inference_steps=5)]))
    assert np.abs(images[0] - images[1]).max() <= 1


def test_cli_base_only_and_same_folder_twice_gets_unique_names(loras, tmp_path, capsys):
    generate_cli([*prompt_args(), "--num_inference_steps", "3", "--out", str(tmp_path / "base.png")])
    assert "rows base; 2 prompt columns" in capsys.readouterr().out
    generate_cli(["--lora", str(loras["style"]), "--lora", f"{loras['style']}:-1", *prompt_args(),
                  "--num_inference_steps", "3", "--out", str(tmp_path / "twice.png")])
    assert "rows base, style x1 + style_2 x-1" in capsys.readouterr().out


def test_cli_errors_are_clear(loras, tmp_path, capsys):
    with pytest.raises(SystemExit):
        generate_cli(["--no_base", "--prompt", "x", "--out", str(tmp_path / "g.png")])
    assert "nothing to draw" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        generate_cli(["--scheduler", "heun", "--prompt", "x"])
    assert "invalid choice: 'heun'" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="does not exist"):
        generate_cli(["--lora", str(tmp_path / "missing"), "--prompt", "x", "--num_inference_steps", "2",
                      "--out", str(tmp_path / "g.png")])
    assert not (tmp_path / "g.png").exists()


def test_help_lists_the_flags(capsys):
    with pytest.raises(SystemExit):
        generate_cli(["--help"])
    out = capsys.readouterr().out
    for flag in ("--pretrained_model_name_or_path", "--lora", "--prompt", "--seed", "--fuse", "--negative_prompt",
                 "--guidance_scale", "--num_inference_steps", "--height", "--width", "--scheduler", "--out",
                 "--allow_pickle", "--no_base"):
        assert flag in out, flag
