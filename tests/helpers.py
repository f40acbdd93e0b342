"Shared fixtures' building blocks for the tests."
import json
from pathlib import Path
from sd_lora.config import TrainConfig


def tiny_config(data_dir, output_dir, **kw) -> TrainConfig:
    "A fast run on the tiny model and the demo data."
    base = dict(train_data_dir=str(data_dir), output_dir=str(output_dir), resolution=64, center_crop=True, train_batch_size=2,
                max_train_steps=4, learning_rate=1e-3, lr_warmup_steps=0, seed=0, report_to="none",
                checkpointing_steps=1000, eval_samples=4)
    return TrainConfig(**{**base, **kw})


def full_and_resumed(data_dir, tmp_path, step: int, **kw):
    "An uninterrupted run, and one resumed in another folder from the first's checkpoint at `step`: (full, resumed)."
    from sd_lora.train import train
    full = train(tiny_config(data_dir, tmp_path / "full", **kw))
    (tmp_path / "resumed").mkdir()
    (tmp_path / "full" / f"checkpoint-{step}").rename(tmp_path / "resumed" / f"checkpoint-{step}")
    resumed = train(tiny_config(data_dir, tmp_path / "resumed", resume_from_checkpoint="latest", **kw))
    return full, resumed


def read_json(path):
    return json.loads(Path(path).read_text())
