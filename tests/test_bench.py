"The benchmark harness runs (a smoke test on the tiny model; no time is asserted)."
import importlib.util
import json
import os
import subprocess
import sys

import pytest


def test_bench_smoke(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "bench/bench.py", "--tiny", "--steps", "2", "--warmup", "1", "--images", "8",
                        "--configs", "documented-plain,documented,documented-merged,b8-checkpointing", "--workdir", str(tmp_path),
                        "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [row["config"] for row in report["results"]] == ["documented-plain", "documented", "documented-merged", "b8-checkpointing"]
    for row in report["results"]:
        assert row["images_per_s"] > 0 and row["gflop_per_image"] > 0
    assert "| documented-merged | 1 x 4 | True |" in r.stdout and "| documented-plain | 1 x 4 | False |" in r.stdout
    assert all(row["total_s"] >= row["startup_s"] > 0 for row in report["results"])
    assert report["import_s"] > 0 and f"the trainer imported in {report['import_s']} s" in r.stdout
    for row in report["results"]:  # the time to the first step, split into setup and the first step itself
        assert abs(row["setup_s"] + row["first_step_s"] - row["startup_s"]) <= 0.02
        assert len(row["epoch_step_s"]) >= 1 and all(s > 0 for s in row["epoch_step_s"])


def test_bench_attributes_mode_reports_the_per_call_costs(tmp_path):
    out = tmp_path / "attributes.json"
    r = subprocess.run([sys.executable, "bench/bench.py", "--tiny", "--attributes", "--images", "8", "--workdir",
                        str(tmp_path), "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["results"] == []  # no training in this mode
    costs = report["attribute_ms"]
    assert set(costs) == {"unet_modules", "unet.device", "unet.dtype", "vae.device", "vae.dtype", "device_dtype(unet)",
                          "device_dtype(vae)"}
    assert costs["unet_modules"] > 100 and all(v > 0 for v in costs.values())


def test_a_failing_configuration_is_recorded_and_the_others_still_run(tmp_path):
    "One configuration that cannot run (here 8-bit Adam without bitsandbytes) must not cost a GPU session the rest."
    if importlib.util.find_spec("bitsandbytes"): pytest.skip("bitsandbytes is installed: 8-bit Adam would run")
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "bench/bench.py", "--tiny", "--steps", "1", "--warmup", "1", "--images", "8",
                        "--configs", "b8-8bit-adam,documented", "--workdir", str(tmp_path), "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    failed, measured = json.loads(out.read_text())["results"]
    assert failed["config"] == "b8-8bit-adam" and "bitsandbytes" in failed["error"]
    assert measured["config"] == "documented" and measured["images_per_s"] > 0


def test_the_gpu_check_rehearses_on_the_cpu(tmp_path):
    "bench/gpu_check.sh, the script a GPU session runs on the device, works end to end on the tiny model."
    env = {**os.environ, "OUT": str(tmp_path), "SD_LORA_GPU_CHECK_TINY": "1",
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    r = subprocess.run(["bash", "bench/gpu_check.sh"], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "diffusers" in (tmp_path / "versions.txt").read_text()
    rows = json.loads((tmp_path / "h200.json").read_text())["results"]
    assert [row["config"] for row in rows] == ["documented", "documented-merged", "b8"]
    assert all(row["images_per_s"] > 0 for row in rows)


def test_memory_mode_breaks_a_step_down_by_kind(tmp_path):
    "--memory counts one micro-step's tensors by kind: what batch size, checkpointing and the optimizer each cost."
    out = tmp_path / "memory.json"
    r = subprocess.run([sys.executable, "bench/bench.py", "--tiny", "--memory", "--images", "8", "--configs",
                        "documented-accumulated,b8,b8-checkpointing", "--workdir", str(tmp_path), "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    one, eight, ckpt = json.loads(out.read_text())["results"]
    assert (one["batch"], eight["batch"], ckpt["batch"]) == (1, 8, 8)
    assert one["frozen_mib"] == eight["frozen_mib"] == ckpt["frozen_mib"] > 0
    assert one["gradients_mib"] == one["lora_mib"] > 0  # one fp32 gradient per fp32 LoRA weight
    assert one["optimizer_mib"] == pytest.approx(2 * one["lora_mib"], rel=0.05)  # AdamW's two moments
    assert eight["activations_mib"] == pytest.approx(8 * one["activations_mib"], rel=0.1)  # they grow with the batch
    assert ckpt["activations_mib"] < eight["activations_mib"] / 2  # checkpointing keeps only the blocks' inputs
    assert "| b8-checkpointing | 8 |" in r.stdout


def test_memory_mode_counts_a_full_fine_tune_and_its_ema(tmp_path):
    "The whole UNet trains: its weights, gradients, AdamW's two moments and the EMA's copy, each counted once."
    out = tmp_path / "memory.json"
    r = subprocess.run([sys.executable, "bench/bench.py", "--tiny", "--memory", "--images", "8", "--configs",
                        "documented,finetune-documented,finetune-ema,finetune-ema-offloaded", "--workdir", str(tmp_path),
                        "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    lora, full, ema, offloaded = json.loads(out.read_text())["results"]
    assert full["trains"] == "unet" and full["lora_mib"] > 50 * lora["lora_mib"]
    assert full["frozen_mib"] < lora["frozen_mib"]  # the UNet moved from frozen to trained
    assert full["gradients_mib"] == full["lora_mib"] and full["ema_mib"] == 0
    assert full["optimizer_mib"] == pytest.approx(2 * full["lora_mib"], rel=0.01)
    assert ema["ema_mib"] == ema["lora_mib"] and ema["total_mib"] == pytest.approx(offloaded["total_mib"] + ema["ema_mib"])
    assert "(host)" in r.stdout


def test_a_compiled_configuration_really_compiles(tmp_path):
    """Each row counts the graphs torch.compile made. FLOPs are counted after the timed steps: a compiled module first
    called under FlopCounterMode stays eager for good, which once made every compiled row an eager one."""
    spec = importlib.util.spec_from_file_location("bench", "bench/bench.py")
    bench = importlib.util.module_from_spec(spec); spec.loader.exec_module(bench)
    data = bench.synthetic_images(tmp_path, 8, 64)
    base = dict(pretrained_model_name_or_path=bench.TINY_SD, train_data_dir=data, resolution=64, train_batch_size=4,
                report_to="none", checkpointing_steps=10**9, eval_samples=0, logging_steps=10**9, seed=0)
    eager = bench.measure("eager", bench.TrainConfig(output_dir=str(tmp_path / "a"), **base), 1, 1, None)
    compiled = bench.measure("compiled", bench.TrainConfig(output_dir=str(tmp_path / "b"), dynamo_backend="aot_eager", **base),
                             1, 1, None)
    assert eager["graphs"] == 0 and compiled["graphs"] > 0
    assert compiled["gflop_per_image"] == eager["gflop_per_image"] > 0
    assert compiled["mean_loss"] == pytest.approx(eager["mean_loss"], rel=1e-5)
