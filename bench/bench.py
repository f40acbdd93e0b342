"""Training throughput of sd_lora: images/s, step time, peak memory and MFU, per configuration.

The SD1.5 architecture with random weights (no download; random weights train at the speed of real ones) on a
synthetic JPEG imagefolder, or the tiny model on the CPU (`--tiny`, the smoke test CI runs). Examples:

    python bench/bench.py --tiny --steps 4 --warmup 2                 # CPU smoke test, about a minute
    python bench/bench.py --steps 40 --warmup 10 --out bench/results/h200.json   # on a GPU
    python bench/bench.py --attributes --out bench/results/cpu-attributes.json    # host cost of .device/.dtype
    python bench/bench.py --memory --configs documented,b8 --mixed_precision bf16    # where a step's memory goes
"""
import argparse
import gc
import json
import os
import platform
import subprocess
import tempfile
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from sd_lora.core import quiet
from sd_lora.config import TrainConfig
from sd_lora.models import TINY_SD, byte_clip_tokenizer, device_dtype, vae_scale_factor
from sd_lora.run import setup, forget_accelerate_state
from sd_lora.train import train_loop, epoch_batches
sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory import step_memory  # bench/memory.py, beside this script

# name -> TrainConfig overrides; "documented" is the diffusers docs' configuration (batch 1, accumulation 4)
CONFIGS = {
    # plain: encoders at every step and every micro-batch on its own, as the reference script does (its stand-in here)
    "documented-plain": dict(train_batch_size=1, gradient_accumulation_steps=4, cache_latents="off", merge_accumulation=False),
    # the default: latents cached as drawn, micro-batches merged when they fit
    "documented": dict(train_batch_size=1, gradient_accumulation_steps=4),
    "documented-accumulated": dict(train_batch_size=1, gradient_accumulation_steps=4, merge_accumulation=False),
    "documented-merged": dict(train_batch_size=1, gradient_accumulation_steps=4, merge_accumulation=True),
    "b8": dict(train_batch_size=8), "b16": dict(train_batch_size=16), "b32": dict(train_batch_size=32),
    # memory options, each against plain b8
    "b8-checkpointing": dict(train_batch_size=8, gradient_checkpointing=True),
    "documented-merged-checkpointing": dict(train_batch_size=1, gradient_accumulation_steps=4, merge_accumulation=True,
                                            gradient_checkpointing=True),
    "b8-8bit-adam": dict(train_batch_size=8, use_8bit_adam=True),
    # the frozen weights in fp32 and no autocast, against the half-precision default (on a GPU; the CPU's default is fp32)
    "documented-fp32": dict(train_batch_size=1, gradient_accumulation_steps=4, mixed_precision="no"),
    # compiled transformer blocks (inductor generates code: a minute or more before the first step, so GPU only by default)
    "documented-compiled": dict(train_batch_size=1, gradient_accumulation_steps=4, merge_accumulation=True,
                                dynamo_backend="inductor"),
    "b8-compiled": dict(train_batch_size=8, dynamo_backend="inductor"),
    # the same with CUDA graphs (inductor's reduce-overhead), of the blocks or of the whole UNet (longer to compile)
    "documented-graphs": dict(train_batch_size=1, gradient_accumulation_steps=4, merge_accumulation=True,
                              dynamo_backend="inductor", dynamo_mode="reduce-overhead"),
    "documented-unet-graphs": dict(train_batch_size=1, gradient_accumulation_steps=4, merge_accumulation=True,
                                   dynamo_backend="inductor", dynamo_mode="reduce-overhead", dynamo_scope="unet"),
    "b8-unet-compiled": dict(train_batch_size=8, dynamo_backend="inductor", dynamo_scope="unet"),
    "b32-compiled": dict(train_batch_size=32, dynamo_backend="inductor"),
    # full fine-tuning of the whole UNet (sd_lora.finetune), the reference's documented run and its memory options
    "finetune-documented": dict(finetune=True, train_batch_size=1, gradient_accumulation_steps=4),
    "finetune-checkpointing": dict(finetune=True, train_batch_size=1, gradient_accumulation_steps=4, gradient_checkpointing=True),
    "finetune-8bit-adam": dict(finetune=True, train_batch_size=1, gradient_accumulation_steps=4, gradient_checkpointing=True,
                               use_8bit_adam=True),
    "finetune-ema": dict(finetune=True, train_batch_size=1, gradient_accumulation_steps=4, gradient_checkpointing=True,
                         use_ema=True),
    "finetune-ema-offloaded": dict(finetune=True, train_batch_size=1, gradient_accumulation_steps=4,
                                   gradient_checkpointing=True, use_ema=True, offload_ema=True),
}
# the full fine-tunes' memory is counted (--memory); timing them is left to a GPU
FINETUNE = {n for n in CONFIGS if n.startswith("finetune-")}
# by default on a GPU only: 8-bit Adam needs bitsandbytes, which CI does not install; compiling takes minutes on a CPU
GPU_ONLY = {"b8-8bit-adam", "finetune-8bit-adam"} | {n for n in CONFIGS if "compiled" in n or "graphs" in n}


def sd15_folder(root: Path) -> str:
    "Save an SD1.5-architecture pipeline with random weights (once) and return its folder."
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    path = root / "sd15-random"
    if (path / "model_index.json").exists(): return str(path)
    tok = byte_clip_tokenizer()
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2, sample_size=512)
    te = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                      num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                      pad_token_id=tok.pad_token_id))
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                          clip_sample=False)
    StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=te, tokenizer=tok, scheduler=sched, safety_checker=None,
                            feature_extractor=None, requires_safety_checker=False).save_pretrained(path)
    return str(path)


def synthetic_images(root: Path, n: int, size: int) -> str:
    "An imagefolder of `n` smooth random JPEGs with captions."
    path = root / f"images-{n}-{size}"
    if (path / "metadata.jsonl").exists(): return str(path)
    path.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((size, size), Image.BICUBIC).save(path / f"{i:05d}.jpg", quality=90)
        rows.append(json.dumps({"file_name": f"{i:05d}.jpg", "text": f"a synthetic picture number {i}"}))
    (path / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return str(path)


def unet_flops_per_image(run) -> float:
    "FLOPs of one UNet forward and backward (LoRA training step), per image, counted by PyTorch."
    unet, m = run.unet, run.m
    res = run.cfg.resolution // vae_scale_factor(m.vae)
    x = torch.randn(2, 4, res, res, device=m.vae.device, dtype=m.vae.dtype)
    text = torch.randn(2, 77, m.text_encoder.config.hidden_size, device=x.device, dtype=x.dtype)
    with FlopCounterMode(display=False) as counter:
        unet(x, torch.tensor([10, 500], device=x.device), text, return_dict=False)[0].float().pow(2).mean().backward()
    run.optimizer.zero_grad()
    return counter.get_total_flops() / 2


def measure(name: str, cfg: TrainConfig, warmup: int, steps: int, peak_flops: float|None) -> dict:
    """Train `warmup + steps` optimizer steps and time the last `steps`; `startup_s` is the time to the first step
    (loading, caching, compiling), `total_s` the whole run from before `setup` to the last step, and `graphs` counts
    the graphs torch.compile made (0: eager)."""
    from torch._dynamo.utils import counters
    cuda = torch.cuda.is_available()
    torch._dynamo.reset()  # each configuration compiles as in a fresh process (inductor's disk cache aside)
    graphs_before = counters["stats"]["unique_graphs"]
    start = time.perf_counter()
    forget_accelerate_state()  # each configuration has its own precision
    run = setup(cfg)
    run.max_train_steps = warmup + steps
    if cuda: torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    loop_start = time.perf_counter()
    h = train_loop(run)
    if cuda: torch.cuda.synchronize()
    end = time.perf_counter()
    peak_mem = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    graphs = counters["stats"]["unique_graphs"] - graphs_before
    # only after timing: a compiled module first called under FlopCounterMode (a dispatch mode) stays eager for good
    try: flops = unet_flops_per_image(run)
    except Exception as e: flops, flop_error = None, f"{type(e).__name__}: {e}"[:300]  # keep the timings regardless
    run.accelerator.end_training()
    images_per_step = cfg.train_batch_size * cfg.gradient_accumulation_steps
    step_s = (end - h.step_times[warmup - 1]) / steps if warmup else (end - start) / steps
    merged = cfg.gradient_accumulation_steps > 1 and run.accelerator.gradient_accumulation_steps == 1
    ips = images_per_step / step_s
    # each step's seconds, and their median per epoch: the first epoch encodes as it draws, later ones read the cache
    durations = np.diff([loop_start, *h.step_times])
    per_epoch = run.steps_per_epoch
    epoch_step_s = [round(float(np.median(durations[e:e + per_epoch])), 4) for e in range(0, len(durations), per_epoch)]
    row = {"config": name, "batch": cfg.train_batch_size, "accumulation": cfg.gradient_accumulation_steps,
           "cache": cfg.cache_latents, "merged": merged, "images_per_s": round(ips, 2),
           "step_s": round(step_s, 4), "epoch_step_s": epoch_step_s,
           "startup_s": round(h.step_times[0] - start, 2), "setup_s": round(loop_start - start, 2),
           "first_step_s": round(h.step_times[0] - loop_start, 2), "total_s": round(end - start, 2),
           "graphs": graphs,
           "mean_loss": round(sum(h.losses[warmup:]) / steps, 4),  # same seed, same batch structure: same maths?
           "peak_mem_gib": peak_mem and round(peak_mem, 2), "gflop_per_image": flops and round(flops / 1e9, 2),
           "mfu": round(flops * ips / peak_flops, 4) if peak_flops and flops else None}
    if flops is None: row["flop_error"] = flop_error
    return row


def import_seconds() -> float:
    "Seconds a fresh Python takes to import the trainer (torch, diffusers, transformers, peft, accelerate and ours)."
    code = "import time; t = time.perf_counter(); import sd_lora.train; print(time.perf_counter() - t)"
    return round(float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout), 2)


def attribute_costs(cfg: TrainConfig, calls: int=20) -> dict:
    "Host milliseconds per call of the frozen models' `.device` and `.dtype` (diffusers), and of `device_dtype`."
    forget_accelerate_state()  # each configuration has its own precision
    run = setup(cfg)
    def ms(f):
        t = time.perf_counter()
        for _ in range(calls): f()
        return round((time.perf_counter() - t) / calls * 1e3, 4)
    u, v = run.m.unet, run.m.vae
    out = {"unet_modules": sum(1 for _ in u.modules()), "unet.device": ms(lambda: u.device),
           "unet.dtype": ms(lambda: u.dtype), "vae.device": ms(lambda: v.device), "vae.dtype": ms(lambda: v.dtype),
           "device_dtype(unet)": ms(lambda: device_dtype(u)), "device_dtype(vae)": ms(lambda: device_dtype(v))}
    run.accelerator.end_training()
    return out


def memory_breakdown(name: str, cfg: TrainConfig) -> dict:
    """MiB by kind in one micro-step of `cfg` (`step_memory` of bench/memory.py): frozen weights, LoRA,
    gradients, AdamW state and the activations kept for the backward, a lower bound of the peak that
    `torch.cuda.max_memory_allocated` reports on a GPU (buffers that live inside one layer are not counted)."""
    forget_accelerate_state()  # each configuration has its own precision
    run = setup(cfg)
    batch = next(iter(epoch_batches(run, 0)))  # a micro-batch (or a merged one), with its latents as the cache holds them
    mib = step_memory(run, batch)
    run.accelerator.end_training()
    out = {"config": name, "batch": next(v for v in batch.values() if torch.is_tensor(v)).shape[0],  # a small set may cut it short
           "trains": "unet" if cfg.finetune else "lora", "checkpointing": cfg.gradient_checkpointing,
           "weights_dtype": str(device_dtype(run.m.unet)[1]).split(".")[-1], "ema_offloaded": cfg.offload_ema,
           **{f"{k}_mib": round(v, 2) for k, v in mib.items()}}
    # what the accelerator holds: an offloaded EMA lives in the host's memory
    out["total_mib"] = round(sum(v for k, v in mib.items() if not (k == "ema" and cfg.offload_ema)), 2)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="the tiny model at 64 px (CPU smoke test)")
    p.add_argument("--configs", default=None, help=f"comma-separated, from {list(CONFIGS)}; default: all "
                   f"(on a CPU all but {sorted(GPU_ONLY)})")
    p.add_argument("--steps", type=int, default=40, help="timed optimizer steps per configuration")
    p.add_argument("--warmup", type=int, default=10, help="untimed optimizer steps first")
    p.add_argument("--images", type=int, default=192, help="images in the synthetic data set")
    p.add_argument("--resolution", type=int, default=None, help="default: 64 with --tiny, else 512")
    p.add_argument("--mixed_precision", default=None, help="default: bf16 on a GPU, no on the CPU")
    p.add_argument("--peak_tflops", type=float, default=None, help="the device's bf16 peak (default: 790 on CUDA)")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "sd_lora_bench"))
    p.add_argument("--attributes", action="store_true", help="instead of training: the host cost per call of the "
                   "frozen models' .device and .dtype, which a step asks for, against device_dtype")
    p.add_argument("--memory", action="store_true", help="instead of timing: the memory of one micro-step by kind "
                   "(weights, LoRA, gradients, optimizer state, saved activations), counted tensor by tensor")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    quiet()
    cuda = torch.cuda.is_available()
    names = args.configs.split(",") if args.configs else [n for n in CONFIGS if (cuda or n not in GPU_ONLY)
                                                                      and not (args.memory and CONFIGS[n].get("dynamo_backend"))
                                                                      and (args.memory or n not in FINETUNE)]
    if set(names) - set(CONFIGS): p.error(f"unknown --configs {sorted(set(names) - set(CONFIGS))}: choose from {list(CONFIGS)}")
    work = Path(args.workdir); work.mkdir(parents=True, exist_ok=True)
    res = args.resolution or (64 if args.tiny else 512)
    model = TINY_SD if args.tiny else sd15_folder(work)
    data = synthetic_images(work, args.images, res)
    peak = (args.peak_tflops or (790 if cuda else 0)) * 1e12 or None
    device = torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    rows = []
    report = {"device": device, "torch": torch.__version__, "model": "tiny" if args.tiny else "sd15-architecture",
              "resolution": res, "command": "python bench/bench.py " + " ".join(argv if argv is not None else os.sys.argv[1:]),
              "results": rows}
    if not args.memory: report["import_s"] = import_seconds()  # the timings table reports it; the memory table does not
    def save():  # after every configuration: a run stopped by a time limit keeps what it measured
        if args.out: Path(args.out).write_text(json.dumps(report, indent=2))
    for name in names:
        cfg = TrainConfig(pretrained_model_name_or_path=model, train_data_dir=data, output_dir=str(work / "out" / name),
                          resolution=res, random_flip=True, learning_rate=1e-4, lr_scheduler="constant",
                          lr_warmup_steps=0, seed=42, report_to="none", checkpointing_steps=10**9, eval_samples=0,
                          logging_steps=10**9, **{"mixed_precision": args.mixed_precision or ("bf16" if cuda else "no"),
                                                  "dataloader_num_workers": 8 if cuda else 0, **CONFIGS[name]})
        if args.attributes:
            report["attribute_ms"] = attribute_costs(cfg)
            print(json.dumps(report["attribute_ms"]))
            break
        try: row = memory_breakdown(name, cfg) if args.memory else measure(name, cfg, args.warmup, args.steps, peak)
        except Exception as e:  # one failing configuration (no bitsandbytes, a compiler error) must not cost the others
            row = {"config": name, "error": f"{type(e).__name__}: {e}"[:600]}
        rows.append(row)
        print(json.dumps(row), flush=True)
        save()
        gc.collect()
        if cuda: torch.cuda.empty_cache()
    if args.memory:
        print(f"\n{device}, {report['model']} at {res} px, MiB\n| config | batch | frozen | trained | gradients | "
              "optimizer | EMA | activations | total on the device |\n|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['config']} | failed: {r['error'][:120]} |" if "error" in r else
                  f"| {r['config']} | {r['batch']} | {r['frozen_mib']} | {r['lora_mib']} | {r['gradients_mib']} | "
                  f"{r['optimizer_mib']} | {r['ema_mib']}{' (host)' if r['ema_offloaded'] else ''} | "
                  f"{r['activations_mib']} | {r['total_mib']} |")
        return save()
    print(f"\n{device}, {report['model']} at {res} px, the trainer imported in {report['import_s']} s\n| config | batch x accum | merged | images/s | step (s) | step by epoch (s) | setup + first step (s) | total (s) | graphs | peak GiB | GFLOP/image | MFU | mean loss |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r: print(f"| {r['config']} | failed: {r['error'][:120]} | | | | | | | | | | | |")
        else: print(f"| {r['config']} | {r['batch']} x {r['accumulation']} | {r['merged']} | {r['images_per_s']} | {r['step_s']} | {', '.join(map(str, r['epoch_step_s']))} | {r['setup_s']} + {r['first_step_s']} | {r['total_s']} | {r['graphs']} | "
                    f"{r['peak_mem_gib']} | {r['gflop_per_image']} | {r['mfu']} | {r['mean_loss']} |")
    save()

if __name__ == "__main__":
    main()
