"notebook_launcher with two CPU processes: real DDP, identical weights, files written by rank 0 only."
import os
from pathlib import Path
import torch
from sd_lora.launch import launch_train
from helpers import tiny_config


def _train_and_record(cfg):
    "Each rank trains and records which of our writers it called."
    import sd_lora.train as train_mod, sd_lora.checkpoints as ckpt_mod, sd_lora.validation as val_mod
    rank, out = int(os.environ["RANK"]), Path(cfg.output_dir)
    def recording(name, fn):
        def wrapper(*a, **k):
            (out / f"wrote-{name}-rank{rank}").touch()
            return fn(*a, **k)
        return wrapper
    train_mod.save_outputs = recording("outputs", train_mod.save_outputs)
    ckpt_mod.save_lora = recording("checkpoint_lora", ckpt_mod.save_lora)
    val_mod.log_validation = recording("validation", val_mod.log_validation)
    res = train_mod.train(cfg)
    torch.save(res.lora, out / f"lora-rank{rank}.pt")


def test_two_processes_stay_in_sync_and_only_rank0_writes(demo_data, tmp_path):
    cfg = tiny_config(demo_data, tmp_path, cpu=True, max_train_steps=3, checkpointing_steps=2,
                      validation_prompt="a cat", validation_steps=3, num_validation_images=1)
    launch_train(cfg, num_processes=2, use_port="29581", fn=_train_and_record)
    a, b = torch.load(tmp_path / "lora-rank0.pt"), torch.load(tmp_path / "lora-rank1.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    written = sorted(p.name for p in tmp_path.glob("wrote-*"))
    assert written == ["wrote-checkpoint_lora-rank0", "wrote-outputs-rank0", "wrote-validation-rank0"]
    assert (tmp_path / "checkpoint-2" / "pytorch_lora_weights.safetensors").exists()


def _fail_on_rank1(cfg):
    "Rank 1 raises at its third step; rank 0 would otherwise wait for it in the next all-reduce."
    import sd_lora.train as train_mod
    if int(os.environ["RANK"]) == 1:
        step = train_mod.train_step
        def failing(run, batch):
            if run.global_step == 2: raise RuntimeError("injected failure on rank 1")
            return step(run, batch)
        train_mod.train_step = failing
    train_mod.train(cfg)


def test_an_exception_on_one_rank_ends_all_ranks_promptly(demo_data, tmp_path, capfd, caplog):
    import time
    import pytest
    start = time.time()
    with pytest.raises(Exception) as excinfo:
        launch_train(tiny_config(demo_data, tmp_path, cpu=True, max_train_steps=50), num_processes=2,
                     use_port="29583", fn=_fail_on_rank1)
    assert time.time() - start < 120
    captured = capfd.readouterr()
    shown = captured.out + captured.err + caplog.text + str(excinfo.value)
    assert "[rank 1] RuntimeError: injected failure on rank 1" in shown  # whichever rank the launcher re-raises
    assert not (tmp_path / "pytorch_lora_weights.safetensors").exists()
