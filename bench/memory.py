"""What one training micro-step holds in memory, by kind, counted tensor by tensor (so on any device).

A GPU reports its peak memory, but not what fills it. Frozen weights and LoRA weights are parameters; gradients and
AdamW's two moments appear after a step; what grows with the batch is the activations autograd keeps from the forward
pass for the backward, which a saved-tensor hook sees as autograd stores them (`sd_lora.memory.saved_storages`, as
the trainer's choice to merge accumulation counts them). Buffers that live only inside one layer
are not counted, so the sum is a lower bound of the peak. `python bench/bench.py --memory` reports it per configuration.
"""
import torch
from sd_lora.conditioning import text_encoders
from sd_lora.memory import saved_storages
from sd_lora.loss import training_loss


def storage_mib(tensors, # tensors on any device, possibly views of one another
               ) -> float:
    "MiB of the distinct storages behind `tensors`: views and shared weights count once."
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values()) / 2**20

def step_memory(run, # a fresh `Run` from `setup`: what it trains takes one optimizer step
                batch: dict, # a micro-batch from its loader
               ) -> dict: # MiB of frozen weights, trained weights ("lora"), gradients, optimizer state, EMA, saved activations
    "The memory of one micro-step by kind, counted tensor by tensor (so on any device)."
    m = run.m
    weights = [p for model in (m.unet, m.vae, *text_encoders(m)) for p in model.parameters()]
    with saved_storages({p.untyped_storage().data_ptr() for p in weights}) as saved:  # what autograd keeps for the backward
        loss = training_loss(batch, m, run.unet, run.generator, run.prediction_type, run.cfg, run.text_encoders or None)
    activations = sum(saved.values()) / 2**20
    loss.backward()
    lora = [p for p in weights if p.requires_grad]
    gradients = storage_mib([p.grad for p in lora if p.grad is not None])
    run.optimizer.optimizer.step()  # AdamW makes its state on the first step
    state = [v for s in run.optimizer.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    ema = storage_mib(run.ema.shadow_params) if run.ema is not None else 0.0
    return {"frozen": storage_mib([p for p in weights if not p.requires_grad]), "lora": storage_mib(lora),
            "gradients": gradients, "optimizer": storage_mib(state), "ema": ema, "activations": activations}
