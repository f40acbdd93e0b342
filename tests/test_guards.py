"Faults injected into runs: interruptions, NaN gradients, unwritable or full output folders, a missing model."
import json
import shutil
import signal
import sys
from types import SimpleNamespace
import pytest
import torch
from safetensors.torch import load_file
from accelerate.utils import load as accelerate_load
from sd_lora.run import setup
from sd_lora.train import train, train_loop
from sd_lora.checkpoints import checkpoints
from faults import poison_gradients, interrupt_at_checkpoint
from helpers import tiny_config


def test_nan_gradient_step_is_skipped_and_counted(demo_data, tmp_path):
    run = setup(tiny_config(demo_data, tmp_path, max_train_steps=4, logging_steps=1))
    before = {n: p.detach().clone() for n, p in zip(range(len(run.params)), run.params)}
    handle = poison_gradients(run.params, steps={1})
    h = train_loop(run)
    handle.remove()
    run.accelerator.end_training()
    assert h.skipped_steps == 1 and len(h.losses) == 4
    assert all(torch.isfinite(p).all() for p in run.params)
    assert any(not torch.equal(before[i], p.detach()) for i, p in enumerate(run.params))


def test_repeated_nan_stops_with_advice_and_saves_nothing(demo_data, tmp_path):
    run = setup(tiny_config(demo_data, tmp_path, max_train_steps=20, logging_steps=1, max_bad_steps=3))
    poison_gradients(run.params, steps=set(range(1, 100)))
    with pytest.raises(FloatingPointError, match="bf16"):
        train_loop(run)
    run.accelerator.end_training()
    assert not (tmp_path / "pytorch_lora_weights.safetensors").exists()
    assert all(torch.isfinite(p).all() for p in run.params)


def test_sigint_saves_a_checkpoint_that_resumes_to_the_uninterrupted_weights(demo_data, tmp_path):
    out = tmp_path / "interrupted"
    flags = [f"--train_data_dir={demo_data}", "--resolution=64", "--center_crop", "--train_batch_size=2",
             "--learning_rate=1e-3", "--lr_warmup_steps=0", "--seed=0", "--report_to=none", "--eval_samples=0",
             "--checkpointing_steps=2"]
    code, err = interrupt_at_checkpoint([sys.executable, "-m", "sd_lora.train", *flags, f"--output_dir={out}",
                                         "--max_train_steps=100000"], out, "checkpoint-2")
    assert code == 128 + signal.SIGINT, err[-2000:]
    assert "resume_from_checkpoint latest" in err
    step = int(checkpoints(out)[-1].name.split("-")[1])
    assert step >= 2 and not list(out.glob(".tmp-checkpoint-*"))
    # resuming to step + 2 gives exactly the LoRA of a run that was never interrupted
    cfg = dict(center_crop=True, train_batch_size=2, eval_samples=0, checkpointing_steps=2, max_train_steps=step + 2)
    resumed = train(tiny_config(demo_data, out, resume_from_checkpoint="latest", **cfg))
    straight = train(tiny_config(demo_data, tmp_path / "straight", **cfg))
    assert all(torch.allclose(resumed.lora[k], straight.lora[k], atol=1e-6) for k in straight.lora)


def test_sigterm_stops_cleanly_too(demo_data, tmp_path):
    out = tmp_path / "run"
    code, err = interrupt_at_checkpoint(
        [sys.executable, "-m", "sd_lora.train", f"--train_data_dir={demo_data}", "--resolution=64", "--center_crop",
         "--train_batch_size=2", "--report_to=none", "--eval_samples=0", "--checkpointing_steps=1",
         f"--output_dir={out}", "--max_train_steps=100000"], out, "checkpoint-1", sig=signal.SIGTERM)
    assert code == 128 + signal.SIGTERM and "SIGTERM" in err


def test_unwritable_output_dir_fails_before_loading(demo_data, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(PermissionError, match="a_file"):
        setup(tiny_config(demo_data, blocker / "out"))


def test_full_disk_fails_before_training(demo_data, tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda p: SimpleNamespace(total=10**9, used=10**9, free=10**6))
    with pytest.raises(OSError, match="GiB free"):
        setup(tiny_config(demo_data, tmp_path / "out"))


def test_missing_model_folder_fails_before_training(demo_data, tmp_path):
    with pytest.raises(FileNotFoundError, match="/no/such/model"):
        setup(tiny_config(demo_data, tmp_path, pretrained_model_name_or_path="/no/such/model"))


def test_sigkill_during_checkpointing_never_leaves_a_half_checkpoint_for_latest(demo_data, tmp_path):
    "Kill -9 while checkpoints are written every step: whatever `latest` picks is complete and resumes."
    from sd_lora.checkpoints import find_checkpoint
    out = tmp_path / "run"
    code, _ = interrupt_at_checkpoint(
        [sys.executable, "-m", "sd_lora.train", f"--train_data_dir={demo_data}", "--resolution=64", "--center_crop",
         "--train_batch_size=2", "--report_to=none", "--eval_samples=0", "--checkpointing_steps=1",
         f"--output_dir={out}", "--max_train_steps=100000"], out, "checkpoint-3", sig=signal.SIGKILL)
    assert code == -signal.SIGKILL
    latest = find_checkpoint(out, "latest")
    for name in ("pytorch_lora_weights.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl"):
        assert (latest / name).exists(), name
    step = int(latest.name.split("-")[1])
    res = train(tiny_config(demo_data, out, resume_from_checkpoint="latest", eval_samples=0, max_train_steps=step + 1))
    assert res.global_step == step + 1


class _Payload:
    "A pickle that runs code when loaded: it would create `marker`."
    def __init__(self, marker): self.marker = marker
    def __reduce__(self): return (open, (str(self.marker), "w"))


def test_checkpoints_hold_no_pickled_code_and_a_tampered_one_is_refused(demo_data, tmp_path):
    out = tmp_path / "out"
    train(tiny_config(demo_data, out, max_train_steps=2, checkpointing_steps=2))
    ckpt = checkpoints(out)[-1]
    for f in ckpt.iterdir():  # weights and the generator in safetensors; the rest loads without running code
        if f.suffix == ".safetensors": load_file(f)
        elif f.suffix == ".json": json.loads(f.read_text())  # how the run batched (sd_lora_batching.json)
        else: accelerate_load(f)  # torch.load(weights_only=True), numpy arrays allowed
    assert (ckpt / "generator-0.safetensors").exists()
    marker = tmp_path / "pwned"
    torch.save({"state": _Payload(marker)}, ckpt / "optimizer.bin")
    with pytest.raises(ValueError, match="holds objects other than tensors.*refuses"):
        train(tiny_config(demo_data, out, max_train_steps=3, checkpointing_steps=2, resume_from_checkpoint="latest"))
    assert not marker.exists()
    assert (out / "pytorch_lora_weights.safetensors").exists() and ckpt.exists()  # nothing saved was lost
