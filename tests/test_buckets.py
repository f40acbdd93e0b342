"Aspect-ratio buckets: sizes, fitting, batches from one bucket, sharding across processes."
import random
import pytest
from PIL import Image
from accelerate.data_loader import BatchSamplerShard
from sd_lora.buckets import make_buckets, nearest_bucket, fit_to_bucket, BucketBatchSampler


@pytest.mark.parametrize("resolution,step", [(512, 64), (1024, 64), (64, 16)])
def test_buckets_keep_the_area_and_the_step(resolution, step):
    buckets = make_buckets(resolution, step)
    assert (resolution, resolution) in buckets
    for w, h in buckets:
        assert w % step == 0 and h % step == 0 and w * h <= resolution ** 2 and max(w / h, h / w) <= 2.0
        assert (h, w) in buckets  # tall and wide alike


def test_fit_keeps_the_bucket_size_and_a_valid_crop():
    rng = random.Random(0)
    for size in [(300, 200), (200, 300), (50, 40), (1000, 120)]:
        bucket = nearest_bucket(*size, make_buckets(128, 16))
        img, (top, left) = fit_to_bucket(Image.new("RGB", size, "red"), bucket, center_crop=False, rng=rng)
        assert img.size == bucket and top >= 0 and left >= 0


def test_sharded_bucket_batches_stay_in_one_bucket_and_cover_every_item():
    rng = random.Random(1)
    bucket_of = [rng.randrange(3) for _ in range(23)]
    sampler = BucketBatchSampler(bucket_of, batch_size=4, seed=0)
    shards = [list(BatchSamplerShard(sampler, num_processes=2, process_index=i, split_batches=False, even_batches=True))
              for i in range(2)]
    assert len(shards[0]) == len(shards[1])  # the processes step together
    seen = set()
    for batch in shards[0] + shards[1]:
        assert len({bucket_of[i] for i in batch}) == 1
        seen |= set(batch)
    assert seen == set(range(23))


def _shapes_seen(monkeypatch):
    "Record the image shapes of every training batch `training_loss` sees."
    import sd_lora.train as T
    seen, original = [], T.training_loss
    def spy(batch, *a, **kw):
        seen.append(tuple(batch["pixel_values"].shape[-2:]))
        return original(batch, *a, **kw)
    monkeypatch.setattr(T, "training_loss", spy)
    return seen


@pytest.mark.parametrize("model", ["sd_lora:tiny-sd", "sd_lora:tiny-sdxl"])
def test_bucketed_training_keeps_aspect_ratios(demo_data, tmp_path, monkeypatch, model):
    from sd_lora.train import train
    from helpers import tiny_config
    seen = _shapes_seen(monkeypatch)
    with pytest.warns(UserWarning, match="Not caching latents: .*aspect_ratio_buckets"):
        res = train(tiny_config(demo_data, tmp_path, pretrained_model_name_or_path=model, aspect_ratio_buckets=True,
                                bucket_step=16, center_crop=False, max_train_steps=6))
    assert res.lora_path.exists() and len(seen) == 6
    assert any(h != w for h, w in seen)  # the demo photos are mostly 3:2 and 2:3: not squares
    assert set(seen) <= {(h, w) for w, h in make_buckets(64, 16)}


def test_bucketed_training_on_two_processes(demo_data, tmp_path):
    from sd_lora.launch import launch_train
    from helpers import tiny_config
    cfg = tiny_config(demo_data, tmp_path, aspect_ratio_buckets=True, bucket_step=16, cpu=True, max_train_steps=4,
                      cache_latents="off")
    launch_train(cfg, num_processes=2, use_port="29587")
    assert (tmp_path / "pytorch_lora_weights.safetensors").exists()
