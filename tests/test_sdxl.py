"SDXL, SD2 v-prediction and text-encoder LoRA: trained from the command line, saved, and loaded back by diffusers."
import os
import subprocess
import sys
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from diffusers import StableDiffusionXLPipeline
from sd_lora.models import TINY_SD2, TINY_SDXL, load_pipeline, resolve_model
from sd_lora.outputs import KOHYA_FILE
from sd_lora.lazy_cache import LazyCache
from sd_lora.run import setup
from sd_lora.train import train_loop, main
from helpers import tiny_config, read_json, full_and_resumed


def run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, **kw)
    assert r.returncode == 0, f"{cmd}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return r


def images(pipe, prompt="a cat"):
    pipe.set_progress_bar_config(disable=True)
    out = pipe([prompt], num_inference_steps=4, height=64, width=64, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    return torch.from_numpy(out)


def test_sdxl_cli_trains_unet_and_both_text_encoders_and_the_files_load(demo_data, tmp_path):
    out = tmp_path / "xl"
    run([sys.executable, "-m", "sd_lora.train", f"--pretrained_model_name_or_path={TINY_SDXL}",
         f"--train_data_dir={demo_data}", "--train_text_encoder", "--text_encoder_lr=5e-4", "--resolution=64",
         "--train_batch_size=2", "--max_train_steps=3", "--learning_rate=1e-2", "--lr_warmup_steps=0", "--seed=0",
         "--gradient_checkpointing", "--lora_alpha=8", "--report_to=none", f"--output_dir={out}"])
    sd = load_file(out / "pytorch_lora_weights.safetensors")
    assert {k.split(".")[0] for k in sd} == {"unet", "text_encoder", "text_encoder_2"}
    kohya = load_file(out / KOHYA_FILE)
    assert {k.split("_")[1] for k in kohya} == {"unet", "te1", "te2"}
    assert {float(v) for k, v in kohya.items() if k.endswith(".alpha")} == {8.0}
    with safe_open(str(out / KOHYA_FILE), "pt") as f: assert f.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"
    base = images(load_pipeline(TINY_SDXL))
    pipe = StableDiffusionXLPipeline.from_pretrained(resolve_model(TINY_SDXL))
    pipe.load_lora_weights(out)
    trained = images(pipe)
    assert (trained - base).abs().max() > 1e-3  # the LoRA changes the pictures
    from_kohya = load_pipeline(TINY_SDXL)
    from_kohya.load_lora_weights(out, weight_name=KOHYA_FILE)
    torch.testing.assert_close(images(from_kohya), trained, atol=1e-5, rtol=0)
    # both text encoders really trained: each loaded encoder differs from the base one
    ids = pipe.tokenizer(["a cat"], padding="max_length", return_tensors="pt").input_ids
    fresh = load_pipeline(TINY_SDXL)
    with torch.no_grad():
        for name in ("text_encoder", "text_encoder_2"):
            a, b = getattr(pipe, name)(ids, output_hidden_states=True), getattr(fresh, name)(ids, output_hidden_states=True)
            assert (a.hidden_states[-2] - b.hidden_states[-2]).abs().max() > 1e-5, name
    assert "StableDiffusionXLPipeline" in (out / "README.md").read_text()


def test_sd2_v_prediction_trains_from_the_command_line_and_loads(demo_data, tmp_path):
    cfg = tiny_config(demo_data, tmp_path, pretrained_model_name_or_path=TINY_SD2, snr_gamma=5.0)
    run_ = setup(cfg)
    assert run_.prediction_type == "v_prediction"  # from the model's scheduler, no flag needed
    run_.accelerator.end_training()
    main([f"--pretrained_model_name_or_path={TINY_SD2}", f"--train_data_dir={demo_data}", "--resolution=64",
          "--center_crop", "--train_batch_size=2", "--max_train_steps=3", "--learning_rate=1e-2", "--lr_warmup_steps=0",
          "--snr_gamma=5.0", "--train_text_encoder", "--seed=0", "--report_to=none", f"--output_dir={tmp_path / 'sd2'}"])
    with safe_open(str(tmp_path / "sd2" / KOHYA_FILE), "pt") as f:
        assert f.metadata()["ss_base_model_version"] == "sd_v2"
        assert any(k.startswith("lora_te_") for k in f.keys())
    base, pipe = load_pipeline(TINY_SD2), load_pipeline(TINY_SD2)
    pipe.load_lora_weights(tmp_path / "sd2")
    assert (images(pipe) - images(base)).abs().max() > 1e-3


def test_text_encoder_lora_trains_with_its_own_lr_and_no_cached_captions(demo_data, tmp_path):
    cfg = tiny_config(demo_data, tmp_path, train_text_encoder=True, text_encoder_lr=3e-4, max_train_steps=2)
    r = setup(cfg)
    assert [g["lr"] for g in r.optimizer.optimizer.param_groups] == [1e-3, 3e-4]
    assert isinstance(r.dataset, LazyCache) and r.dataset.texts is None  # images cached, captions not
    te_lora = {n: p.detach().clone() for n, p in r.m.text_encoder.named_parameters() if "lora_B" in n}
    assert te_lora and all(float(p.abs().sum()) == 0 for p in te_lora.values())
    train_loop(r)
    r.accelerator.end_training()
    now = dict(r.m.text_encoder.named_parameters())
    assert all(float(now[n].detach().abs().sum()) > 0 for n in te_lora)
    scaled = setup(tiny_config(demo_data, tmp_path / "scaled", train_text_encoder=True, text_encoder_lr=3e-4, scale_lr=True))
    assert [g["lr"] for g in scaled.optimizer.optimizer.param_groups] == pytest.approx([2e-3, 6e-4])  # x batch 2
    scaled.accelerator.end_training()


@pytest.mark.parametrize("use_dora", [False, True])
def test_text_encoder_lora_resumes_exactly(demo_data, tmp_path, use_dora):
    kw = dict(train_text_encoder=True, max_train_steps=4, checkpointing_steps=2, cache_latents="off", use_dora=use_dora)
    full, resumed = full_and_resumed(demo_data, tmp_path, 2, **kw)
    assert any(k.startswith("text_encoder.") for k in full.lora)
    assert resumed.history.losses == pytest.approx(full.history.losses[2:], abs=1e-6)
    assert all(torch.allclose(full.lora[k], resumed.lora[k], atol=1e-7) for k in full.lora)


def test_sdxl_text_encoders_in_two_ddp_processes(demo_data, tmp_path):
    "No 'unused parameters' error: the first encoder's unused last layer gets no adapter."
    out = tmp_path / "ddp"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true"}
    run(["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "--main_process_port", "29617", "-m", "sd_lora.train",
         f"--pretrained_model_name_or_path={TINY_SDXL}", f"--train_data_dir={demo_data}", f"--output_dir={out}",
         "--resolution=64", "--center_crop", "--train_batch_size=2", "--max_train_steps=2", "--learning_rate=1e-3",
         "--lr_warmup_steps=0", "--seed=0", "--report_to=none", "--cpu", "--train_text_encoder"], env=env)
    assert read_json(out / "train_config.json")["num_processes"] == 2
    assert any(k.startswith("text_encoder_2.") for k in load_file(out / "pytorch_lora_weights.safetensors"))


def test_unsupported_reference_flags_are_refused(demo_data, tmp_path):
    with pytest.raises(ValueError, match="--debug_loss is not supported"):
        setup(tiny_config(demo_data, tmp_path, debug_loss=True))


def test_sdxl_vae_stays_fp32_under_mixed_precision_unless_another_vae_is_given(demo_data, tmp_path):
    from diffusers import AutoencoderKL
    from sd_lora.train import train_step
    r = setup(tiny_config(demo_data, tmp_path / "own", pretrained_model_name_or_path=TINY_SDXL, mixed_precision="bf16",
                          train_text_encoder=True))
    assert r.m.vae.dtype == torch.float32 and r.m.unet.dtype == r.m.text_encoder_2.dtype == torch.bfloat16
    assert {p.dtype for p in r.params} == {torch.float32}
    loss, norm, bad = train_step(r, next(iter(r.dataloader)))
    assert torch.isfinite(loss) and float(bad) == 0.0
    r.accelerator.end_training()
    vae_dir = tmp_path / "fp16-fix"
    AutoencoderKL.from_pretrained(resolve_model(TINY_SDXL), subfolder="vae").save_pretrained(vae_dir)
    r = setup(tiny_config(demo_data, tmp_path / "other", pretrained_model_name_or_path=TINY_SDXL, mixed_precision="bf16",
                          pretrained_vae_model_name_or_path=str(vae_dir)))
    assert r.m.vae.dtype == torch.bfloat16
    r.accelerator.end_training()
