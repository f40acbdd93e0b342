"Inference: samplers, seeded generation, loading our and kohya LoRAs, weights, mixing, fusing, removal, grids, errors."
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from diffusers import UNet2DConditionModel
from peft.tuners.lora import LoraLayer
from sd_lora.models import load_components
from sd_lora.lora import add_lora, lora_config, save_lora, save_kohya
from sd_lora.outputs import KOHYA_FILE
from sd_lora.train import train
from sd_lora.inference import (SCHEDULERS, set_scheduler, inference_pipeline, generate, find_lora_file, load_lora,
                               lora_mismatches, adapter_names)
from sd_lora.mixing import set_lora_weights, merge_adapters, weight_sweep, comparison_grid, parse_lora_arg
from helpers import tiny_config

KW = dict(num_inference_steps=4, height=64, width=64)
PROMPTS = ["a red square", "a cat", "a blue circle on white"]


@pytest.fixture(scope="module")
def loras(demo_data, tmp_path_factory):
    "Two LoRAs trained for 10 steps: 'a' (rank 4, alpha 8) and 'b' (rank 2, alpha 2, another seed), with both files."
    out = {}
    for name, rank, alpha, seed in [("a", 4, 8, 0), ("b", 2, 2, 1)]:
        res = train(tiny_config(demo_data, tmp_path_factory.mktemp(name), max_train_steps=10, rank=rank,
                                lora_alpha=alpha, seed=seed, eval_samples=0))
        out[name] = res.output_dir
    return out


@pytest.fixture
def pipe():
    return inference_pipeline(device="cpu")


@pytest.fixture(scope="module")
def probe():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 500]), torch.randn(2, 77, 32, generator=g)


def unet_out(pipe, probe, **kw):
    with torch.no_grad(): return pipe.unet(*probe, **kw).sample


def pix(images):
    return np.stack([np.asarray(im, dtype=np.float32) for im in images])


# --- base model, sampler, generation ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_every_scheduler_keeps_the_noise_schedule_and_samples(name):
    p = inference_pipeline(scheduler=name, device="cpu")
    assert isinstance(p.scheduler, SCHEDULERS[name])
    assert (p.scheduler.config.beta_start, p.scheduler.config.beta_end) == (0.00085, 0.012)
    im = generate(p, "a cat", **KW)[0]
    assert im.size == (64, 64) and np.asarray(im).std() > 0


def test_unknown_scheduler_lists_the_choices(pipe):
    with pytest.raises(ValueError, match="choose one of ddpm, ddim, pndm, euler, euler_a, dpm"):
        set_scheduler(pipe, "heun")


def test_generation_is_seeded_per_prompt_and_independent_of_the_batch(pipe):
    batch = pix(generate(pipe, PROMPTS, seed=3, **KW))
    assert np.array_equal(batch, pix(generate(pipe, PROMPTS, seed=3, **KW)))
    # alone or in a batch, the same prompt and seed: the same image, up to one grey level of float rounding
    assert np.abs(batch[2] - pix(generate(pipe, PROMPTS[2:], seed=5, **KW))[0]).max() <= 1
    assert np.abs(batch[1] - pix(generate(pipe, [PROMPTS[1]], seeds=[4], **KW))[0]).max() <= 1
    assert np.abs(pix(generate(pipe, PROMPTS[::-1], seeds=[5, 4, 3], **KW))[::-1] -
                  pix(generate(pipe, PROMPTS, seeds=[3, 4, 5], **KW))).max() <= 1  # a batch's order: rounding only
    assert np.abs(batch[0] - pix(generate(pipe, PROMPTS[:1], seed=4, **KW))[0]).mean() > 1
    with pytest.raises(ValueError, match="3 prompts but 2 seeds"):
        generate(pipe, PROMPTS, seeds=[1, 2], **KW)


def test_negative_prompt_and_guidance_scale_change_the_image(pipe):
    base = pix(generate(pipe, PROMPTS[:1], **KW))
    neg = pix(generate(pipe, PROMPTS[:1], negative_prompt="blurry", **KW))
    no_cfg = pix(generate(pipe, PROMPTS[:1], **{**KW, "guidance_scale": 1.0}))
    assert np.abs(neg - base).mean() > 0.5 and np.abs(no_cfg - base).mean() > 0.5
    assert np.array_equal(neg, pix(generate(pipe, PROMPTS[:1], negative_prompt="blurry", **KW)))


# --- loading ----------------------------------------------------------------------------------------------------------

def test_loads_our_format_and_kohya_by_folder_or_file_with_names(pipe, loras, probe):
    load_lora(pipe, loras["a"], "ours")
    load_lora(pipe, loras["a"] / KOHYA_FILE, "kohya")
    load_lora(pipe, loras["b"] / "pytorch_lora_weights.safetensors", "b")
    assert adapter_names(pipe) == ["ours", "kohya", "b"]
    set_lora_weights(pipe, {"ours": 1.0})
    ours = unet_out(pipe, probe)
    set_lora_weights(pipe, {"kohya": 1.0})
    torch.testing.assert_close(unet_out(pipe, probe), ours, atol=1e-5, rtol=0)  # alpha 8 kept in the kohya file
    assert find_lora_file(loras["a"]).name == "pytorch_lora_weights.safetensors"  # not the kohya file beside it


def test_same_adapter_name_twice_is_refused(pipe, loras):
    load_lora(pipe, loras["a"], "x")
    with pytest.raises(ValueError, match="already loaded.*delete_adapters"):
        load_lora(pipe, loras["b"], "x")


# --- weights, scale, algebra ------------------------------------------------------------------------------------------

def test_weight_zero_scale_zero_and_disable_are_the_base_model(pipe, loras, probe):
    base = unet_out(pipe, probe)
    load_lora(pipe, loras["a"], "a")
    full = unet_out(pipe, probe)
    assert (full - base).abs().max() > 1e-3
    torch.testing.assert_close(unet_out(pipe, probe, cross_attention_kwargs={"scale": 0.0}), base, atol=1e-6, rtol=0)
    set_lora_weights(pipe, {"a": 0.0})
    torch.testing.assert_close(unet_out(pipe, probe), base, atol=1e-6, rtol=0)
    set_lora_weights(pipe, {"a": 1.0})
    pipe.disable_lora()
    torch.testing.assert_close(unet_out(pipe, probe), base, atol=1e-6, rtol=0)
    pipe.enable_lora()
    torch.testing.assert_close(unet_out(pipe, probe), full, atol=1e-6, rtol=0)


def test_per_call_scale_equals_adapter_weight(pipe, loras, probe):
    load_lora(pipe, loras["a"], "a")
    scaled = unet_out(pipe, probe, cross_attention_kwargs={"scale": 0.3})
    set_lora_weights(pipe, {"a": 0.3})
    torch.testing.assert_close(unet_out(pipe, probe), scaled, atol=1e-5, rtol=0)
    set_lora_weights(pipe, {"a": 1.0})
    images = generate(pipe, PROMPTS[:1], cross_attention_kwargs={"scale": 0.3}, **KW)
    set_lora_weights(pipe, {"a": 0.3})
    assert np.abs(pix(images) - pix(generate(pipe, PROMPTS[:1], **KW))).max() <= 1


def test_each_layer_is_linear_in_the_adapter_weights(pipe, loras):
    "For LoRA on a linear layer: layer(h) at (wa, wb) = base(h) + wa (a(h) - base(h)) + wb (b(h) - base(h)), exactly."
    load_lora(pipe, loras["a"], "a")
    load_lora(pipe, loras["b"], "b")
    layer = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k
    h = torch.randn(3, layer.in_features)
    def at(weights):
        set_lora_weights(pipe, weights)
        with torch.no_grad(): return layer(h)
    base, a, b = at({"a": 0.0}), at({"a": 1.0}), at({"b": 1.0})
    torch.testing.assert_close(at({"a": 0.5, "b": 0.5}), base + 0.5 * (a - base) + 0.5 * (b - base), atol=1e-6, rtol=0)
    torch.testing.assert_close(at({"a": 0.7, "b": -0.4}), base + 0.7 * (a - base) - 0.4 * (b - base), atol=1e-6, rtol=0)


def test_two_adapters_at_half_equal_one_merged_adapter_of_summed_rank(pipe, loras, probe):
    load_lora(pipe, loras["a"], "a")
    load_lora(pipe, loras["b"], "b")
    set_lora_weights(pipe, {"a": 0.5, "b": 0.5})
    mixed = unet_out(pipe, probe)
    merge_adapters(pipe.unet, {"a": 0.5, "b": 0.5}, "ab")
    set_lora_weights(pipe, {"ab": 1.0})
    torch.testing.assert_close(unet_out(pipe, probe), mixed, atol=1e-5, rtol=0)
    q = pipe.unet.mid_block.attentions[0].transformer_blocks[0].attn1.to_q
    assert (q.r["a"], q.r["b"], q.r["ab"]) == (4, 2, 6)
    set_lora_weights(pipe, {"a": 1.0})
    assert (unet_out(pipe, probe) - mixed).abs().max() > 1e-4
    with pytest.raises(ValueError, match="None of"):
        merge_adapters(pipe.unet, {"zzz": 1.0}, "nothing")


def test_fused_equals_unfused_and_unfuse_restores_the_weights(pipe, loras, probe):
    load_lora(pipe, loras["a"], "a")
    load_lora(pipe, loras["b"], "b")
    set_lora_weights(pipe, {"a": 0.8, "b": 0.6})
    live = unet_out(pipe, probe)
    q = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_v
    w0 = q.base_layer.weight.detach().clone()
    delta = (q.get_delta_weight("a") + q.get_delta_weight("b")).detach()
    pipe.fuse_lora(adapter_names=["a", "b"])
    torch.testing.assert_close(q.base_layer.weight.detach() - w0, delta, atol=1e-6, rtol=0)
    torch.testing.assert_close(unet_out(pipe, probe), live, atol=1e-5, rtol=0)
    pipe.unfuse_lora()
    torch.testing.assert_close(q.base_layer.weight.detach(), w0, atol=1e-6, rtol=0)
    torch.testing.assert_close(unet_out(pipe, probe), live, atol=1e-5, rtol=0)


def test_delete_one_adapter_then_unload_all(pipe, loras, probe):
    base = unet_out(pipe, probe)
    load_lora(pipe, loras["a"], "a")
    load_lora(pipe, loras["b"], "b")
    pipe.delete_adapters("a")
    assert adapter_names(pipe) == ["b"]
    set_lora_weights(pipe, {"b": 1.0})
    only_b = unet_out(pipe, probe)
    fresh = inference_pipeline(device="cpu")
    load_lora(fresh, loras["b"], "b")
    torch.testing.assert_close(only_b, unet_out(fresh, probe), atol=1e-6, rtol=0)
    pipe.unload_lora_weights()
    assert adapter_names(pipe) == [] and not any(isinstance(m, LoraLayer) for m in pipe.unet.modules())
    torch.testing.assert_close(unet_out(pipe, probe), base, atol=1e-6, rtol=0)


def test_weight_sweep_rows_and_comparison_grid(pipe, loras, tmp_path):
    base = generate(pipe, PROMPTS, **KW)
    load_lora(pipe, loras["a"], "a")
    rows = weight_sweep(pipe, PROMPTS, [0.0, 1.0, 2.0], **KW)
    assert list(rows) == ["a x0", "a x1", "a x2"]
    assert np.array_equal(pix(rows["a x0"]), pix(base))
    effect = [np.abs(pix(rows[k]) - pix(base)).mean() for k in rows]
    assert effect[0] == 0 < effect[1] < effect[2]
    fig = comparison_grid({"base": base, **rows}, PROMPTS)
    assert len(fig.axes) == 12 and fig.axes[0].get_ylabel() == "base"
    fig.savefig(tmp_path / "grid.png")
    assert (tmp_path / "grid.png").stat().st_size > 1000


# --- errors -----------------------------------------------------------------------------------------------------------

def test_missing_path_and_empty_folder(pipe, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_lora(pipe, tmp_path / "nope.safetensors", "x")
    with pytest.raises(FileNotFoundError, match="No LoRA weights in folder"):
        load_lora(pipe, tmp_path, "x")
    assert adapter_names(pipe) == []


def test_folder_with_several_files_asks_for_one(pipe, loras, tmp_path):
    for name in ("one", "two"):
        (tmp_path / f"{name}.safetensors").write_bytes((loras["a"] / KOHYA_FILE).read_bytes())
    with pytest.raises(ValueError, match="several weight files.*one.safetensors, two.safetensors"):
        find_lora_file(tmp_path)


@pytest.mark.parametrize("keep", [0.5, 0.99, 0.001])
def test_truncated_file_is_named_damaged(pipe, loras, tmp_path, keep):
    data = (loras["a"] / "pytorch_lora_weights.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:max(4, int(len(data) * keep))])
    with pytest.raises(ValueError, match="damaged or incomplete.*fetch it again"):
        load_lora(pipe, tmp_path / "cut.safetensors", "x")
    assert adapter_names(pipe) == []


def test_pickle_refused_unless_allowed(pipe, loras, probe, tmp_path):
    sd = load_file(loras["b"] / "pytorch_lora_weights.safetensors")  # b has alpha = rank: nothing lost without metadata
    torch.save(sd, tmp_path / "lora.bin")
    for path in (tmp_path / "lora.bin", tmp_path):
        with pytest.raises(ValueError, match="pickle file.*allow_pickle=True"):
            load_lora(pipe, path, "x")
    assert adapter_names(pipe) == []
    load_lora(pipe, tmp_path / "lora.bin", "from_bin", allow_pickle=True)
    from_bin = unet_out(pipe, probe)
    fresh = inference_pipeline(device="cpu")
    load_lora(fresh, loras["b"], "b")
    torch.testing.assert_close(from_bin, unet_out(fresh, probe), atol=1e-6, rtol=0)


def test_other_suffix_is_refused(pipe, tmp_path):
    (tmp_path / "lora.txt").write_text("not weights")
    with pytest.raises(ValueError, match="not a .safetensors file"):
        load_lora(pipe, tmp_path / "lora.txt", "x")


def test_lora_for_another_base_names_layers_shapes_and_models(pipe, probe, tmp_path):
    "A LoRA trained on a UNet with 64-wide cross-attention, loaded into the tiny model (32): a clear error, no change."
    other = UNet2DConditionModel.from_config({**load_components().unet.config, "cross_attention_dim": 64})
    add_lora(other, lora_config(rank=4))
    save_lora(tmp_path / "other", other)
    base = unet_out(pipe, probe)
    with pytest.raises(ValueError) as e:
        load_lora(pipe, tmp_path / "other", "x")
    msg = str(e.value)
    assert "was made for another base model than" in msg and pipe.name_or_path in msg
    assert "attn2.to_k" in msg and "(4, 64)" in msg and "(32, 32)" in msg and "8 layers differ" in msg
    assert "Load it into the base model it was trained on" in msg
    assert adapter_names(pipe) == []
    torch.testing.assert_close(unet_out(pipe, probe), base, atol=0, rtol=0)
    assert len(lora_mismatches(pipe, find_lora_file(tmp_path / "other"))) == 8
    save_kohya(tmp_path / "other_kohya.safetensors", other, base_model="sd_v2")  # a kohya file names its base
    with pytest.raises(ValueError, match=r"its metadata says ss_base_model_version=sd_v2\) was made for another"):
        load_lora(pipe, tmp_path / "other_kohya.safetensors", "x")


def test_lora_with_layers_the_model_lacks(pipe, tmp_path):
    "A UNet with an extra block (as SDXL has more than SD1.5): its LoRA names layers this model does not have."
    cfg = dict(load_components().unet.config)
    cfg.update(block_out_channels=(32, 64, 64),
               down_block_types=("CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
               up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"))
    other = UNet2DConditionModel.from_config(cfg)
    add_lora(other, lora_config(rank=4))
    save_lora(tmp_path, other)
    with pytest.raises(ValueError, match="is not a layer of this model"):
        load_lora(pipe, tmp_path, "x")


def test_unknown_adapter_name_lists_the_loaded_ones(pipe, loras):
    with pytest.raises(ValueError, match="No adapter named 'a'; loaded: none"):
        set_lora_weights(pipe, {"a": 1.0})
    load_lora(pipe, loras["a"], "first")
    load_lora(pipe, loras["b"], "second")
    with pytest.raises(ValueError, match="No adapter named 'frist'; loaded: 'first', 'second'"):
        set_lora_weights(pipe, {"frist": 1.0, "second": 0.5})


def test_parse_lora_arg():
    assert parse_lora_arg("runs/a:0.7") == ("runs/a", 0.7)
    assert parse_lora_arg("runs/a:-1e-1") == ("runs/a", -0.1)
    assert parse_lora_arg("runs/a") == ("runs/a", 1.0)
    assert parse_lora_arg("C:/x.safetensors") == ("C:/x.safetensors", 1.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_by_default_with_lora_weights_and_fusing(loras):
    pipe = inference_pipeline(scheduler="dpm")
    assert pipe.device.type == "cuda"
    load_lora(pipe, loras["a"], "a")
    load_lora(pipe, loras["b"], "b")
    set_lora_weights(pipe, {"a": 0.7, "b": 0.5})
    live = pix(generate(pipe, PROMPTS, **KW))
    pipe.fuse_lora(adapter_names=["a", "b"])
    assert np.abs(pix(generate(pipe, PROMPTS, **KW)) - live).max() <= 2


def _old_mixed_naming_lora(folder):
    "A LoRA on the toy model's attention and convs, saved with the mixed naming of sd_lora before 2026-11-30."
    import sd_lora.models as M
    from safetensors import safe_open
    from safetensors.torch import save_file
    u = load_components(M.TOY).unet
    add_lora(u, lora_config(target_modules=["to_q", "to_v", "conv1"]))
    for n, p in u.named_parameters():
        if "lora_B" in n: p.data.normal_(0, 0.05)
    saved = save_lora(folder, u)
    with safe_open(str(saved), "pt") as f: meta = f.metadata()
    sd = load_file(saved)
    save_file({k.replace(".lora.down.", ".lora_A.").replace(".lora.up.", ".lora_B.") if ".conv1." in k else k: v
               for k, v in sd.items()}, str(saved), metadata=meta)
    return u, saved


def test_an_old_mixed_naming_file_loads_whole_with_a_warning(tmp_path):
    import sd_lora.models as M
    from sd_lora.inference import layers_not_loaded
    u, saved = _old_mixed_naming_lora(tmp_path)
    pipe = M.load_pipeline(M.TOY)
    with pytest.warns(UserWarning, match="names its UNet layers two ways"): load_lora(pipe, tmp_path)
    assert layers_not_loaded(pipe, saved, "default") == []
    for n, m in u.named_modules():
        if isinstance(m, LoraLayer):
            torch.testing.assert_close(pipe.unet.get_submodule(n).lora_B["default"].weight, m.lora_B["default"].weight)


def test_a_half_loaded_lora_is_refused_and_removed(tmp_path, monkeypatch):
    import sd_lora.models as M
    import sd_lora.inference as I
    _old_mixed_naming_lora(tmp_path)
    monkeypatch.setattr(I, "one_naming_copy", lambda f: None)  # as diffusers alone would load it
    pipe = M.load_pipeline(M.TOY)
    with pytest.raises(ValueError, match="layers were dropped"): load_lora(pipe, tmp_path)
    assert I.adapter_names(pipe) == []
