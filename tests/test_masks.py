"""Masked loss (--masked_loss): a mask from the alpha channel or a mask_file_name weighs the loss per latent pixel; it
follows flips, buckets and both caches, trains on the tiny SD1.x and SDXL, resumes exactly, and bad masks stop the
run before step 1."""
import json
import re
import pytest
import torch
from PIL import Image
import sd_lora.loss as L
import sd_lora.train as T
from sd_lora.models import TINY_SDXL, load_components
from sd_lora.train import train
from helpers import tiny_config, full_and_resumed


def half_mask(size, left=True):
    "A mask of the left (or right) half of an image of `size`."
    m = Image.new("L", size, 0)
    m.paste(255, (0, 0, size[0] // 2, size[1]) if left else (size[0] // 2, 0, size[0], size[1]))
    return m


def masked_copy(demo_data, folder, kind):
    "The demo photos with masks: `file` (a mask_file_name each), `alpha` (RGBA PNGs) or `white` (mask files of ones)."
    folder.mkdir()
    rows = [json.loads(line) for line in (demo_data / "metadata.jsonl").read_text().splitlines()]
    for row in rows:
        img = Image.open(demo_data / row["file_name"]).convert("RGB")
        if kind == "alpha":
            img.putalpha(half_mask(img.size))
            row["file_name"] = row["file_name"].replace(".jpg", ".png")
            img.save(folder / row["file_name"])
            continue
        img.save(folder / row["file_name"], quality=95)
        row["mask_file_name"] = row["file_name"].replace(".jpg", "_mask.png")
        (half_mask(img.size) if kind == "file" else Image.new("L", img.size, 255)).save(folder / row["mask_file_name"])
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.fixture(scope="module")
def masked_data(demo_data, tmp_path_factory):
    return masked_copy(demo_data, tmp_path_factory.mktemp("m") / "file", "file")


def test_the_loss_has_no_gradient_where_the_mask_is_black(masked_data, monkeypatch):
    from sd_lora.data import ImageCaptionDataset, collate, load_image_dataset
    from sd_lora.lora import add_lora, lora_config
    from sd_lora.masks import MaskReader
    m = load_components()
    add_lora(m.unet, lora_config())
    ds = ImageCaptionDataset(load_image_dataset(train_data_dir=str(masked_data)), m.tokenizer, 64, True, mask_fn=MaskReader())
    batch = collate([ds[i] for i in range(2)])
    seen, original = [], L.diffusion_loss
    def spy(pred, *a, **kw):
        pred.retain_grad()
        seen.append(pred)
        return original(pred, *a, **kw)
    monkeypatch.setattr(L, "diffusion_loss", spy)
    L.training_loss(batch, m, m.unet, torch.Generator().manual_seed(0), cfg=L.TrainConfig(masked_loss=True)).backward()
    g, w = seen[0].grad, seen[0].shape[-1]  # the latent column at the edge is partly covered (the resize blurs it)
    assert (g[..., w // 2 + 1:] == 0).all() and (g[..., : w // 2 - 1] != 0).all()


@pytest.mark.parametrize("model", [None, TINY_SDXL], ids=["sd1", "sdxl"])
def test_a_masked_run_resumes_exactly(masked_data, tmp_path, model):
    kw = dict(masked_loss=True, max_train_steps=6, checkpointing_steps=3, random_flip=True,
              **({"pretrained_model_name_or_path": model} if model else {}))
    full, resumed = full_and_resumed(masked_data, tmp_path, 3, **kw)
    assert resumed.history.losses == pytest.approx(full.history.losses[3:], abs=1e-6)
    assert all(torch.allclose(full.lora[k], resumed.lora[k], atol=1e-7) for k in full.lora)


@pytest.mark.parametrize("cache", ["memory", "disk"])
def test_cached_masks_train_as_masks_from_the_images(masked_data, tmp_path, cache):
    kw = dict(masked_loss=True, random_flip=True, max_train_steps=8)
    plain = train(tiny_config(masked_data, tmp_path / "off", cache_latents="off", **kw))
    cached = train(tiny_config(masked_data, tmp_path / cache, cache_latents=cache, **kw))
    # masks averaged to the latents' size once, or at each step: the same weights; the VAE's per-image calls differ in
    # the last bits from batched ones (see the caching lesson)
    assert cached.history.losses == pytest.approx(plain.history.losses, abs=1e-5)


def test_alpha_masks_equal_mask_files_and_white_masks_equal_no_mask(demo_data, masked_data, tmp_path):
    from sd_lora.data import ImageCaptionDataset, load_image_dataset
    from sd_lora.masks import MaskReader
    alpha = masked_copy(demo_data, tmp_path / "alpha", "alpha")
    white = masked_copy(demo_data, tmp_path / "white", "white")
    tokenizer = load_components().tokenizer
    items = lambda data: ImageCaptionDataset(load_image_dataset(train_data_dir=str(data)), tokenizer, 64, center_crop=True,
                                             random_flip=True, mask_fn=MaskReader()).__getitem__
    from_alpha, from_files = items(alpha), items(masked_data)
    # the same masks and flips; the JPEGs decode at a reduced size (their masks follow), the PNGs do not, so a centre
    # crop's corner can round to the next pixel
    assert all((from_alpha(i)["mask"] - from_files(i)["mask"]).abs().mean() < 0.02 for i in range(12))
    run = lambda data, name, **kw: train(tiny_config(data, tmp_path / name, max_train_steps=3, **kw)).history.losses
    assert run(white, "w", masked_loss=True) == pytest.approx(run(white, "n"), abs=1e-7)
    assert run(masked_data, "h", masked_loss=True) != pytest.approx(run(masked_data, "u"), abs=1e-3)
    assert len(run(alpha, "a", masked_loss=True)) == 3


def test_masks_follow_buckets(masked_data, tmp_path, monkeypatch):
    seen, original = [], T.training_loss
    def spy(batch, *a, **kw):
        seen.append(batch["mask"].shape[-2:] == batch["latent_mean" if "latent_mean" in batch else "pixel_values"].shape[-2:])
        return original(batch, *a, **kw)
    monkeypatch.setattr(T, "training_loss", spy)
    train(tiny_config(masked_data, tmp_path, masked_loss=True, aspect_ratio_buckets=True, bucket_step=16, cache_latents="off",
                      max_train_steps=3))
    assert seen == [True] * 3


def test_bad_masks_are_refused_before_the_first_step(demo_data, masked_data, tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(T, "training_loss", lambda *a, **kw: seen.append(1))
    with pytest.raises(ValueError, match="none of the 12 images has a mask"):
        train(tiny_config(demo_data, tmp_path / "none", masked_loss=True))
    bad = masked_copy(demo_data, tmp_path / "bad", "file")
    first = json.loads((bad / "metadata.jsonl").read_text().splitlines()[0])
    Image.new("L", (8, 8)).save(bad / first["mask_file_name"])
    with pytest.raises(ValueError, match=re.escape("8x8, its image")):
        train(tiny_config(bad, tmp_path / "small", masked_loss=True))
    assert seen == []


def test_the_masked_loss_flag_is_in_the_help():
    import subprocess, sys
    out = subprocess.run([sys.executable, "-m", "sd_lora.train", "--help"], capture_output=True, text=True, timeout=300).stdout
    entry = re.search(r"^  --masked_loss\b.*?(?=^  -)", out, re.S | re.M)
    assert entry and "mask_file_name" in " ".join(entry.group(0).split())
