"""DeepSpeed ZeRO-1 and ZeRO-2 against DDP on two CPU processes: the same LoRA (and full fine-tune), exact resume.

Run from the repository root (needs DeepSpeed: DS_ACCELERATOR=cpu DS_BUILD_OPS=0 pip install --no-build-isolation deepspeed):
    python bench/deepspeed_cpu.py --out bench/results/deepspeed-cpu.json
"""
import argparse, json, platform, shutil, tempfile, time
from pathlib import Path
import torch
from safetensors.torch import load_file
from sd_lora.data import make_demo_data
from sd_lora.machines import machine_command, start_machines, wait_machines
from sd_lora.models import TINY_SD, resolve_model


def flags(data, out, *more):
    return [f"--pretrained_model_name_or_path={resolve_model(TINY_SD)}", f"--train_data_dir={data}", "--resolution=64",
            "--center_crop", "--train_batch_size=2", "--gradient_accumulation_steps=2", "--max_train_steps=4",
            "--checkpointing_steps=2", "--learning_rate=1e-3", "--lr_scheduler=cosine", "--lr_warmup_steps=1",
            "--seed=0", "--report_to=none", "--eval_samples=0", "--no_merge_accumulation", f"--output_dir={out}", "--cpu", *more]


def trained(out, module):
    return load_file(out / ("unet/diffusion_pytorch_model.safetensors" if module == "sd_lora.finetune"
                            else "pytorch_lora_weights.safetensors"))


def max_diff(a, b): return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/results/deepspeed-cpu.json")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sd_lora-ds-"))
    data, port, runs = make_demo_data(work / "data"), 29700, []
    def launch(name, module, launch_flags, *more, out=None):
        nonlocal port
        port += 1
        out = out or work / name.replace(" ", "_").replace(",", "")
        start = time.time()
        procs = start_machines([machine_command(0, 1, port, flags(data, out, *more), module, 2, launch=launch_flags)],
                               work / f"logs-{port}")
        if wait_machines(procs) != [0]: raise SystemExit((work / f"logs-{port}" / "machine-0.log").read_text()[-4000:])
        return out, time.time() - start
    for module in ("sd_lora.train", "sd_lora.finetune"):
        what = "LoRA" if module == "sd_lora.train" else "full fine-tune"
        ddp_out, secs = launch(f"{what} DDP", module, [])
        ddp = trained(ddp_out, module)
        runs.append({"run": f"{what}: DDP", "max_diff_vs_ddp": 0.0, "seconds": round(secs, 1)})
        for stage in (1, 2):
            out, secs = launch(f"{what} ZeRO-{stage}", module, ["--use_deepspeed", "--zero_stage", str(stage)])
            runs.append({"run": f"{what}: ZeRO-{stage}", "max_diff_vs_ddp": max_diff(trained(out, module), ddp),
                         "seconds": round(secs, 1)})
        resumed = work / f"{what} resumed"
        shutil.copytree(out, resumed)
        shutil.rmtree(resumed / "checkpoint-4")
        _, secs = launch("", module, ["--use_deepspeed", "--zero_stage", "2"], "--resume_from_checkpoint=latest", out=resumed)
        runs.append({"run": f"{what}: ZeRO-2, resumed from checkpoint-2", "max_diff_vs_ddp": max_diff(trained(resumed, module), ddp),
                     "max_diff_vs_uninterrupted": max_diff(trained(resumed, module), trained(out, module)),
                     "seconds": round(secs, 1)})
    import deepspeed, accelerate
    record = {"command": "python bench/deepspeed_cpu.py --out " + args.out, "machine": platform.processor() or platform.machine(),
              "versions": {"torch": torch.__version__, "accelerate": accelerate.__version__, "deepspeed": deepspeed.__version__},
              "setup": "tiny SD1.x, 64 px, 2 CPU processes, batch 2 x accumulation 2, 4 steps, cosine, checkpoint every 2",
              "runs": runs}
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    for r in runs: print(r)


if __name__ == "__main__":
    main()
