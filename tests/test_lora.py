"Saving and loading LoRA weights in diffusers' format."
import torch
from safetensors import safe_open
from sd_lora.models import load_components, load_pipeline
from sd_lora.lora import add_lora, lora_config, save_lora


def _nudged_unet(rank, alpha):
    unet = load_components().unet
    add_lora(unet, lora_config(rank=rank, alpha=alpha))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_B" in n: p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return unet


def _out(unet):
    g = torch.Generator().manual_seed(1)
    x, text = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad(): return unet(x, torch.tensor([20, 700]), text).sample


def test_reload_is_exact_when_alpha_differs_from_rank(tmp_path):
    unet = _nudged_unet(rank=4, alpha=16)
    path = save_lora(tmp_path, unet)
    assert path.name == "pytorch_lora_weights.safetensors"
    with safe_open(str(path), "pt") as f:
        assert f.metadata() is not None
        assert all(k.startswith("unet.") for k in f.keys())
    pipe = load_pipeline()
    base = _out(pipe.unet)
    pipe.load_lora_weights(tmp_path)
    assert torch.allclose(_out(pipe.unet), _out(unet), atol=1e-5)
    assert not torch.allclose(_out(pipe.unet), base, atol=1e-3)


def test_only_lora_parameters_train():
    unet = load_components().unet
    params = add_lora(unet, lora_config(rank=2))
    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert len(trainable) == len(params) > 0
    assert all("lora_A" in n or "lora_B" in n for n in trainable)
