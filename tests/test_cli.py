"The command lines: the reference's documented command, `accelerate launch` on two CPU processes, fp16 on a GPU."
import os
import subprocess
import sys
import pytest
import torch
from dataclasses import fields
from sd_lora.config import TrainConfig
from sd_lora.models import TINY_SD, resolve_model, load_pipeline
from helpers import read_json

REFERENCE_FLAGS = """pretrained_model_name_or_path revision variant dataset_name dataset_config_name train_data_dir
image_column caption_column validation_prompt num_validation_images validation_epochs max_train_samples output_dir
cache_dir seed resolution center_crop random_flip image_interpolation_mode train_batch_size num_train_epochs
max_train_steps gradient_accumulation_steps gradient_checkpointing learning_rate scale_lr lr_scheduler lr_warmup_steps
snr_gamma use_8bit_adam allow_tf32 dataloader_num_workers adam_beta1 adam_beta2 adam_weight_decay adam_epsilon
max_grad_norm push_to_hub hub_token prediction_type hub_model_id logging_dir mixed_precision report_to local_rank
checkpointing_steps checkpoints_total_limit resume_from_checkpoint enable_xformers_memory_efficient_attention
noise_offset rank""".split()
SDXL_FLAGS = """pretrained_vae_model_name_or_path train_text_encoder debug_loss enable_npu_flash_attention""".split()


def run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, **kw)
    assert r.returncode == 0, f"{cmd}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return r


def documented_flags(model, data, out):
    "The diffusers docs' command, with the tiny model and demo data swapped in and CPU-sized numbers."
    return [f"--pretrained_model_name_or_path={model}", f"--train_data_dir={data}", "--caption_column=text",
            "--resolution=64", "--random_flip", "--train_batch_size=1", "--num_train_epochs=100",
            "--max_train_steps=6", "--checkpointing_steps=3", "--learning_rate=1e-04", "--lr_scheduler=constant",
            "--lr_warmup_steps=0", "--seed=42", f"--output_dir={out}", "--validation_prompt=cute dragon creature",
            "--validation_steps=3", "--num_validation_images=2", "--report_to=tensorboard"]


def test_every_reference_flag_is_a_config_field_and_a_cli_flag():
    "The flags of train_text_to_image_lora.py and of train_text_to_image_lora_sdxl.py."
    names = {f.name for f in fields(TrainConfig)}
    assert set(REFERENCE_FLAGS + SDXL_FLAGS) <= names
    help_text = run(["sd_lora_train", "--help"]).stdout
    for flag in REFERENCE_FLAGS + SDXL_FLAGS: assert f"--{flag}" in help_text, flag


def test_documented_command_trains_checkpoints_validates_and_saves(demo_data, tmp_path):
    out = tmp_path / "sd-demo-lora"
    r = run([sys.executable, "-m", "sd_lora.train", *documented_flags(resolve_model(TINY_SD), demo_data, out),
             "--mixed_precision=no"])
    # the run's choices, printed once: a validation prompt asks for the evaluation; random crops of these photos can't be cached
    assert "evaluation: the fixed-noise loss on 12 training images" in r.stderr
    assert "latents: encoded at every step" in r.stderr and "accumulation: none" in r.stderr
    for name in ("pytorch_lora_weights.safetensors", "pytorch_lora_weights_kohya.safetensors", "README.md",
                 "checkpoint-3", "checkpoint-6", "validation/step-000003.png", "validation/final.png"):
        assert (out / name).exists(), name
    # TensorBoard really written: scalars and images readable with its event reader
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    event_dirs = {p.parent for p in (out / "logs").rglob("events.out.tfevents.*")}
    tags = {"scalars": set(), "images": set()}
    for d in event_dirs:
        ea = EventAccumulator(str(d), size_guidance={"images": 0, "scalars": 0}).Reload()
        for k in tags: tags[k] |= set(ea.Tags()[k])
    assert {"train_loss", "lr", "grad_norm", "eval_loss"} <= tags["scalars"]
    assert {"validation", "final"} <= tags["images"]
    # the output loads with diffusers' own loader and changes the UNet
    pipe, base = load_pipeline(), load_pipeline()
    pipe.load_lora_weights(out)
    x, t, text = torch.randn(1, 4, 16, 16), torch.tensor([500]), torch.randn(1, 77, 32)
    with torch.no_grad():
        assert not torch.allclose(pipe.unet(x, t, text).sample, base.unet(x, t, text).sample, atol=1e-5)


def test_accelerate_launch_two_cpu_processes(demo_data, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true"}
    r = run(["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29571",
         "-m", "sd_lora.train", f"--train_data_dir={demo_data}", f"--output_dir={out}", "--resolution=64",
         "--train_batch_size=2", "--max_train_steps=3", "--learning_rate=1e-3", "--lr_warmup_steps=0",
         "--seed=0", "--report_to=none", "--cpu"], env=env)
    cfg = read_json(out / "train_config.json")
    assert cfg["num_processes"] == 2 and cfg["global_step"] == 3
    assert r.stderr.count("evaluation: off") == 1  # the main process alone prints the run's choices
    assert (out / "pytorch_lora_weights.safetensors").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 needs a CUDA GPU")
def test_documented_fp16_launch_without_the_script_flag(demo_data, tmp_path):
    "The reference crashes here ('Attempting to unscale FP16 gradients'); we take the precision from accelerate."
    out = tmp_path / "fp16"
    flags = [f for f in documented_flags(resolve_model(TINY_SD), demo_data, out) if "report_to" not in f]
    run(["accelerate", "launch", "--mixed_precision=fp16", "--num_processes", "1", "-m", "sd_lora.train", *flags,
         "--report_to=none"])
    assert read_json(out / "train_config.json")["mixed_precision"] == "fp16"
    assert (out / "pytorch_lora_weights.safetensors").exists()


def test_bad_flag_values_are_refused_with_the_choices(capsys):
    from sd_lora.config import parse_args
    with pytest.raises(SystemExit):
        parse_args(["--mixed_precision", "fp8"])
    assert "choose from" in capsys.readouterr().err


def test_the_main_cell_does_nothing_in_a_jupyter_kernel():
    "JupyterLab runs notebooks as __main__ too: the cell that starts the CLI must not fire there."
    import json
    from pathlib import Path
    import nbformat
    from nbclient import NotebookClient
    cells = json.loads(Path("nbs/05b_train.ipynb").read_text())["cells"]
    (src,) = ["".join(c["source"]) for c in cells if c["cell_type"] == "code" and '__name__ == "__main__"' in "".join(c["source"])]
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("from fastcore.imports import IN_NOTEBOOK\ndef main(): raise SystemExit('main ran')"),
        nbformat.v4.new_code_cell(src), nbformat.v4.new_code_cell("print('still here')")])
    NotebookClient(nb, kernel_name="python3", timeout=120).execute()
    assert nb.cells[2].outputs[0]["text"] == "still here\n"
