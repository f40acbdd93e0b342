"LoRA variants: target presets, a custom list, DoRA, dropout and the init choices train and round-trip through diffusers."
import pytest
import torch
from safetensors.torch import load_file
from sd_lora.config import parse_args
from sd_lora.lora import lora_config, TARGET_PRESETS
from sd_lora.models import load_pipeline
from sd_lora.outputs import KOHYA_FILE, save_outputs
from sd_lora.run import setup
from sd_lora.train import train_loop
from helpers import tiny_config


def unet_out(unet):
    g = torch.Generator().manual_seed(1)
    x, text = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad(): return unet(x, torch.tensor([20, 700]), text).sample


def train_save(demo_data, tmp_path, **kw):
    "Train three steps, save the outputs, and return the trained UNet."
    cfg = tiny_config(demo_data, tmp_path, max_train_steps=3, learning_rate=1e-2, lora_alpha=8, **kw)
    run = setup(cfg)
    train_loop(run)
    run.accelerator.end_training()
    unet = run.accelerator.unwrap_model(run.unet).eval()
    save_outputs(cfg, unet)
    return unet


def train_and_save(demo_data, tmp_path, **kw):
    "Train three steps, save the outputs, and return the trained UNet and its output on fixed inputs."
    unet = train_save(demo_data, tmp_path, **kw)
    return unet, unet_out(unet)


def reloaded(folder, weight_name="pytorch_lora_weights.safetensors"):
    pipe = load_pipeline()
    pipe.load_lora_weights(folder, weight_name=weight_name)
    return unet_out(pipe.unet)


@pytest.mark.parametrize("targets", [*TARGET_PRESETS, "to_k,to_v,ff.net.2"])
def test_each_target_preset_and_a_custom_list_trains_and_round_trips(demo_data, tmp_path, targets):
    unet, want = train_and_save(demo_data, tmp_path, target_modules=targets, lora_dropout=0.1)
    adapted = {n.split(".lora_A")[0] for n, _ in unet.named_parameters() if ".lora_A" in n}
    expected = TARGET_PRESETS.get(targets) or targets.split(",")
    assert all(any(a.endswith("." + t) for t in expected) for a in adapted)
    assert all(any(a.endswith("." + t) for a in adapted) for t in expected)
    assert (want - unet_out(load_pipeline().unet)).abs().max() > 1e-4  # training changed the UNet
    torch.testing.assert_close(reloaded(tmp_path), want, atol=1e-5, rtol=0)
    torch.testing.assert_close(reloaded(tmp_path, KOHYA_FILE), want, atol=1e-5, rtol=0)


def test_dora_trains_and_round_trips_with_a_kohya_file_for_comfyui(demo_data, tmp_path):
    unet, want = train_and_save(demo_data, tmp_path, use_dora=True, target_modules="attention_ff")
    assert any("lora_magnitude_vector" in k for k in load_file(tmp_path / "pytorch_lora_weights.safetensors"))
    assert any(k.endswith(".dora_scale") for k in load_file(tmp_path / KOHYA_FILE))  # see tests/test_lycoris.py
    card = (tmp_path / "README.md").read_text()
    assert "ComfyUI" in card and "A1111 cannot" in card
    torch.testing.assert_close(reloaded(tmp_path), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("init", ["true", "orthogonal", "false"])
def test_init_choices_train_and_round_trip(demo_data, tmp_path, init):
    _, want = train_and_save(demo_data, tmp_path, init_lora_weights=init)
    torch.testing.assert_close(reloaded(tmp_path), want, atol=1e-5, rtol=0)


def test_inits_that_rewrite_the_base_are_refused():
    for init in ("pissa", "olora", "loftq"):
        with pytest.raises(ValueError, match="choose one of"): lora_config(init=init)
    with pytest.raises(SystemExit): parse_args(["--init_lora_weights", "pissa"])


@pytest.mark.parametrize("model", ["sd_lora:tiny-sd", "sd_lora:tiny-sdxl"])
def test_every_adapted_layer_loads_back_whatever_the_files_first_key(demo_data, tmp_path, model):
    """diffusers' `load_lora_weights` picks the file's naming from its first key. Our files once mixed diffusers' names
    (attention) with peft's (convs): where a conv key came first (SDXL, whose first down block has no attention),
    every attention layer was silently dropped on load."""
    unet = train_save(demo_data, tmp_path, target_modules="attention_ff_conv", pretrained_model_name_or_path=model)
    pipe = load_pipeline(model)
    pipe.load_lora_weights(tmp_path)
    adapted = lambda u: {n: m for n, m in u.named_modules() if getattr(m, "lora_A", None)}
    trained, loaded = adapted(unet), adapted(pipe.unet)
    assert sorted(loaded) == sorted(trained) and any(".attn1." in n for n in loaded)
    for n, m in trained.items():
        (a,) = loaded[n].lora_A.values()
        torch.testing.assert_close(a.weight, m.lora_A["default"].weight)
