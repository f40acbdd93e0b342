"""Run by torchrun in test_machines: one LoRA step of the tiny UNet sharded with FSDP2 (torch's `fully_shard`, per
block, over gloo) against the same step unsharded. All in fp32, the gradients agree to float rounding; with the
frozen weights in bfloat16 beside fp32 adapters (as a GPU run keeps them) FSDP2 shards the mixed block, and its
gradients differ from the unsharded ones by less than bfloat16 itself moves them from fp32's."""
import copy
import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from sd_lora.lora import add_lora, lora_config
from sd_lora.models import load_components

def lora_unet():
    torch.manual_seed(0)
    unet = load_components().unet
    add_lora(unet, lora_config())
    with torch.no_grad():  # B starts at zero: give it weights, so that A's gradient is not zero either
        for n, p in unet.named_parameters():
            if "lora_B" in n: p.normal_(0, 0.1)
    return unet

def lora_grads(unet, dtype):
    "The adapters' gradients of one step on a batch every rank draws alike (so the averaged gradient is this one)."
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g).to(dtype)
    text = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g).to(dtype)
    unet(x, torch.tensor([10, 500]), text).sample.float().pow(2).mean().backward()
    return {n: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            for n, p in unet.named_parameters() if p.requires_grad}

def sharded(unet):
    for block in [*unet.down_blocks, unet.mid_block, *unet.up_blocks]: fully_shard(block)
    return fully_shard(unet)

def max_diff(a, b): return max(float((a[n] - b[n]).abs().max()) for n in a)

dist.init_process_group("gloo")
fp32 = lora_unet()
ref32 = lora_grads(copy.deepcopy(fp32), torch.float32)
fsdp32 = lora_grads(sharded(fp32), torch.float32)
scale = max(float(g.abs().max()) for g in ref32.values())
assert scale > 0 and max_diff(fsdp32, ref32) <= 1e-5 * scale, (max_diff(fsdp32, ref32), scale)

half = lora_unet()
for p in half.parameters():
    if not p.requires_grad: p.data = p.data.to(torch.bfloat16)
ref16 = lora_grads(copy.deepcopy(half), torch.bfloat16)
fsdp_half = sharded(half)
assert {p.dtype for p in fsdp_half.parameters()} == {torch.bfloat16, torch.float32}
assert all(type(p).__name__ == "DTensor" for p in fsdp_half.parameters())  # every weight sharded, of either dtype
fsdp16 = lora_grads(fsdp_half, torch.bfloat16)
assert max_diff(fsdp16, ref16) < max_diff(ref16, ref32), (max_diff(fsdp16, ref16), max_diff(ref16, ref32))
if dist.get_rank() == 0:
    print(f"FSDP2 against unsharded, largest LoRA gradient {scale:.2e}: fp32 {max_diff(fsdp32, ref32):.1e}; "
          f"bf16 frozen weights {max_diff(fsdp16, ref16):.1e}, where bf16 itself moves them {max_diff(ref16, ref32):.1e}",
          flush=True)
dist.destroy_process_group()
