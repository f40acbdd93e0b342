"""LoHa and LoKr (`--lora_type`): they train on the tiny SD1.x and SDXL (UNet and text encoders), resume exactly, are
saved as a LyCORIS file whose tensors give peft's update under ComfyUI's and AUTOMATIC1111's formulas (re-derived
here from comfy/weight_adapter/loha.py, lokr.py and A1111's network_hada.py, network_lokr.py, network.py), and load
back with `load_lora` to the trained model's outputs. DoRA's kohya file gives peft's merged weight under ComfyUI's
`weight_decompose`. Bad combinations are clear errors before step 1."""
import pytest
import torch
from safetensors.torch import load_file
from sd_lora.config import parse_args
from sd_lora.inference import load_lora, adapter_names
from sd_lora.lora import add_lora, lora_config, unet_targets, kohya_state_dict
from sd_lora.lycoris import (LYCORIS_FILE, adapter_config, kohya_name, kohya_prefixes, lycoris_layers,
                             lycoris_state_dict)
from sd_lora.models import TINY_SD, TINY_SDXL, load_components, load_pipeline
from sd_lora.run import setup
from helpers import tiny_config, full_and_resumed

X, T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 600])


def unet_out(unet, family_model):
    "The UNet's output on fixed inputs (SDXL's added conditions included)."
    m = load_components(family_model)
    text = torch.randn(2, 77, m.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    kw = {}
    if family_model == TINY_SDXL:
        embeds = torch.randn(2, m.text_encoder_2.config.projection_dim, generator=torch.Generator().manual_seed(2))
        kw["added_cond_kwargs"] = {"text_embeds": embeds,
                                   "time_ids": torch.tensor([[64, 64, 0, 0, 64, 64]] * 2).float()}
    with torch.no_grad(): return unet(X, T, text, **kw).sample


def trained_copy(model_id, lora_type, weights, target_modules):
    "Fresh components carrying the run's adapters with the trained weights (peft names, as `train` returns them)."
    m = load_components(model_id)
    from sd_lora.conditioning import add_text_encoder_lora
    add_lora(m.unet, adapter_config(lora_type, target_modules=unet_targets(target_modules), rank=4, alpha=6))
    add_text_encoder_lora(m, lora_type=lora_type, rank=4, alpha=6)
    comps = {"unet": m.unet, "text_encoder": m.text_encoder, "text_encoder_2": m.text_encoder_2}
    for k, v in weights.items():
        comp, name = (k.split(".", 1) if k.startswith("text_encoder") else ("unet", k))
        module, param = name.rsplit(".", 1)
        with torch.no_grad(): getattr(comps[comp].get_submodule(module), param)["default"].copy_(v)
    return m


@pytest.mark.parametrize("model", [TINY_SD, TINY_SDXL])
@pytest.mark.parametrize("lora_type", ["loha", "lokr"])
def test_lycoris_trains_resumes_exactly_and_loads_back_to_the_trained_outputs(demo_data, tmp_path, lora_type, model):
    kw = dict(lora_type=lora_type, pretrained_model_name_or_path=model, train_text_encoder=True, rank=4, lora_alpha=6,
              target_modules="attention_ff_conv", max_train_steps=4, checkpointing_steps=2, learning_rate=1e-2)
    full, resumed = full_and_resumed(demo_data, tmp_path, 2, **kw)
    assert resumed.history.losses == pytest.approx(full.history.losses[2:], abs=1e-6)
    assert full.lora.keys() == resumed.lora.keys() and all(torch.equal(full.lora[k], resumed.lora[k]) for k in full.lora)
    prefix = "hada_" if lora_type == "loha" else "lokr_"
    assert all(k.rsplit(".", 1)[1].startswith(prefix) for k in full.lora)
    assert any(k.startswith("text_encoder" + ("_2." if model == TINY_SDXL else ".")) for k in full.lora)
    # the folder: the LyCORIS file is the main output, and the card says who loads it
    out = tmp_path / "full"
    assert full.lora_path == out / LYCORIS_FILE and not (out / "pytorch_lora_weights.safetensors").exists()
    card = (out / "README.md").read_text()
    assert LYCORIS_FILE in card and "ComfyUI" in card and "load_lora" in card
    # every key in kohya naming with LyCORIS suffixes
    sd = load_file(full.lora_path)
    heads = ("lora_unet_", "lora_te1_", "lora_te2_") if model == TINY_SDXL else ("lora_unet_", "lora_te_")
    assert all(k.startswith(heads) and k.rsplit(".", 1)[1].startswith((prefix, "alpha")) for k in sd)
    # load_lora gives the trained model's UNet and text-encoder outputs
    want = trained_copy(model, lora_type, full.lora, kw["target_modules"])
    pipe = load_pipeline(model)
    load_lora(pipe, out)
    assert adapter_names(pipe) == ["default"]
    trained_out = unet_out(want.unet, model)
    torch.testing.assert_close(unet_out(pipe.unet, model), trained_out, atol=1e-5, rtol=0)
    assert (trained_out - unet_out(load_components(model).unet, model)).abs().max() > 1e-4  # training changed it
    ids = pipe.tokenizer(["a cat"], padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad(): torch.testing.assert_close(pipe.text_encoder(ids)[0], want.text_encoder(ids)[0], atol=1e-5, rtol=0)
    # and the adapter weight and fusing work on it as on a LoRA
    pipe.set_adapters(["default"], [0.0])
    torch.testing.assert_close(unet_out(pipe.unet, model), unet_out(load_components(model).unet, model), atol=1e-6, rtol=0)
    pipe.set_adapters(["default"], [1.0])
    pipe.fuse_lora(adapter_names=["default"])
    torch.testing.assert_close(unet_out(pipe.unet, model), trained_out, atol=1e-5, rtol=0)


def comfyui_delta(sd, name, shape):
    "ComfyUI's LoHa/LoKr `calculate_weight` update at strength 1 (alpha / dim, dim from the `_b` factor, else 1)."
    g = lambda k: sd.get(f"{name}.{k}")
    alpha = g("alpha").item()
    if g("hada_w1_a") is not None:
        return ((g("hada_w1_a") @ g("hada_w1_b")) * (g("hada_w2_a") @ g("hada_w2_b"))).reshape(shape) * alpha / g("hada_w1_b").shape[0]
    dim, w1, w2 = None, g("lokr_w1"), g("lokr_w2")
    if w1 is None: dim, w1 = g("lokr_w1_b").shape[0], g("lokr_w1_a") @ g("lokr_w1_b")
    if w2 is None: dim, w2 = g("lokr_w2_b").shape[0], g("lokr_w2_a") @ g("lokr_w2_b")
    if w2.dim() == 4: w1 = w1.unsqueeze(2).unsqueeze(2)
    return torch.kron(w1, w2).reshape(shape) * (alpha / dim if dim is not None else 1.0)


def a1111_delta(sd, name, shape):
    "A1111's `calc_updown` + `finalize_updown` (scale: alpha / dim where a `_b` factor sets dim, else 1)."
    g = lambda k: sd.get(f"{name}.{k}")
    alpha, dim = g("alpha").item(), None
    if g("hada_w1_a") is not None:
        out = [g("hada_w1_a").shape[0], g("hada_w1_b").shape[1]]
        rebuild = lambda a, b: (a.reshape(a.shape[0], -1) @ b.reshape(b.shape[0], -1)).reshape(out)
        updown, dim = rebuild(g("hada_w1_a"), g("hada_w1_b")) * rebuild(g("hada_w2_a"), g("hada_w2_b")), g("hada_w1_b").shape[0]
    else:
        w1 = g("lokr_w1") if g("lokr_w1") is not None else g("lokr_w1_a") @ g("lokr_w1_b")
        w2 = g("lokr_w2") if g("lokr_w2") is not None else g("lokr_w2_a") @ g("lokr_w2_b")
        for k in ("lokr_w1_b", "lokr_w2_b"):
            if g(k) is not None: dim = g(k).shape[0]
        out = list(shape) if len(shape) == 4 else [w1.shape[0] * w2.shape[0], w1.shape[1] * w2.shape[1]]
        if w2.dim() == 4: w1 = w1.unsqueeze(2).unsqueeze(2)
        updown = torch.kron(w1, w2).reshape(out)
    return updown.reshape(shape) * (alpha / dim if dim is not None else 1.0)


@pytest.mark.parametrize("model", [TINY_SD, TINY_SDXL])
@pytest.mark.parametrize("lora_type", ["loha", "lokr"])
def test_the_lycoris_tensors_give_peft_update_under_comfyui_and_a1111_formulas(lora_type, model):
    m = load_components(model)
    from sd_lora.conditioning import add_text_encoder_lora
    add_lora(m.unet, adapter_config(lora_type, rank=4, alpha=6, target_modules=unet_targets("attention_ff_conv")))
    add_text_encoder_lora(m, lora_type=lora_type, rank=4, alpha=6)
    tes = [te for te in (m.text_encoder, m.text_encoder_2) if te is not None]
    torch.manual_seed(0)
    with torch.no_grad():
        for model_ in (m.unet, *tes):
            for p in model_.parameters():
                if p.requires_grad: p.normal_(0, 0.1)
    sd, prefixes, seen = lycoris_state_dict(m.unet, tes), kohya_prefixes(m.unet), set()
    for comp, model_ in zip(("unet", "text_encoder", "text_encoder_2"), (m.unet, *tes)):
        for n, layer in lycoris_layers(model_).items():
            want, name = layer.get_delta_weight("default").detach(), kohya_name(prefixes[comp], n)
            torch.testing.assert_close(comfyui_delta(sd, name, want.shape), want, atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(a1111_delta(sd, name, want.shape), want, atol=1e-6, rtol=1e-5)
            seen |= {k for k in sd if k.startswith(name + ".")}
    assert seen == set(sd)
    if lora_type == "lokr":  # both kinds of LoKr layer occur: full factors (scale folded in) and a low-rank w2
        assert any(k.endswith(".lokr_w2_b") for k in sd) and any(k.endswith(".lokr_w2") for k in sd)


@pytest.mark.parametrize("bad, match", [
    (dict(lora_type="loha", use_dora=True), "--use_dora"),
    (dict(lora_type="lokr", init_lora_weights="orthogonal"), "--init_lora_weights"),
    (dict(lora_type="loha", lora_dropout=0.1), "--lora_dropout"),
    (dict(lora_type="locon"), "choose lora, loha or lokr"),
    (dict(lora_type="lokr", finetune=True), "sd_lora.finetune trains the whole UNet"),
])
def test_bad_combinations_are_clear_errors_before_step_1(demo_data, tmp_path, monkeypatch, bad, match):
    import sd_lora.run as R
    monkeypatch.setattr(R, "load_components", lambda *a, **k: pytest.fail("models loaded before the check"))
    with pytest.raises(ValueError, match=match): setup(tiny_config(demo_data, tmp_path, **bad))
    with pytest.raises(SystemExit): parse_args(["--lora_type", "locon"])


def comfyui_dora_weight(w, up, down, alpha, dora_scale):
    "ComfyUI's `weight_decompose` at strength 1: a [out, 1...] dora_scale over the base weight's row norm (+ eps)."
    diff = (up.flatten(1) @ down.flatten(1)).reshape(w.shape) * alpha / down.shape[0]
    assert dora_scale.shape[0] == w.shape[0]  # ComfyUI's output-axis case
    norm = w.reshape(w.shape[0], -1).norm(dim=1, keepdim=True).reshape(w.shape[0], *[1] * (w.dim() - 1))
    return (w + diff) * (dora_scale / (norm + torch.finfo(w.dtype).eps))


@pytest.mark.parametrize("model", [TINY_SD, TINY_SDXL])
def test_dora_kohya_file_gives_peft_merged_weights_under_comfyuis_formula(model):
    m = load_components(model)
    from sd_lora.conditioning import add_text_encoder_lora
    add_lora(m.unet, lora_config(rank=4, alpha=8, use_dora=True, target_modules=unet_targets("attention_ff_conv")))
    add_text_encoder_lora(m, rank=4, alpha=8, use_dora=True)
    tes = [te for te in (m.text_encoder, m.text_encoder_2) if te is not None]
    torch.manual_seed(0)
    with torch.no_grad():
        for model_ in (m.unet, *tes):
            for n, p in model_.named_parameters():
                if "lora_B" in n: p.normal_(0, 0.1)
                if "magnitude" in n: p.mul_(1 + 0.1 * torch.rand_like(p))
    sd = kohya_state_dict(m.unet, tes)
    prefixes, checked = kohya_prefixes(m.unet), 0
    for comp, model_ in zip(("unet", "text_encoder", "text_encoder_2"), (m.unet, *tes)):
        for n, layer in model_.named_modules():
            if "default" not in getattr(layer, "lora_magnitude_vector", {}): continue
            name = kohya_name(prefixes[comp], n)
            with torch.no_grad():
                w = layer.base_layer.weight.clone()
                got = comfyui_dora_weight(w, sd[f"{name}.lora_up.weight"], sd[f"{name}.lora_down.weight"],
                                          sd[f"{name}.alpha"], sd[f"{name}.dora_scale"])
                layer.merge(); want = layer.base_layer.weight.clone(); layer.unmerge()
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
            assert not torch.allclose(want, w, atol=1e-4)  # the DoRA changed the weight
            checked += 1
    assert checked and checked == sum(k.endswith(".dora_scale") for k in sd)
    assert not any("magnitude" in k for k in sd)


def test_the_lora_type_flag_is_in_the_help_with_its_docment():
    import re, subprocess, sys
    out = subprocess.run([sys.executable, "-m", "sd_lora.train", "--help"], capture_output=True, text=True, timeout=300).stdout
    entry = re.search(r"^  --lora_type\b.*?(?=^  -)", out, re.S | re.M)
    assert entry, out[-500:]
    text = " ".join(entry.group(0).split())
    assert "{lora,loha,lokr}" in text and "Kronecker" in text and "LyCORIS file" in text
    with pytest.raises(SystemExit): parse_args(["--lora_type", "ia3"])
