"Full fine-tuning (`sd_lora.finetune`) and EMA: the documented command, exact resume, two processes, bad input."
import os
import shutil
import subprocess
import sys

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file

from sd_lora.ema import make_ema, EMA_FILE
from sd_lora.finetune import parse_finetune_args
from sd_lora.launch import launch_train
from sd_lora.models import load_pipeline
from sd_lora.run import setup
from sd_lora.train import train
from helpers import tiny_config

UNET_FILE = "unet/diffusion_pytorch_model.safetensors"


def finetune_config(data, out, **kw):
    return tiny_config(data, out, finetune=True, learning_rate=1e-3, **kw)


def draw(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe("a cat", num_inference_steps=4, height=64, width=64, generator=torch.Generator().manual_seed(0)).images[0]


FINETUNE_FLAGS = """use_ema offload_ema foreach_ema non_ema_revision variant input_perturbation snr_gamma noise_offset
prediction_type dream_training dream_detail_preservation gradient_checkpointing use_8bit_adam allow_tf32
enable_xformers_memory_efficient_attention scale_lr checkpoints_total_limit resume_from_checkpoint push_to_hub""".split()


def test_the_reference_flags_are_in_the_help():
    r = subprocess.run(["sd_lora_finetune", "--help"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    for flag in FINETUNE_FLAGS: assert f"--{flag}" in r.stdout, flag
    assert "default: sd-model-finetuned)" in r.stdout


def test_the_documented_command_saves_a_pipeline_that_draws_differently(demo_data, tmp_path):
    "train_text_to_image.py's documented flags, with the tiny model, CPU sizes and --mixed_precision no."
    out = tmp_path / "sd-naruto-model"
    cmd = [sys.executable, "-m", "sd_lora.finetune", f"--train_data_dir={demo_data}", "--use_ema", "--resolution=64",
           "--center_crop", "--random_flip", "--train_batch_size=1", "--gradient_accumulation_steps=4",
           "--gradient_checkpointing", "--max_train_steps=3", "--learning_rate=1e-03", "--max_grad_norm=1",
           "--lr_scheduler=constant", "--lr_warmup_steps=0", f"--output_dir={out}", "--mixed_precision=no",
           "--report_to=none", "--seed=0"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"Saved {out}" in r.stdout
    pipe = StableDiffusionPipeline.from_pretrained(out)
    assert (out / "unet_non_ema" / "diffusion_pytorch_model.safetensors").exists()
    assert draw(pipe).tobytes() != draw(load_pipeline()).tobytes()


def test_an_interrupted_run_resumes_to_the_same_unet_and_ema(demo_data, tmp_path):
    kw = dict(max_train_steps=4, checkpointing_steps=2, use_ema=True, ema_decay=0.9)
    full = train(finetune_config(demo_data, tmp_path / "full", **kw))
    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    resumed = train(finetune_config(demo_data, tmp_path / "resumed", resume_from_checkpoint="latest", **kw))
    assert resumed.history.losses == pytest.approx(full.history.losses[2:], abs=1e-6)
    for name in (UNET_FILE, "unet_non_ema/diffusion_pytorch_model.safetensors"):
        a, b = load_file(tmp_path / "full" / name), load_file(tmp_path / "resumed" / name)
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a), name
    ema = load_file(tmp_path / "full" / "checkpoint-4" / EMA_FILE)
    assert int(ema["optimization_step"]) == 4  # stepped after every optimizer step


def test_the_ema_is_what_is_saved_and_validated(demo_data, tmp_path):
    "Without EMA the saved UNet is the trained one; with it, the average, which lags behind (decay 0.9)."
    plain = train(finetune_config(demo_data, tmp_path / "plain", max_train_steps=3))
    ema = train(finetune_config(demo_data, tmp_path / "ema", max_train_steps=3, use_ema=True, ema_decay=0.9))
    base = load_pipeline().unet.state_dict()
    trained = load_file(tmp_path / "ema" / "unet_non_ema" / "diffusion_pytorch_model.safetensors")
    averaged = load_file(tmp_path / "ema" / UNET_FILE)
    same_trained = load_file(tmp_path / "plain" / UNET_FILE)
    assert all(torch.allclose(trained[k], same_trained[k], atol=1e-6) for k in trained)  # EMA does not change training
    dist = lambda w: sum((w[k].float() - base[k].float()).norm() for k in w)
    assert 0 < dist(averaged) < dist(trained)
    assert not (tmp_path / "plain" / "unet_non_ema").exists()
    assert plain.lora.keys() == base.keys()
    # the same trained weights, another evaluation: the EMA run evaluates (and validates) with the average
    assert ema.eval_loss != pytest.approx(plain.eval_loss, abs=1e-7)


def test_lora_ema_saves_the_average_and_keeps_the_trained_lora(demo_data, tmp_path):
    res = train(tiny_config(demo_data, tmp_path, max_train_steps=3, use_ema=True, ema_decay=0.9))
    avg, raw = load_file(tmp_path / "pytorch_lora_weights.safetensors"), load_file(tmp_path / "non_ema" / "pytorch_lora_weights.safetensors")
    assert avg.keys() == raw.keys() and any(not torch.equal(avg[k], raw[k]) for k in avg)
    pipe = load_pipeline()
    pipe.load_lora_weights(tmp_path)
    pipe2 = load_pipeline()
    pipe2.load_lora_weights(tmp_path / "non_ema")
    assert draw(pipe).tobytes() != draw(pipe2).tobytes()
    assert all(torch.equal(avg["unet." + k], v) for k, v in res.lora.items())


def _finetune_and_keep(cfg):
    res = train(cfg)
    torch.save(res.lora, os.path.join(cfg.output_dir, f"unet-rank{os.environ['RANK']}.pt"))


def test_two_processes_fine_tune_identical_weights(demo_data, tmp_path):
    cfg = finetune_config(demo_data, tmp_path, cpu=True, max_train_steps=2, use_ema=True)
    launch_train(cfg, num_processes=2, use_port="29611", fn=_finetune_and_keep)
    a, b = torch.load(tmp_path / "unet-rank0.pt"), torch.load(tmp_path / "unet-rank1.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    saved = load_file(tmp_path / UNET_FILE)
    assert all(torch.equal(saved[k], a[k]) for k in saved)


def test_a_checkpoint_is_resumed_only_by_the_trainer_that_wrote_it(demo_data, tmp_path):
    train(tiny_config(demo_data, tmp_path / "lora", max_train_steps=2, checkpointing_steps=2))
    train(finetune_config(demo_data, tmp_path / "full", max_train_steps=2, checkpointing_steps=2))
    with pytest.raises(ValueError, match="written by sd_lora.train, not sd_lora.finetune"):
        setup(finetune_config(demo_data, tmp_path / "lora", resume_from_checkpoint="latest"))
    with pytest.raises(ValueError, match="written by sd_lora.finetune, not sd_lora.train"):
        setup(tiny_config(demo_data, tmp_path / "full", resume_from_checkpoint="latest"))
    with pytest.raises(FileNotFoundError, match="written without --use_ema"):
        setup(finetune_config(demo_data, tmp_path / "full", resume_from_checkpoint="latest", use_ema=True))


def test_ema_of_weights_that_are_not_there_is_a_clear_error():
    "A UNet built under accelerate's init_empty_weights has no values to average."
    from accelerate import init_empty_weights
    with init_empty_weights(): unet = UNet2DConditionModel.from_config(load_pipeline().unet.config)
    with pytest.raises(ValueError, match="meta device"): make_ema(list(unet.parameters()), parse_finetune_args(["--use_ema"]))


def test_a_missing_non_ema_revision_is_named(demo_data, tmp_path, monkeypatch):
    import huggingface_hub.constants, sd_lora.run as run_mod
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no retries against an unreachable Hub
    monkeypatch.setattr(run_mod, "resolve_model", lambda name: "some-user/some-model")  # a Hub id, as a user gives
    cfg = finetune_config(demo_data, tmp_path, non_ema_revision="no-such-branch", use_ema=True)
    with pytest.raises(ValueError, match="--non_ema_revision 'no-such-branch'"):
        run_mod.load_non_ema_weights(load_pipeline().unet, cfg)


def test_a_non_ema_revision_of_a_local_folder_is_refused(demo_data, tmp_path):
    with pytest.raises(ValueError, match="has no revisions"):
        setup(finetune_config(demo_data, tmp_path, non_ema_revision="no-such-branch"))


def test_input_perturbation_and_dream_train_and_change_the_loss(demo_data, tmp_path):
    plain = train(finetune_config(demo_data, tmp_path / "a", max_train_steps=2))
    zero = train(finetune_config(demo_data, tmp_path / "b", max_train_steps=2, input_perturbation=0.0))
    perturbed = train(finetune_config(demo_data, tmp_path / "c", max_train_steps=2, input_perturbation=0.1))
    dream = train(finetune_config(demo_data, tmp_path / "d", max_train_steps=2, dream_training=True))
    assert zero.history.losses == plain.history.losses
    for run in (perturbed, dream):
        assert all(l == l for l in run.history.losses) and run.history.losses != plain.history.losses
