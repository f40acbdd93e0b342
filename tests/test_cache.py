"Caching latents and text embeddings, and merging accumulation micro-batches: faster, with the same maths."
import statistics
import pytest
import torch
from sd_lora.run import setup
from sd_lora.train import train
from sd_lora.cache import CachedDataset
from helpers import tiny_config


def test_cached_run_matches_the_uncached_run(demo_data, tmp_path):
    kw = dict(random_flip=True, max_train_steps=6, train_batch_size=3)
    plain = train(tiny_config(demo_data, tmp_path / "plain", cache_latents="off", **kw))
    fast = train(tiny_config(demo_data, tmp_path / "fast", cache_latents="memory", **kw))
    assert fast.history.losses == pytest.approx(plain.history.losses, abs=1e-4)
    assert all(torch.allclose(plain.lora[k], fast.lora[k], atol=1e-5) for k in plain.lora)


def test_random_crop_of_non_square_images_falls_back_with_a_note(demo_data, tmp_path):
    with pytest.warns(UserWarning, match="pass --center_crop to cache"):
        run = setup(tiny_config(demo_data, tmp_path, center_crop=False))
    assert not isinstance(run.dataset, CachedDataset)
    run.accelerator.end_training()


def test_disk_cache_is_written_once_and_reused(demo_data, tmp_path):
    cache_dir = tmp_path / "cache"
    first = train(tiny_config(demo_data, tmp_path / "a", cache_latents="disk", latent_cache_dir=str(cache_dir),
                              random_flip=True))
    (folder,) = list(cache_dir.iterdir())
    shards = sorted(folder.glob("*.safetensors"))
    stamps = {p: p.stat().st_mtime_ns for p in shards}
    second = train(tiny_config(demo_data, tmp_path / "b", cache_latents="disk", latent_cache_dir=str(cache_dir),
                               random_flip=True))
    assert {p: p.stat().st_mtime_ns for p in shards} == stamps
    assert second.history.losses == pytest.approx(first.history.losses, abs=1e-6)
    # another resolution is another key, so another folder
    train(tiny_config(demo_data, tmp_path / "c", cache_latents="disk", latent_cache_dir=str(cache_dir),
                      resolution=32, max_train_steps=1))
    assert len(list(cache_dir.iterdir())) == 2


def test_merged_accumulation_trains_the_same_schedule_within_noise(demo_data, tmp_path):
    kw = dict(train_batch_size=1, gradient_accumulation_steps=4, max_train_steps=6, lr_scheduler="linear")
    plain = train(tiny_config(demo_data, tmp_path / "plain", **kw))
    merged = train(tiny_config(demo_data, tmp_path / "merged", merge_accumulation=True, **kw))
    assert merged.global_step == plain.global_step == 6
    assert merged.history.lrs == pytest.approx(plain.history.lrs)
    spread = statistics.pstdev(plain.history.losses + merged.history.losses)
    assert abs(statistics.mean(merged.history.losses) - statistics.mean(plain.history.losses)) < 2 * spread


@pytest.mark.parametrize("model", ["sd_lora:tiny-sd", "sd_lora:tiny-sdxl"])
def test_cached_bucket_run_matches_the_uncached_bucket_run(demo_data, tmp_path, monkeypatch, model):
    import sd_lora.train as T
    shapes, original = [], T.training_loss
    def spy(batch, *a, **kw):
        if "latent_mean" in batch: shapes.append(tuple(batch["latent_mean"].shape[-2:]))
        return original(batch, *a, **kw)
    monkeypatch.setattr(T, "training_loss", spy)
    kw = dict(pretrained_model_name_or_path=model, aspect_ratio_buckets=True, bucket_step=16, random_flip=True,
              max_train_steps=6, train_batch_size=3)
    plain = train(tiny_config(demo_data, tmp_path / "plain", cache_latents="off", **kw))
    assert shapes == []
    fast = train(tiny_config(demo_data, tmp_path / "fast", cache_latents="disk", **kw))
    assert len(shapes) == 6 and any(h != w for h, w in shapes)  # cached latents of 3:2 and 2:3 buckets
    assert fast.history.losses == pytest.approx(plain.history.losses, abs=1e-4)
    assert all(torch.allclose(plain.lora[k], fast.lora[k], atol=1e-5) for k in plain.lora)
