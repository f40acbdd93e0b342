"""The kohya-format LoRA files sd_lora writes load in ComfyUI with no "lora key not loaded" warning, for the
full-size SD1.5, SD2.x and SDXL layouts: UNet attention, feed-forward and ResNet convolutions, and the text encoders.

ComfyUI is not installed here, so its loader's rules are re-derived below (own code, not a copy) from its sources,
read as stored (the whole repository is too large to fetch, so each file is named with the commit it was read at):

- `comfy/lora.py` @ 41444b5236c613ee5ff7d09aa620f94b702f30eb: `model_lora_keys_unet` accepts
  `lora_unet_{diffusers name with . -> _}` for every `.weight` key that `comfy.utils.unet_to_diffusers(unet_config)`
  maps; `model_lora_keys_clip` accepts `lora_te_` / `lora_te1_` for clip_l and clip_h layers and `lora_te2_` for
  clip_g once clip_l is present (SDXL), for `text_model.encoder.layers.{b}.{self_attn.{q,k,v,out}_proj, mlp.fc1/2}`,
  b < 32; `load_lora` warns "lora key not loaded" for every file key that no accepted name claims.
- `comfy/utils.py` @ 2ba5cc8b867bc1aabe59fdaf0a8489e65012d603: `unet_to_diffusers` and its `UNET_MAP_*` tables.
- `comfy/model_detection.py` @ d415a44fe698d8ba6d1a35dd4592dc52d838933e: `unet_config_from_diffusers_unet`, how a
  diffusers UNet's config is found (block counts matched against a table of known models: SD15, SD21, SDXL).
- `comfy/weight_adapter/lora.py` @ 6fd406fb14ca663225b88c6f75d7a7f2b997e5a0 (and `base.py` @ 9c0cf36cd796,
  `__init__.py` @ dc05edb5b27f): the LoRA adapter reads `{x}.lora_up.weight` with `{x}.lora_down.weight` (and an
  optional `{x}.lora_mid.weight`), `load_lora` reads `{x}.alpha` and `{x}.dora_scale`; the update is
  `mm(up.flatten(1), down.flatten(1)).reshape(weight.shape) * alpha / down.shape[0]`. `weight_decompose` reads a
  `dora_scale` whose first side is the weight's output side as one magnitude per output row.
- `comfy/weight_adapter/loha.py` @ 17adbb5cacc2 and `lokr.py` @ 179c2d35c84b: LoHa is claimed by `{x}.hada_w1_a` and
  then reads `hada_w1_b`, `hada_w2_a`, `hada_w2_b` (a KeyError if one is missing) and `hada_t1`/`hada_t2` when
  `hada_t1` is there, rebuilding `(w1a @ w1b) * (w2a @ w2b)`; LoKr reads whichever of `lokr_w1`, `lokr_w2`,
  `lokr_w1_a`, `lokr_w1_b`, `lokr_w2_a`, `lokr_w2_b`, `lokr_t2` are present (one of w1, w2, w1_a, w2_a claims the
  layer), rebuilding `kron(w1, w2)` with w1 unsqueezed to 4-D when w2 is; both then reshape to the weight's shape.
- `comfy/sd1_clip_config.json` @ 3502d903940a, `comfy/text_encoders/sd2_clip_config.json` @ 194a410783c1 and
  `comfy/clip_config_bigg.json` @ b6ab6d6f9b19: ComfyUI's own text encoders (12, 24 and 32 layers).

Everything is built on the meta device (names and shapes, no weights); the key names come from sd_lora's own
`add_lora` / `add_text_encoder_lora` / `kohya_state_dict` code path, as `run.py` calls it.
"""
import math
from functools import lru_cache

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from sd_lora.conditioning import add_text_encoder_lora
from peft.tuners.lycoris_utils import LycorisLayer
from sd_lora.lora import TARGET_PRESETS, add_lora, kohya_state_dict, unet_targets
from sd_lora.lycoris import adapter_config, lycoris_state_dict
from sd_lora.models import SDComponents, model_family

# ---------------------------------------------------------------------------------------------------------------
# The models sd_lora trains: the public diffusers configs (unet/config.json, text_encoder*/config.json) of
# runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-2-1 and stabilityai/stable-diffusion-xl-base-1.0.
# ---------------------------------------------------------------------------------------------------------------
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, attention_head_dim=8,
                 block_out_channels=[320, 640, 1280, 1280], cross_attention_dim=768, norm_num_groups=32,
                 down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                 up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
SD21_UNET = {**SD15_UNET, "sample_size": 96, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024,
             "use_linear_projection": True, "upcast_attention": True}
SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, attention_head_dim=[5, 10, 20],
                 block_out_channels=[320, 640, 1280], cross_attention_dim=2048, transformer_layers_per_block=[1, 2, 10],
                 down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], use_linear_projection=True,
                 addition_embed_type="text_time", addition_embed_type_num_heads=64, addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)
_CLIP = dict(vocab_size=49408, max_position_embeddings=77, layer_norm_eps=1e-5)
CLIP_VIT_L = dict(_CLIP, hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                  hidden_act="quick_gelu", projection_dim=768)           # SD1.x text_encoder, SDXL text_encoder
OPENCLIP_H = dict(_CLIP, hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=23,
                  hidden_act="gelu", projection_dim=512)                # SD2.x text_encoder (penultimate layer kept)
OPENCLIP_BIGG = dict(_CLIP, hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                     hidden_act="gelu", projection_dim=1280)            # SDXL text_encoder_2 (with projection)

FAMILIES = {  # family: (UNet config, [(text-encoder class, config)])
    "sd1": (SD15_UNET, [(CLIPTextModel, CLIP_VIT_L)]),
    "sd2": (SD21_UNET, [(CLIPTextModel, OPENCLIP_H)]),
    "sdxl": (SDXL_UNET, [(CLIPTextModel, CLIP_VIT_L), (CLIPTextModelWithProjection, OPENCLIP_BIGG)]),
}

# ---------------------------------------------------------------------------------------------------------------
# ComfyUI's side, re-derived.
# ---------------------------------------------------------------------------------------------------------------
# The rows of `unet_config_from_diffusers_unet`'s table that these families match (only the fields used here).
COMFY_UNETS = {
    "SD15": dict(in_channels=4, model_channels=320, adm_in_channels=None, context_dim=768, num_res_blocks=[2, 2, 2, 2],
                 channel_mult=[1, 2, 4, 4], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_middle=1,
                 transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0]),
    "SD21": dict(in_channels=4, model_channels=320, adm_in_channels=None, context_dim=1024, num_res_blocks=[2, 2, 2, 2],
                 channel_mult=[1, 2, 4, 4], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_middle=1,
                 transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0]),
    "SDXL": dict(in_channels=4, model_channels=320, adm_in_channels=2816, context_dim=2048, num_res_blocks=[2, 2, 2],
                 channel_mult=[1, 2, 4], transformer_depth=[0, 0, 2, 2, 10, 10], transformer_depth_middle=10,
                 transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10]),
}
# ComfyUI's own text encoders per family, by ComfyUI's name, with their layer counts (`num_hidden_layers` of
# sd1_clip_config.json, sd2_clip_config.json, clip_config_bigg.json): SD2's clip_h keeps all 24 OpenCLIP-H layers
COMFY_CLIPS = {"sd1": {"clip_l": 12}, "sd2": {"clip_h": 24}, "sdxl": {"clip_l": 12, "clip_g": 32}}
EXPECTED_COMFY_UNET = {"sd1": "SD15", "sd2": "SD21", "sdxl": "SDXL"}

# what ComfyUI's LoRA adapter reads of a kohya LoRA (`load_lora` + `LoRAAdapter.load`); sd_lora writes the first three
UP, DOWN, ALPHA, MID, DORA = ".lora_up.weight", ".lora_down.weight", ".alpha", ".lora_mid.weight", ".dora_scale"
# the suffixes each of ComfyUI's adapters consumes (`LoHaAdapter.load`, `LoKrAdapter.load`), and what `load_lora`
# reads for any adapter
LORA_SUFFIXES = {UP, DOWN, MID}
LOHA_REQUIRED = [".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b"]
LOHA_SUFFIXES = set(LOHA_REQUIRED) | {".hada_t1", ".hada_t2"}
LOKR_SUFFIXES = {".lokr_w1", ".lokr_w2", ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2_a", ".lokr_w2_b", ".lokr_t2"}
LOKR_CLAIMS = (".lokr_w1", ".lokr_w2", ".lokr_w1_a", ".lokr_w2_a")
COMMON_SUFFIXES = {ALPHA, DORA}
KIND_SUFFIXES = {"lora": LORA_SUFFIXES, "dora": LORA_SUFFIXES | {DORA}, "loha": LOHA_SUFFIXES, "lokr": LOKR_SUFFIXES}

# diffusers module names under each part of the UNet that `unet_to_diffusers` maps (`.weight` entries only)
_RESNET = ["norm1", "conv1", "time_emb_proj", "norm2", "conv2", "conv_shortcut"]
_ATTENTION = ["norm", "proj_in", "proj_out"]
_TRANSFORMER_BLOCK = ["norm1", "norm2", "norm3", "ff.net.0.proj", "ff.net.2"] + [
    f"attn{a}.{p}" for a in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0")]
_TOP_LEVEL = ["conv_in", "conv_norm_out", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2",
              "class_embedding.linear_1", "class_embedding.linear_2", "add_embedding.linear_1", "add_embedding.linear_2"]
_CLIP_LAYER = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2"]


def kohya_name(prefix: str, module: str) -> str:
    "A kohya LoRA name: the prefix and the module path with `.` -> `_`."
    return prefix + module.replace(".", "_")


def clip_path(module: str) -> str:
    "A CLIP text encoder's module path as kohya and ComfyUI name it: transformers 5 dropped the `text_model` level."
    return module if module.startswith("text_model.") else f"text_model.{module}"


def count_blocks(keys, fmt: str) -> int:
    "How many consecutive indices `i` have a key starting with `fmt.format(i)` (ComfyUI's count rule)."
    n = 0
    while any(k.startswith(fmt.format(n)) for k in keys): n += 1
    return n


def comfy_unet_config(unet) -> tuple[str, dict]:
    "ComfyUI's config for a diffusers UNet: block counts from its weights, matched against ComfyUI's known models."
    sd = {k: v.shape for k, v in unet.state_dict().items()}
    depth, match = [], {}
    for i in range(count_blocks(sd, "down_blocks.{}")):
        attentions = count_blocks(sd, f"down_blocks.{i}.attentions." + "{}")
        for a in range(attentions):
            d = count_blocks(sd, f"down_blocks.{i}.attentions.{a}.transformer_blocks." + "{}")
            depth.append(d)
            if d: match["context_dim"] = sd[f"down_blocks.{i}.attentions.{a}.transformer_blocks.0.attn2.to_k.weight"][1]
        if not attentions: depth += [0] * count_blocks(sd, f"down_blocks.{i}.resnets." + "{}")
    match.update(transformer_depth=depth, model_channels=sd["conv_in.weight"][0], in_channels=sd["conv_in.weight"][1],
                 adm_in_channels=next((sd[k][1] for k in ("class_embedding.linear_1.weight",
                                                          "add_embedding.linear_1.weight") if k in sd), None))
    found = [name for name, cfg in COMFY_UNETS.items() if all(cfg[k] == v for k, v in match.items())]
    assert len(found) == 1, f"ComfyUI would not recognise this UNet: {match}"
    return found[0], COMFY_UNETS[found[0]]


def comfy_unet_lora_names(cfg: dict) -> set[str]:
    "Every `lora_unet_...` name ComfyUI's key map accepts for a UNet config (the diffusers side of unet_to_diffusers)."
    modules = list(_TOP_LEVEL)
    def attention(path, n): modules.extend([f"{path}.{m}" for m in _ATTENTION] + [
        f"{path}.transformer_blocks.{t}.{m}" for t in range(n) for m in _TRANSFORMER_BLOCK])
    depth_in, depth_out, res = list(cfg["transformer_depth"]), list(cfg["transformer_depth_output"]), cfg["num_res_blocks"]
    for x in range(len(cfg["channel_mult"])):
        for i in range(res[x]):
            modules += [f"down_blocks.{x}.resnets.{i}.{m}" for m in _RESNET]
            if (d := depth_in.pop(0)): attention(f"down_blocks.{x}.attentions.{i}", d)
        modules.append(f"down_blocks.{x}.downsamplers.0.conv")
    attention("mid_block.attentions.0", cfg["transformer_depth_middle"])
    modules += [f"mid_block.resnets.{i}.{m}" for i in (0, 1) for m in _RESNET]
    for x, n in enumerate(reversed(res)):  # up blocks have one ResNet more; their depths are read from the end
        for i in range(n + 1):
            modules += [f"up_blocks.{x}.resnets.{i}.{m}" for m in _RESNET]
            if (d := depth_out.pop()): attention(f"up_blocks.{x}.attentions.{i}", d)
        modules.append(f"up_blocks.{x}.upsamplers.0.conv")
    return {kohya_name("lora_unet_", m) for m in modules}


def comfy_clip_lora_names(clips: dict[str, int]) -> set[str]:
    "Every `lora_te*_...` name ComfyUI's CLIP key map accepts, given its text encoders (ComfyUI name: layer count)."
    names, clip_l_present = set(), False
    for b in range(32):  # ComfyUI looks at layers 0..31 only, each present if its encoder has that many layers
        for c in _CLIP_LAYER:
            module = f"text_model.encoder.layers.{b}.{c}"  # ComfyUI's clip_model.py keeps CLIP's `text_model`
            has = {clip for clip, layers in clips.items() if b < layers}
            if "clip_h" in has: names |= {kohya_name(p, module) for p in ("lora_te_", "lora_te1_")}
            if "clip_l" in has:
                names |= {kohya_name(p, module) for p in ("lora_te_", "lora_te1_")}
                clip_l_present = True
            if "clip_g" in has: names.add(kohya_name("lora_te2_" if clip_l_present else "lora_te_", module))
    return names


@lru_cache(maxsize=None)
def comfy_accepted(family: str) -> frozenset[str]:
    "The LoRA names ComfyUI accepts for a checkpoint of `family`: its UNet's and its text encoders' (one key map)."
    unet_config, _ = FAMILIES[family]
    with init_empty_weights():
        unet = UNet2DConditionModel(**unet_config)
    found, cfg = comfy_unet_config(unet)
    assert found == EXPECTED_COMFY_UNET[family]
    return frozenset(comfy_unet_lora_names(cfg) | comfy_clip_lora_names(COMFY_CLIPS[family]))


def not_loaded(sd: dict, accepted) -> list[str]:
    "The keys of a LoRA file that ComfyUI's `load_lora` would warn about ('lora key not loaded'), as it claims them."
    claimed = set()
    for name in {k.split(".", 1)[0] for k in sd} & set(accepted):
        claimed |= {name + s for s in COMMON_SUFFIXES if name + s in sd}
        if name + UP in sd:
            assert name + DOWN in sd, f"{name}: an up weight with no down weight (ComfyUI raises a KeyError)"
            claimed |= {name + UP, name + DOWN} | ({name + MID} if name + MID in sd else set())
        if name + ".hada_w1_a" in sd:
            missing = [s for s in LOHA_REQUIRED if name + s not in sd]
            assert not missing, f"{name}: a LoHa without {missing} (ComfyUI raises a KeyError)"
            claimed |= {name + s for s in LOHA_SUFFIXES if name + s in sd}
        if any(name + s in sd for s in LOKR_CLAIMS): claimed |= {name + s for s in LOKR_SUFFIXES if name + s in sd}
    return sorted(set(sd) - claimed)


def check_shapes(sd: dict, targets: dict[str, tuple[torch.nn.Module, float]]) -> list[str]:
    "Problems with the up/down/alpha of each LoRA'd layer (with peft's scale), as ComfyUI would merge it into it."
    problems = []
    for name, (module, scale) in targets.items():
        up, down, alpha = sd.get(name + UP), sd.get(name + DOWN), sd.get(name + ALPHA)
        if up is None or down is None or alpha is None:
            problems.append(f"{name}: missing {[s for s, t in ((UP, up), (DOWN, down), (ALPHA, alpha)) if t is None]}")
            continue
        w, r = module.weight.shape, down.shape[0]
        want_down, want_up = (((r, w[1], *w[2:]), (w[0], r, 1, 1)) if isinstance(module, torch.nn.Conv2d)
                              else ((r, w[1]), (w[0], r)))  # kohya: convs keep their kernel in down, 1x1 in up
        if tuple(down.shape) != want_down or tuple(up.shape) != want_up:
            problems.append(f"{name}: down {tuple(down.shape)} up {tuple(up.shape)} for weight {tuple(w)}")
            continue
        try:  # ComfyUI's merge, on meta tensors: mm(up.flatten(1), down.flatten(1)).reshape(weight.shape)
            torch.mm(up.to("meta").flatten(1), down.to("meta").flatten(1)).reshape(w)
        except RuntimeError as e:
            problems.append(f"{name}: ComfyUI's merge fails: {e}")
            continue
        if alpha.numel() != 1 or not math.isclose(alpha.item() / r, scale):  # ComfyUI's scale: alpha / down.shape[0]
            problems.append(f"{name}: alpha {alpha} / rank {r} is not peft's scale {scale}")
    return problems


def lycoris_shape_problems(sd: dict, targets: dict[str, tuple[torch.nn.Module, float]]) -> list[str]:
    "Problems with each LoHa/LoKr layer's tensors, as ComfyUI rebuilds and reshapes them into the layer (meta tensors)."
    problems = []
    for name, (module, _) in targets.items():
        g = lambda s: sd[name + s].to("meta") if name + s in sd else None
        w = module.weight.shape
        try:
            if g(".hada_w1_a") is not None:
                diff = (g(".hada_w1_a") @ g(".hada_w1_b")) * (g(".hada_w2_a") @ g(".hada_w2_b"))
            else:
                w1 = g(".lokr_w1") if g(".lokr_w1") is not None else g(".lokr_w1_a") @ g(".lokr_w1_b")
                w2 = g(".lokr_w2") if g(".lokr_w2") is not None else g(".lokr_w2_a") @ g(".lokr_w2_b")
                diff = torch.kron(w1.unsqueeze(2).unsqueeze(2) if w2.dim() == 4 else w1, w2)
            if diff.numel() != w.numel(): raise RuntimeError(f"{tuple(diff.shape)} for weight {tuple(w)}")
            diff.reshape(w)
        except (RuntimeError, TypeError) as e:
            problems.append(f"{name}: ComfyUI's rebuild fails: {e}")
        if name + ALPHA not in sd or sd[name + ALPHA].numel() != 1: problems.append(f"{name}: no scalar alpha")
    return problems


def dora_shape_problems(sd: dict, targets: dict[str, tuple[torch.nn.Module, float]]) -> list[str]:
    "DoRA layers whose `dora_scale` ComfyUI would not read as one magnitude per output row ([out, 1] or [out, 1, 1, 1])."
    return [f"{name}: dora_scale {tuple(sd[name + DORA].shape) if name + DORA in sd else None} for weight "
            f"{tuple(m.weight.shape)}" for name, (m, _) in targets.items()
            if name + DORA not in sd or tuple(sd[name + DORA].shape) != (m.weight.shape[0],) + (1,) * (m.weight.dim() - 1)]


def sd_lora_file(family: str, preset: str, rank: int = 4, alpha: float = 8.0, kind: str = "lora"):
    "The kohya-layout state dict sd_lora writes for a full-size `family` model (meta device), and the layers it adapted."
    unet_config, te_specs = FAMILIES[family]
    with init_empty_weights():
        unet = UNet2DConditionModel(**unet_config)
        tes = [cls(CLIPTextConfig(**cfg)) for cls, cfg in te_specs]
    assert model_family(unet) == family
    m = SDComponents(tokenizer=None, text_encoder=tes[0], vae=None, unet=unet, noise_scheduler=None,
                     text_encoder_2=tes[1] if len(tes) > 1 else None)
    # as run.py does: the UNet's adapter, then the text encoders'
    kw = dict(rank=rank, alpha=alpha, lora_type="lora" if kind == "dora" else kind, use_dora=kind == "dora")
    add_lora(m.unet, adapter_config(target_modules=unet_targets(preset), **kw))
    add_text_encoder_lora(m, **kw)
    sd = lycoris_state_dict(m.unet, tes) if kind in ("loha", "lokr") else kohya_state_dict(m.unet, tes)
    prefixes = ["lora_unet_"] + (["lora_te1_", "lora_te2_"] if family == "sdxl" else ["lora_te_"])
    adapted = {kohya_name(p, n if p == "lora_unet_" else clip_path(n)): (mod.base_layer, mod.scaling["default"])
               for p, model in zip(prefixes, [unet, *tes])
               for n, mod in model.named_modules()
               if (hasattr(mod, "lora_A") or isinstance(mod, LycorisLayer)) and hasattr(mod, "base_layer")}
    return sd, adapted


def expected_unet_targets(unet_config: dict, preset: str) -> set[str]:
    "The UNet layers a preset names (peft's rule: the module path is the target or ends with `.target`)."
    with init_empty_weights(): unet = UNet2DConditionModel(**unet_config)
    return {kohya_name("lora_unet_", n) for n, mod in unet.named_modules()
            if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d))
            and any(n == t or n.endswith("." + t) for t in TARGET_PRESETS[preset])}


@pytest.mark.parametrize("preset", list(TARGET_PRESETS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_comfyui_loads_every_key_sd_lora_writes(family, preset):
    sd, adapted = sd_lora_file(family, preset)
    accepted = comfy_accepted(family)
    # every key is a LoRA weight ComfyUI's adapter reads ...
    assert all(k.endswith((UP, DOWN, ALPHA)) for k in sd), [k for k in sd if not k.endswith((UP, DOWN, ALPHA))][:5]
    # ... under a name ComfyUI maps to a layer of this model, so nothing is "not loaded"
    assert not_loaded(sd, accepted) == []
    # every adapted layer is written, with shapes and alpha that ComfyUI merges into that layer as peft computed it
    assert {k.split(".", 1)[0] for k in sd} == set(adapted)
    assert len(sd) == 3 * len(adapted)
    assert check_shapes(sd, adapted) == []
    # the UNet layers are the ones the preset names, and the text encoders' are their attention projections
    unet_names = {n for n in adapted if n.startswith("lora_unet_")}
    assert unet_names == expected_unet_targets(FAMILIES[family][0], preset)
    te_names = set(adapted) - unet_names
    assert te_names and all(n.rsplit("_", 2)[-2:][0] in ("q", "k", "v", "out") for n in te_names)
    if "conv1" in TARGET_PRESETS[preset]:  # the conv preset reaches every ResNet conv, and writes them 4-D
        convs = [n for n in unet_names if n.endswith(("_conv1", "_conv2", "_conv_shortcut"))]
        assert convs and all(sd[n + DOWN].dim() == 4 and sd[n + UP].dim() == 4 for n in convs)
        assert any(sd[n + DOWN].shape[-1] == 3 for n in convs) and any(sd[n + DOWN].shape[-1] == 1 for n in convs)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_comfyuis_unet_map_covers_every_diffusers_weight(family):
    "The re-derived map names every weight of the full-size diffusers UNet, as ComfyUI's converter is meant to."
    with init_empty_weights(): unet = UNet2DConditionModel(**FAMILIES[family][0])
    weights = {kohya_name("lora_unet_", k.removesuffix(".weight")) for k in unet.state_dict() if k.endswith(".weight")}
    assert weights - comfy_accepted(family) == set()


def test_accepted_names_are_comfyuis_for_these_models():
    "Spot checks of the re-derived key maps against names ComfyUI's own tables give."
    sd1, sd2, xl = comfy_accepted("sd1"), comfy_accepted("sd2"), comfy_accepted("sdxl")
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0" in sd1
    assert "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_0_proj" in sd1
    assert "lora_unet_mid_block_resnets_1_conv2" in sd1 and "lora_unet_up_blocks_0_resnets_2_conv_shortcut" in sd1
    assert "lora_unet_down_blocks_3_attentions_0_transformer_blocks_0_attn1_to_q" not in sd1  # DownBlock2D: none
    assert "lora_te_text_model_encoder_layers_11_self_attn_q_proj" in sd1
    assert "lora_te_text_model_encoder_layers_12_self_attn_q_proj" not in sd1
    assert "lora_te_text_model_encoder_layers_23_self_attn_v_proj" in sd2  # ComfyUI's clip_h has 24 layers
    assert "lora_unet_down_blocks_2_attentions_1_transformer_blocks_9_attn2_to_k" in xl
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_9_ff_net_2" in xl
    assert "lora_unet_up_blocks_0_attentions_2_transformer_blocks_9_attn1_to_v" in xl
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" not in xl  # DownBlock2D in SDXL
    assert "lora_te1_text_model_encoder_layers_10_self_attn_out_proj" in xl
    assert "lora_te2_text_model_encoder_layers_31_self_attn_k_proj" in xl
    assert "lora_te2_text_model_encoder_layers_0_self_attn_k_proj" not in sd1


def test_the_checker_catches_names_and_shapes_comfyui_would_not_load():
    sd, adapted = sd_lora_file("sd1", "attention_ff_conv")
    accepted = comfy_accepted("sd1")
    good = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    assert good + UP in sd and not_loaded(sd, accepted) == []
    # a misspelt block
    typo = good.replace("transformer_blocks", "transfomer_blocks")
    bad = {**sd, typo + UP: sd[good + UP], typo + DOWN: sd[good + DOWN], typo + ALPHA: sd[good + ALPHA]}
    assert not_loaded(bad, accepted) == [typo + ALPHA, typo + DOWN, typo + UP]
    # peft's suffixes instead of kohya's, and a layer SD1.5 does not have (an SDXL-depth transformer block)
    peft_style = {good + ".lora_A.weight": sd[good + DOWN]}
    assert not_loaded(peft_style, accepted) == [good + ".lora_A.weight"]
    deep = "lora_unet_down_blocks_2_attentions_0_transformer_blocks_5_attn1_to_q"
    assert deep in comfy_accepted("sdxl") and not_loaded({deep + ALPHA: sd[good + ALPHA]}, accepted) == [deep + ALPHA]
    assert not_loaded({"lora_te2_text_model_encoder_layers_0_self_attn_q_proj" + UP: sd[good + UP]}, accepted)
    with pytest.raises(AssertionError, match="no down weight"):
        not_loaded({good + UP: sd[good + UP]}, accepted)
    # shapes: up and down swapped, and a conv whose down weight lost its kernel
    swapped = {**sd, good + UP: sd[good + DOWN], good + DOWN: sd[good + UP]}
    assert [p.split(":")[0] for p in check_shapes(swapped, adapted)] == [good]
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    flat = {**sd, conv + DOWN: sd[conv + DOWN].flatten(1)}
    assert [p.split(":")[0] for p in check_shapes(flat, adapted)] == [conv]


@pytest.mark.parametrize("kind", ["dora", "loha", "lokr"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_comfyui_loads_every_key_of_dora_loha_and_lokr_files(family, kind):
    "Every other format sd_lora writes, on attention, feed-forward and conv targets and the text encoders."
    sd, adapted = sd_lora_file(family, "attention_ff_conv", kind=kind)
    # every key ends with a suffix this kind's ComfyUI adapter consumes (or load_lora's alpha / dora_scale) ...
    allowed = KIND_SUFFIXES[kind] | {ALPHA}
    assert all(k.endswith(tuple(allowed)) for k in sd), [k for k in sd if not k.endswith(tuple(allowed))][:5]
    # ... under a name ComfyUI maps to a layer of this model, so nothing is "not loaded"
    assert not_loaded(sd, comfy_accepted(family)) == []
    assert {k.split(".", 1)[0] for k in sd} == set(adapted)
    assert unet_names_and_text_encoders(adapted, family)
    if kind == "dora":
        assert check_shapes({k: v for k, v in sd.items() if not k.endswith(DORA)}, adapted) == []
        assert dora_shape_problems(sd, adapted) == []
    else:
        assert lycoris_shape_problems(sd, adapted) == []
        convs = [n for n in adapted if n.endswith(("_conv1", "_conv2", "_conv_shortcut"))]
        assert convs and all(any(k.startswith(n + ".") for k in sd) for n in convs)


def unet_names_and_text_encoders(adapted, family) -> bool:
    "The UNet layers are the conv preset's, and every text encoder has adapted layers."
    unet_names = {n for n in adapted if n.startswith("lora_unet_")}
    heads = ("lora_te1_", "lora_te2_") if family == "sdxl" else ("lora_te_",)
    return (unet_names == expected_unet_targets(FAMILIES[family][0], "attention_ff_conv")
            and all(any(n.startswith(h) for n in adapted) for h in heads))


def test_the_checker_catches_lycoris_files_comfyui_would_not_load():
    sd, adapted = sd_lora_file("sd1", "attention", kind="loha")
    accepted, name = comfy_accepted("sd1"), "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    assert not_loaded(sd, accepted) == [] and lycoris_shape_problems(sd, adapted) == []
    with pytest.raises(AssertionError, match="a LoHa without"):
        not_loaded({k: v for k, v in sd.items() if k != name + ".hada_w2_b"}, accepted)
    assert not_loaded({name + ".hada_w3": sd[name + ".hada_w1_a"]}, accepted) == [name + ".hada_w3"]
    swapped = {**sd, name + ".hada_w1_a": sd[name + ".hada_w1_b"], name + ".hada_w1_b": sd[name + ".hada_w1_a"]}
    assert [p.split(":")[0] for p in lycoris_shape_problems(swapped, adapted)] == [name]
    sd, adapted = sd_lora_file("sd1", "attention", kind="dora")
    flat = {**sd, name + DORA: sd[name + DORA].flatten()}  # peft's own [out] magnitudes: not ComfyUI's layout
    assert [p.split(":")[0] for p in dora_shape_problems(flat, adapted)] == [name]
