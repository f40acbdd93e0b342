"""Prior preservation: class images drawn by the base model (DreamBooth's flags) or given as kohya's --reg_data_dir
train beside the data on the tiny SD1.x and SDXL, resume exactly, weigh as asked, and bad settings stop before step 1."""
import json
import re
import shutil
import subprocess
import sys
import pytest
import torch
import sd_lora.train as T
from sd_lora.models import TINY_SDXL
from sd_lora.prior import class_images
from sd_lora.train import train
from helpers import tiny_config, full_and_resumed


def dreambooth(tmp_path, **kw):
    "The DreamBooth flags, with the class folder in `tmp_path`."
    return {"with_prior_preservation": True, "class_data_dir": str(tmp_path / "class"), "class_prompt": "a photo",
            "num_class_images": 4, "sample_batch_size": 3, **kw}


@pytest.fixture(scope="module")
def reg_data(demo_data, tmp_path_factory):
    "Regularisation images with captions of their own (kohya's --reg_data_dir): the demo photos, recaptioned."
    folder = tmp_path_factory.mktemp("reg")
    rows = [json.loads(line) for line in (demo_data / "metadata.jsonl").read_text().splitlines()][:5]
    for row in rows:
        shutil.copy(demo_data / row["file_name"], folder / row["file_name"])
        row["text"] = "a photo"
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def spy_batches(monkeypatch):
    "The batches the loop hands to `training_loss`."
    seen, original = [], T.training_loss
    def spy(batch, *a, **kw):
        seen.append(batch)
        return original(batch, *a, **kw)
    monkeypatch.setattr(T, "training_loss", spy)
    return seen


@pytest.mark.parametrize("model", [None, TINY_SDXL], ids=["sd1", "sdxl"])
def test_class_images_are_drawn_then_trained_beside_the_data_and_the_run_resumes_exactly(demo_data, tmp_path, model):
    kw = dreambooth(tmp_path, max_train_steps=6, checkpointing_steps=3, random_flip=True,
                    **({"pretrained_model_name_or_path": model} if model else {}))
    full, resumed = full_and_resumed(demo_data, tmp_path, 3, **kw)
    assert [p.name for p in class_images(tmp_path / "class")] == [f"class-{k:05d}.png" for k in range(4)]
    assert (tmp_path / "resumed" / "checkpoint-3" / "prior-generator-0.safetensors").exists()
    assert resumed.history.losses == pytest.approx(full.history.losses[3:], abs=1e-6)
    assert all(torch.allclose(full.lora[k], resumed.lora[k], atol=1e-7) for k in full.lora)


def test_drawing_goes_on_where_it_stopped_and_gives_the_same_images(demo_data, tmp_path):
    from PIL import Image
    import numpy as np
    from sd_lora.models import load_pipeline
    from sd_lora.prior import draw_class_images, ensure_class_images
    pipe = load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    once = draw_class_images(pipe, tmp_path / "once", "a photo", 0, 5, batch_size=5)
    draw_class_images(pipe, tmp_path / "class", "a photo", 0, 2)  # a run stopped after two
    (tmp_path / "class" / ".class-00002.png.tmp").write_bytes(b"half")  # and one file half-written
    cfg = tiny_config(demo_data, tmp_path / "out", **dreambooth(tmp_path, num_class_images=5))
    assert ensure_class_images(cfg, torch.device("cpu")) == 3
    assert ensure_class_images(cfg, torch.device("cpu")) == 0
    pixels = lambda ps: np.stack([np.asarray(Image.open(p), dtype=np.int16) for p in ps])
    assert np.abs(pixels(class_images(tmp_path / "class")) - pixels(once)).max() <= 1


def test_prior_loss_weight_zero_trains_as_without_class_images(demo_data, tmp_path):
    alone = train(tiny_config(demo_data, tmp_path / "alone", max_train_steps=4))
    zero = train(tiny_config(demo_data, tmp_path / "zero", **dreambooth(tmp_path, prior_loss_weight=0.0, max_train_steps=4)))
    one = train(tiny_config(demo_data, tmp_path / "one", **dreambooth(tmp_path, max_train_steps=4)))
    assert zero.history.losses == pytest.approx(alone.history.losses, rel=1e-5)
    assert all(torch.allclose(zero.lora[k], alone.lora[k], atol=1e-6) for k in alone.lora)
    assert one.history.losses[0] != pytest.approx(alone.history.losses[0], rel=1e-3)  # weight 1 adds the class loss
    assert any(not torch.allclose(one.lora[k], alone.lora[k], atol=1e-6) for k in alone.lora)


def test_reg_data_dir_pairs_each_item_with_a_captioned_class_image_and_walks_them_all(demo_data, reg_data, tmp_path, monkeypatch):
    seen = spy_batches(monkeypatch)
    train(tiny_config(demo_data, tmp_path, reg_data_dir=str(reg_data), max_train_steps=6, train_batch_size=4,
                      caption_prefix="sks"))
    assert all(b["prior"]["captions"] == ["a photo"] * 4 for b in seen)  # no trigger word on the class images
    assert all(c.startswith("sks ") for b in seen for c in b["captions"])
    assert sorted({int(i) for b in seen for i in b["prior"]["indices"]}) == list(range(5))  # every class image is seen


def test_reg_data_dir_trains_on_sdxl_with_the_disk_cache_and_merged_accumulation(demo_data, reg_data, tmp_path, monkeypatch):
    seen = spy_batches(monkeypatch)
    res = train(tiny_config(demo_data, tmp_path, pretrained_model_name_or_path=TINY_SDXL, reg_data_dir=str(reg_data),
                            cache_latents="disk", gradient_accumulation_steps=2, merge_accumulation=True, max_train_steps=2))
    assert len(seen) == 2 and all(len(b["prior"]["latent_mean"]) == 4 for b in seen)  # 2 x 2 merged, cached
    assert torch.isfinite(torch.tensor(res.history.losses)).all()


@pytest.mark.parametrize("bad, error, message", [
    (dict(with_prior_preservation=True, class_data_dir="CLS"), ValueError, "--class_prompt"),
    (dict(with_prior_preservation=True, class_prompt="a dog"), ValueError, "--class_data_dir"),
    (dict(reg_data_dir="missing-folder"), FileNotFoundError, "is not a folder"),
    (dict(reg_data_dir="REG", prior_loss_weight=-1.0), ValueError, "--prior_loss_weight -1.0"),
    (dict(reg_data_dir="REG", aspect_ratio_buckets=True), ValueError, "square crops"),
    (dict(reg_data_dir="REG", with_prior_preservation=True, class_data_dir="CLS", class_prompt="p"), ValueError, "choose one"),
    (dict(with_prior_preservation=True, class_data_dir="CLS", class_prompt="p", num_class_images=0), ValueError, "--num_class_images 0"),
], ids=["no-prompt", "no-folder", "missing-reg", "negative-weight", "buckets", "both", "no-images"])
def test_a_bad_prior_setting_is_refused_before_the_first_step(demo_data, reg_data, tmp_path, monkeypatch, bad, error, message):
    seen = spy_batches(monkeypatch)
    bad = {k: {"REG": str(reg_data), "CLS": str(tmp_path / "c")}.get(v, v) if isinstance(v, str) else v for k, v in bad.items()}
    with pytest.raises(error, match=re.escape(message)):
        train(tiny_config(demo_data, tmp_path / "out", **bad))
    assert seen == [] and not (tmp_path / "c").exists()


def test_a_reg_folder_without_captions_needs_a_class_prompt(demo_data, tmp_path, monkeypatch):
    folder = tmp_path / "plain"
    folder.mkdir()
    for f in sorted(demo_data.glob("*.jpg"))[:2]: shutil.copy(f, folder / f.name)
    seen = spy_batches(monkeypatch)
    with pytest.raises(ValueError, match="give --class_prompt"):
        train(tiny_config(demo_data, tmp_path / "out", reg_data_dir=str(folder)))
    train(tiny_config(demo_data, tmp_path / "out2", reg_data_dir=str(folder), class_prompt="a photo", max_train_steps=1))
    assert seen[0]["prior"]["captions"] == ["a photo", "a photo"]


def test_the_prior_flags_are_in_the_help_with_their_docments():
    out = subprocess.run([sys.executable, "-m", "sd_lora.train", "--help"], capture_output=True, text=True, timeout=300).stdout
    for flag, words in {"--with_prior_preservation": "class images", "--class_data_dir": "draws the missing",
                        "--class_prompt": "caption of the class images", "--num_class_images": "seeded",
                        "--prior_loss_weight": "weight", "--sample_batch_size": "per pipeline call",
                        "--prior_generation_precision": "fp16 on a GPU", "--reg_data_dir": "regularisation"}.items():
        entry = re.search(rf"^  {flag}\b.*?(?=^  -)", out, re.S | re.M)
        assert entry and words in " ".join(entry.group(0).split()), flag
