"""Beyond one machine: two machines sharing a folder, torchrun's c10d rendezvous, DeepSpeed ZeRO on CPU processes, a
full disk on one process or two, and the launches refused. (nbs/06a_machines runs and asserts the rest: two machines
with folders of their own, resumed on both, refused when they disagree, and a machine killed.)"""
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock
import pytest
import safetensors
import safetensors.torch
import torch
from safetensors.torch import load_file
from sd_lora.checkpoints import CheckpointNotSaved, check_deepspeed_pickles, checkpoints
from sd_lora.launch import launch_train
from sd_lora.machines import machine_command, start_machines, wait_machines
from sd_lora.models import TINY_SD, resolve_model
from sd_lora.train import main, train
from helpers import tiny_config

DEEPSPEED_OPTIONAL = os.environ.get("SD_LORA_REQUIRE_DEEPSPEED") != "1"  # CI installs it and sets this


def flags(data, out, *more):
    "Four optimizer steps of two accumulated micro-batches on a cosine schedule, a checkpoint every two."
    return [f"--pretrained_model_name_or_path={resolve_model(TINY_SD)}", f"--train_data_dir={data}", "--resolution=64",
            "--center_crop", "--train_batch_size=2", "--gradient_accumulation_steps=2", "--max_train_steps=4",
            "--checkpointing_steps=2", "--learning_rate=1e-3", "--lr_scheduler=cosine", "--lr_warmup_steps=1",
            "--seed=0", "--report_to=none", "--eval_samples=0", "--no_merge_accumulation", f"--output_dir={out}", "--cpu", *more]


def launched(commands, logs, env=None):
    "Run one command per machine; every one must succeed."
    codes = wait_machines(start_machines(commands, logs, env))
    assert codes == [0] * len(commands), "\n".join((logs / f"machine-{i}.log").read_text()[-3000:] for i in range(len(codes)))


def max_diff(a, b): return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
def lora(out): return load_file(Path(out) / "pytorch_lora_weights.safetensors")


@pytest.fixture(scope="module")
def one_machine(demo_data, tmp_path_factory):
    "The reference: one machine, two DDP processes."
    out = tmp_path_factory.mktemp("one") / "run"
    launched([machine_command(0, 1, 29651, flags(demo_data, out), processes_per_machine=2)], out.parent / "logs")
    return lora(out)


def test_two_machines_sharing_a_folder_write_one_checkpoint_and_match_one_machine(one_machine, demo_data, tmp_path):
    out = tmp_path / "shared"
    launched([machine_command(r, 2, 29652, flags(demo_data, out)) for r in (0, 1)], tmp_path / "logs")
    assert max_diff(lora(out), one_machine) == 0.0
    names = {p.name for p in (out / "checkpoint-4").iterdir()}
    assert {"pytorch_lora_weights.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl",
            "random_states_1.pkl", "generator-0.safetensors", "generator-1.safetensors"} <= names
    assert not list(out.glob(".tmp-checkpoint-*")) and not list(out.glob(".sd_lora-*"))


def test_torchrun_c10d_two_nodes_match_one_machine(one_machine, demo_data, tmp_path):
    out = tmp_path / "c10d"
    cmd = ["torchrun", "--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint",
           "127.0.0.1:29653", "--rdzv_id", "sd_lora_test", "-m", "sd_lora.train", *flags(demo_data, out)]
    launched([cmd, cmd], tmp_path / "logs", env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert max_diff(lora(out), one_machine) == 0.0


def refused(cmd, env=None):
    "A command that must end with status 1 and our one-line refusal, no traceback through sd_lora's code."
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 1, r.stderr[-3000:]
    assert not re.search(r'File ".*/sd_lora/\w+\.py"', r.stderr), r.stderr[-3000:]  # accelerate launch adds its own
    return r.stderr


def test_a_cpu_launch_of_several_machines_is_refused(demo_data, tmp_path):
    "accelerate launch --cpu starts each machine alone: refused with the launch that works."
    cmd = ["accelerate", "launch", "--cpu", "--num_machines", "2", "--machine_rank", "0", "--main_process_ip",
           "127.0.0.1", "--main_process_port", "29654", "--num_processes", "2", "-m", "sd_lora.train",
           *flags(demo_data, tmp_path / "alone")]
    assert "--multi_gpu --num_machines N --machine_rank R" in refused(cmd)


def test_fsdp2_shards_a_lora_unet_with_half_precision_frozen_weights(tmp_path):
    """What the FSDP refusal on GPUs rests on, checked on CPU processes with torch's `fully_shard` (accelerate runs no
    FSDP on CPUs): the mixed dtypes of a LoRA run are not the obstacle."""
    r = subprocess.run(["torchrun", "--nproc_per_node", "2", "--master_port", "29671", str(Path(__file__).with_name("fsdp2_lora_step.py"))],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "FSDP2 against unsharded" in r.stdout


def test_fsdp_on_cpu_is_refused_instead_of_running_ddp(demo_data, tmp_path):
    err = refused([sys.executable, "-m", "sd_lora.train", *flags(demo_data, tmp_path / "fsdp")],
                  env={**os.environ, "ACCELERATE_USE_FSDP": "true"})
    assert "FSDP needs GPUs" in err and "--use_deepspeed" in err


def test_an_unwritable_output_dir_is_one_line(demo_data, tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    err = refused([sys.executable, "-m", "sd_lora.train", *flags(demo_data, tmp_path / "a_file" / "run")])
    assert err.strip().splitlines()[-1].startswith("sd_lora: error: output_dir")


def full_disk_from(n: int):
    "Make diffusers' LoRA writes fail as a full disk does, from the `n`th on."
    calls, real = {"n": 0}, safetensors.torch.save_file
    def save_file(*args, **kw):
        calls["n"] += 1
        if calls["n"] >= n:
            raise safetensors.SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                                              "message: \"No space left on device\" })")
        return real(*args, **kw)
    return mock.patch("safetensors.torch.save_file", save_file)


def test_a_full_disk_while_checkpointing_keeps_the_last_checkpoint_and_resumes(demo_data, tmp_path, capsys):
    out = tmp_path / "full"
    argv = flags(demo_data, out, "--checkpointing_steps=1", "--checkpoints_total_limit=1")
    with full_disk_from(3), pytest.raises(SystemExit) as e: main(argv)
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "checkpoint-3 could not be saved" in err and "the disk is full" in err and "checkpoint-2 is intact" in err
    assert "--resume_from_checkpoint latest" in err
    assert [p.name for p in checkpoints(out)] == ["checkpoint-2"]  # the limit is kept only once a new one is whole
    assert not list(out.glob(".tmp-*"))
    main(argv + ["--resume_from_checkpoint=latest"])  # after space is freed
    straight = tmp_path / "straight"
    main(flags(demo_data, straight, "--checkpointing_steps=1"))
    assert max_diff(lora(out), lora(straight)) == 0.0


def _fail_on_rank_1(cfg):
    "Each process trains; on rank 1 the disk fills at its third LoRA write (rank 0 writes the LoRA: rank 1's generator)."
    from sd_lora import checkpoints as ck
    rank = int(os.environ.get("RANK", "0"))
    calls, real = {"n": 0}, ck.save_file
    def save_file(*args, **kw):
        calls["n"] += 1
        if rank == 1 and calls["n"] >= 3: raise OSError(28, "No space left on device")
        return real(*args, **kw)
    with mock.patch.object(ck, "save_file", save_file):
        try: train(cfg)
        except CheckpointNotSaved as e: Path(cfg.output_dir, f"refused-{rank}.txt").write_text(str(e))


def test_a_full_disk_on_one_process_stops_both_without_a_half_checkpoint(demo_data, tmp_path):
    cfg = tiny_config(demo_data, tmp_path / "two", cpu=True, checkpointing_steps=1, max_train_steps=4, eval_samples=0)
    launch_train(cfg, num_processes=2, use_port="29655", fn=_fail_on_rank_1)
    out = Path(cfg.output_dir)
    assert [p.name for p in checkpoints(out)] == ["checkpoint-1", "checkpoint-2"] and not list(out.glob(".tmp-*"))
    mine, theirs = (out / "refused-1.txt").read_text(), (out / "refused-0.txt").read_text()
    assert "the disk is full" in mine and "another process could not write its part" in theirs
    assert "checkpoint-2 is intact" in mine and "checkpoint-2 is intact" in theirs


# DeepSpeed on CPU processes: installed by CI (DS_ACCELERATOR=cpu DS_BUILD_OPS=0 pip install --no-build-isolation deepspeed)
deepspeed_cpu = pytest.mark.skipif(DEEPSPEED_OPTIONAL and not shutil.which("ds_report"), reason="DeepSpeed is not installed")
ZERO2 = ["--use_deepspeed", "--zero_stage", "2"]


@deepspeed_cpu
def test_deepspeed_zero2_lora_equals_ddp_and_resumes_exactly(one_machine, demo_data, tmp_path):
    out = tmp_path / "zero2"
    launched([machine_command(0, 1, 29656, flags(demo_data, out), processes_per_machine=2, launch=ZERO2)], tmp_path / "logs")
    assert max_diff(lora(out), one_machine) < 1e-6
    states = torch.load(out / "checkpoint-4" / "pytorch_model" / "mp_rank_00_model_states.pt", weights_only=False)
    assert states["module"] and all("lora" in k for k in states["module"])  # the frozen weights stay out
    check_deepspeed_pickles(out / "checkpoint-4")  # what DeepSpeed writes passes the guard
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "checkpoint-4")
    launched([machine_command(0, 1, 29657, flags(demo_data, resumed, "--resume_from_checkpoint=latest"),
                              processes_per_machine=2, launch=ZERO2)], tmp_path / "logs2")
    assert max_diff(lora(resumed), lora(out)) == 0.0
    # a tampered DeepSpeed file (DeepSpeed itself would unpickle it with weights_only=False): resuming refuses it
    torch.save({"boom": os.system}, resumed / "checkpoint-2" / "pytorch_model" / "mp_rank_00_model_states.pt")
    with pytest.raises(pickle.UnpicklingError): check_deepspeed_pickles(resumed / "checkpoint-2")
    cmd = machine_command(0, 1, 29661, flags(demo_data, resumed, "--resume_from_checkpoint=checkpoint-2"),
                          processes_per_machine=2, launch=ZERO2)
    codes = wait_machines(start_machines([cmd], tmp_path / "logs3"))
    log = (tmp_path / "logs3" / "machine-0.log").read_text()
    assert codes == [1] and "holds objects other than tensors" in log, log[-3000:]


@deepspeed_cpu
def test_deepspeed_zero2_full_finetune_resumes_exactly(demo_data, tmp_path):
    def unet(out): return load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    out = tmp_path / "ft"
    launched([machine_command(0, 1, 29658, flags(demo_data, out), "sd_lora.finetune", 2, launch=ZERO2)], tmp_path / "logs")
    resumed = tmp_path / "ft-resumed"
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "checkpoint-4")
    launched([machine_command(0, 1, 29659, flags(demo_data, resumed, "--resume_from_checkpoint=latest"),
                              "sd_lora.finetune", 2, launch=ZERO2)], tmp_path / "logs2")
    assert max_diff(unet(resumed), unet(out)) == 0.0
