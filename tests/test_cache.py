"Caching latents and text embeddings, and merging accumulation micro-batches: faster, with the same maths."
import statistics
import pytest
import torch
from sd_lora.run import setup
from sd_lora.train import train
from sd_lora.cache import CachedDataset
from sd_lora.lazy_cache import LazyCache
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
    assert not isinstance(run.dataset, (CachedDataset, LazyCache))
    assert run.plan[0] == "latents: encoded at every step"
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
    plain = train(tiny_config(demo_data, tmp_path / "plain", merge_accumulation=False, **kw))
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
    drawn = train(tiny_config(demo_data, tmp_path / "drawn", cache_latents="memory", dataloader_num_workers=1, **kw))
    assert drawn.history.losses == pytest.approx(fast.history.losses, abs=1e-5)  # cached as drawn, by a loader worker


def test_cache_as_drawn_gives_the_front_loaded_caches_losses(demo_data, tmp_path):
    # 12 images in batches of 3, 12 steps: three epochs, the first encoding as it goes, with flips drawn anew each epoch
    kw = dict(random_flip=True, max_train_steps=12, train_batch_size=3)
    upfront = train(tiny_config(demo_data, tmp_path / "disk", cache_latents="disk", **kw))
    run = setup(tiny_config(demo_data, tmp_path / "memory", cache_latents="memory", **kw))
    assert isinstance(run.dataset, LazyCache) and not run.dataset.latents  # nothing encoded before the first step
    run.accelerator.end_training()
    drawn = train(tiny_config(demo_data, tmp_path / "memory", cache_latents="memory", **kw))
    assert drawn.history.losses == pytest.approx(upfront.history.losses, abs=1e-5)
    # one image per VAE call against batches of three: the latents differ in their last bits, and how much depends on
    # the CPU threads' blocking (2e-6 on one thread, 6e-7 on two)
    assert all(torch.allclose(upfront.lora[k], drawn.lora[k], atol=1e-5) for k in upfront.lora)


def test_the_fast_default_merges_when_it_fits_and_trains_like_plain_mode(demo_data, tmp_path):
    kw = dict(train_batch_size=1, gradient_accumulation_steps=4, max_train_steps=6, lr_scheduler="linear")
    run = setup(tiny_config(demo_data, tmp_path / "auto", **kw))
    assert run.accelerator.gradient_accumulation_steps == 1 and run.dataloader.total_batch_size == 4
    assert run.plan[1].startswith("accumulation: 4 micro-batches of 1 merged into one batch: the merged pass needs")
    run.accelerator.end_training()
    fast = train(tiny_config(demo_data, tmp_path / "fast", **kw))
    plain = train(tiny_config(demo_data, tmp_path / "plain", cache_latents="off", merge_accumulation=False, **kw))
    assert fast.history.lrs == pytest.approx(plain.history.lrs)
    spread = statistics.pstdev(plain.history.losses + fast.history.losses)
    assert abs(statistics.mean(fast.history.losses) - statistics.mean(plain.history.losses)) < 2 * spread


def test_little_free_memory_keeps_accumulating(demo_data, tmp_path, monkeypatch):
    import sd_lora.memory
    monkeypatch.setattr(sd_lora.memory, "free_memory", lambda device: 1024)
    run = setup(tiny_config(demo_data, tmp_path, train_batch_size=1, gradient_accumulation_steps=4))
    assert run.accelerator.gradient_accumulation_steps == 4 and run.dataloader.total_batch_size == 1
    assert "accumulated: the merged pass needs" in run.plan[1] and "(--merge_accumulation to merge anyway)" in run.plan[1]
    run.accelerator.end_training()


def test_a_loader_worker_gets_only_the_keys_of_the_kept_latents(demo_data, tmp_path):
    "Under spawn (macOS, Windows) each epoch pickles the data set into its workers: the latents stay in the main process."
    import pickle
    from sd_lora.conditioning import caption_encoder
    run = setup(tiny_config(demo_data, tmp_path, random_flip=True, train_batch_size=4))
    lazy, m = run.dataset, run.m
    first = lazy.complete(next(iter(run.dataloader)), m.vae, caption_encoder(m))
    worker = pickle.loads(pickle.dumps(lazy))
    assert set(worker.latents) == set(lazy.latents) and all(v is None for v in worker.latents.values())
    i, flip = first["keys"][0]
    item = worker[i]
    assert "pixel_values" not in item and "latent_mean" not in item and item["flip"] == flip  # the main process adds them
    from sd_lora.lazy_cache import collate_lazy
    again = lazy.complete(collate_lazy([item]), m.vae)
    assert torch.equal(again["latent_mean"][0], first["latent_mean"][0])
    assert again["original_sizes"][0] == first["original_sizes"][0]
    run.accelerator.end_training()


def test_a_resumed_run_batches_as_its_checkpoint_recorded(demo_data, tmp_path, monkeypatch):
    """A run that had too little memory to merge, resumed where merging fits, still accumulates: the LoRA of the
    uninterrupted run bit for bit. Forcing the merge on resume draws each group's noise in one call: another sample of
    the same maths, close to it but not equal."""
    import sd_lora.memory
    from sd_lora.checkpoints import recorded_merge
    kw = dict(train_batch_size=1, gradient_accumulation_steps=4, max_train_steps=4, checkpointing_steps=2)
    with monkeypatch.context() as low:
        low.setattr(sd_lora.memory, "free_memory", lambda device: 1024)
        whole = train(tiny_config(demo_data, tmp_path / "whole", **kw))
    assert recorded_merge(tmp_path / "whole" / "checkpoint-2") is False
    resume = tiny_config(demo_data, tmp_path / "whole", resume_from_checkpoint="checkpoint-2", **kw)
    run = setup(resume)  # plenty of memory now
    assert run.accelerator.gradient_accumulation_steps == 4
    assert run.plan[1] == "accumulation: 4 micro-batches of 1 accumulated, as in the run this one resumes (--merge_accumulation to merge)"
    run.accelerator.end_training()
    resumed = train(resume)
    assert all(torch.equal(whole.lora[k], resumed.lora[k]) for k in whole.lora)
    merged = train(tiny_config(demo_data, tmp_path / "whole", resume_from_checkpoint="checkpoint-2", merge_accumulation=True, **kw))
    assert not all(torch.equal(whole.lora[k], merged.lora[k]) for k in whole.lora)
    assert all(torch.allclose(whole.lora[k], merged.lora[k], atol=1e-2) for k in whole.lora)
    assert recorded_merge(tmp_path / "whole" / "checkpoint-4") is True
