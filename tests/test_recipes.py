"""The recipes other trainers offer (losses, timestep bounds and sampling, caption options, optimizers): each changes
what it should, trains on the tiny SD1.x and SDXL, resumes exactly, and a bad value is a clear error before step 1."""
import json
import re
import shutil
import subprocess
import sys
import pytest
import torch
import sd_lora.loss as L
import sd_lora.train as T
from sd_lora.cache import CachedDataset
from sd_lora.lazy_cache import LazyCache
from sd_lora.models import TINY_SDXL
from sd_lora.run import setup
from safetensors.torch import load_file
from sd_lora.train import train
from helpers import tiny_config, full_and_resumed


@pytest.fixture(scope="module")
def tagged_data(demo_data, tmp_path_factory):
    "The demo photos with tag captions: a trigger word, then three tags."
    folder = tmp_path_factory.mktemp("tagged")
    rows = [json.loads(line) for line in (demo_data / "metadata.jsonl").read_text().splitlines()]
    for k, row in enumerate(rows):
        shutil.copy(demo_data / row["file_name"], folder / row["file_name"])
        row["text"] = f"sks, photo {k}, {'grey' if k % 2 else 'colour'}, detailed"
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def spy_on(monkeypatch, name):
    "Record what the loop passes to (or gets from) `sd_lora.train.training_loss` or `sd_lora.loss.sample_timesteps`."
    module = L if name == "sample_timesteps" else T
    seen, original = [], getattr(module, name)
    if name == "sample_timesteps":
        def spy(*a, **kw):
            t = original(*a, **kw)
            seen.append(t.clone())
            return t
    else:  # training_loss: the batch's captions
        def spy(batch, *a, **kw):
            seen.append(list(batch["captions"]))
            return original(batch, *a, **kw)
    monkeypatch.setattr(module, name, spy)
    return seen


def test_max_and_min_timestep_bound_the_timesteps_trained(demo_data, tmp_path, monkeypatch):
    seen = spy_on(monkeypatch, "sample_timesteps")
    train(tiny_config(demo_data, tmp_path, max_train_steps=6, min_timestep=100, max_timestep=200))
    t = torch.cat(seen)
    assert len(t) == 12 and int(t.min()) >= 100 and int(t.max()) < 200


def test_logit_normal_sampling_trains_mostly_the_middle_timesteps(demo_data, tmp_path, monkeypatch):
    seen = spy_on(monkeypatch, "sample_timesteps")
    train(tiny_config(demo_data, tmp_path, max_train_steps=8, train_batch_size=4, timestep_sampling="logit_normal",
                      logit_std=0.5))
    t = torch.cat(seen).float()
    assert len(t) == 32 and ((t - 500).abs() < 250).float().mean() > 0.9  # |xi| < 2.2 sigma: 97%


@pytest.mark.parametrize("model", [None, TINY_SDXL], ids=["sd1", "sdxl"])
@pytest.mark.parametrize("loss", [dict(loss_type="l1"), dict(loss_type="huber"),
                                  dict(loss_type="smooth_l1", huber_schedule="exponential"),
                                  dict(debiased_estimation_loss=True, snr_gamma=5.0)],
                         ids=["l1", "huber-snr", "smooth_l1-exponential", "debiased-min_snr"])
def test_each_loss_trains_and_differs_from_mse(demo_data, tmp_path, model, loss):
    kw = dict(max_train_steps=2, **({"pretrained_model_name_or_path": model} if model else {}))
    mse = train(tiny_config(demo_data, tmp_path / "mse", **kw))
    other = train(tiny_config(demo_data, tmp_path / "other", **kw, **loss))
    assert all(torch.isfinite(torch.tensor(other.history.losses)))
    assert other.history.losses[0] != pytest.approx(mse.history.losses[0], rel=1e-3)  # same batch, same noise: another loss
    assert any(not torch.allclose(mse.lora[k], other.lora[k]) for k in mse.lora)


def test_huber_with_a_large_threshold_is_mse(demo_data, tmp_path):
    "Pseudo-Huber with c = 1 at every step is close to MSE for errors well below 1, as the noise prediction's are not."
    mse = train(tiny_config(demo_data, tmp_path / "mse", max_train_steps=1))
    huber = train(tiny_config(demo_data, tmp_path / "huber", max_train_steps=1, loss_type="huber", huber_c=1.0,
                              huber_schedule="constant"))
    # 2c(sqrt(d^2 + c^2) - c) <= d^2, with equality as d -> 0: the Huber loss is below MSE, within a factor
    assert huber.history.losses[0] < mse.history.losses[0] < 1.5 * huber.history.losses[0]


@pytest.mark.parametrize("bad, message", [
    (dict(min_timestep=500, max_timestep=100), "--min_timestep 500 and --max_timestep 100"),
    (dict(max_timestep=2000), "max <= 1000"),
    (dict(loss_type="huber", huber_c=0.0), "--huber_c 0.0"),
    (dict(loss_type="l3"), "choose l2, l1, huber or smooth_l1"),
    (dict(timestep_sampling="logit_normal", logit_std=0.0), "--logit_std 0.0"),
    (dict(caption_dropout_rate=1.5), "--caption_dropout_rate 1.5"),
    (dict(keep_tokens=2), "add --shuffle_caption"),
    (dict(optimizer="adamw_schedulefree", lr_scheduler="cosine"), "not cosine"),
    (dict(optimizer="lion", use_8bit_adam=True), "keep one of the two"),
], ids=["min-above-max", "max-past-T", "huber_c-0", "loss_type", "logit_std-0", "dropout-1.5", "keep_tokens-alone",
        "schedulefree-cosine", "two-optimizers"])
def test_a_bad_recipe_value_is_refused_before_the_first_step(demo_data, tmp_path, monkeypatch, bad, message):
    steps = spy_on(monkeypatch, "training_loss")
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        train(tiny_config(demo_data, tmp_path, **bad))
    assert steps == [] and not list(tmp_path.glob("checkpoint-*"))


def test_caption_prefix_dropout_and_shuffle_reach_the_step(tagged_data, tmp_path, monkeypatch):
    captions = spy_on(monkeypatch, "training_loss")
    train(tiny_config(tagged_data, tmp_path, max_train_steps=18, train_batch_size=4, caption_prefix="trigger,",
                      caption_dropout_rate=0.25, shuffle_caption=True, keep_tokens=2))
    drawn = [c for batch in captions for c in batch]
    empty = sum(c == "" for c in drawn) / len(drawn)
    assert 0.1 < empty < 0.4  # 72 draws at a rate of 0.25
    tags = [c.split(", ") for c in drawn if c]
    assert all(t[:2] == ["trigger", "sks"] and len(t) == 5 for t in tags)  # the kept tags, then the shuffled three
    orders = {}
    for t in tags: orders.setdefault(next(x for x in t if x.startswith("photo")), set()).add(tuple(t[2:]))
    assert any(len(o) > 1 for o in orders.values())  # an image's tags come in another order at another epoch


def test_dropout_1_trains_every_step_on_the_empty_caption(demo_data, tmp_path, monkeypatch):
    captions = spy_on(monkeypatch, "training_loss")
    train(tiny_config(demo_data, tmp_path, max_train_steps=3, caption_dropout_rate=1.0))
    assert {c for batch in captions for c in batch} == {""}


def test_shuffled_captions_are_not_cached_but_their_images_are(tagged_data, tmp_path):
    run = setup(tiny_config(tagged_data, tmp_path, shuffle_caption=True, random_flip=True))
    assert isinstance(run.dataset, LazyCache) and run.dataset.texts is None
    run.accelerator.end_training()
    fixed = setup(tiny_config(tagged_data, tmp_path / "fixed", caption_prefix="trigger"))
    assert fixed.dataset.texts == {}  # fixed captions: their embeddings are kept as drawn
    fixed.accelerator.end_training()


def test_the_disk_cache_holds_prefixed_and_empty_captions_and_trains_as_the_memory_cache(tagged_data, tmp_path):
    kw = dict(max_train_steps=6, train_batch_size=3, caption_prefix="trigger,", caption_dropout_rate=0.3)
    run = setup(tiny_config(tagged_data, tmp_path / "disk", cache_latents="disk", **kw))
    assert isinstance(run.dataset, CachedDataset)
    assert "" in run.dataset.cache.text and all(c == "" or c.startswith("trigger, sks") for c in run.dataset.cache.text)
    run.accelerator.end_training()
    disk = train(tiny_config(tagged_data, tmp_path / "disk", cache_latents="disk", **kw))
    memory = train(tiny_config(tagged_data, tmp_path / "memory", cache_latents="memory", **kw))
    assert memory.history.losses == pytest.approx(disk.history.losses, abs=1e-5)
    plain = train(tiny_config(tagged_data, tmp_path / "plain", max_train_steps=6, train_batch_size=3, cache_latents="disk"))
    assert plain.history.losses != pytest.approx(disk.history.losses, abs=1e-5)  # the prefix and dropout changed the text


@pytest.mark.parametrize("model", [None, TINY_SDXL], ids=["sd1", "sdxl"])
def test_a_run_with_every_recipe_resumes_exactly(tagged_data, tmp_path, model):
    kw = dict(max_train_steps=6, checkpointing_steps=3, random_flip=True, loss_type="huber", debiased_estimation_loss=True,
              min_timestep=50, max_timestep=950, timestep_sampling="logit_normal", caption_prefix="trigger,",
              caption_dropout_rate=0.2, shuffle_caption=True, keep_tokens=1,
              **({"pretrained_model_name_or_path": model} if model else {}))
    full, resumed = full_and_resumed(tagged_data, tmp_path, 3, **kw)
    assert resumed.history.losses == pytest.approx(full.history.losses[3:], abs=1e-6)
    assert all(torch.allclose(full.lora[k], resumed.lora[k], atol=1e-7) for k in full.lora)


OPTIMIZER_RUNS = {"prodigy": dict(learning_rate=1.0), "adafactor": {}, "lion": dict(learning_rate=1e-4),
                  "adamw_schedulefree": dict(lr_scheduler="constant_with_warmup", lr_warmup_steps=2)}


@pytest.mark.parametrize("model", [None, TINY_SDXL], ids=["sd1", "sdxl"])
@pytest.mark.parametrize("name", list(OPTIMIZER_RUNS))
def test_each_optimizer_trains_and_resumes_exactly(demo_data, tmp_path, name, model):
    kw = dict(optimizer=name, max_train_steps=4, checkpointing_steps=2, **OPTIMIZER_RUNS[name],
              **({"pretrained_model_name_or_path": model} if model else {}))
    full, resumed = full_and_resumed(demo_data, tmp_path, 2, **kw)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in full.lora.items() if "lora.up" in k)  # it trained
    assert resumed.history.losses == pytest.approx(full.history.losses[2:], abs=1e-6)
    assert all(torch.allclose(full.lora[k], resumed.lora[k], atol=1e-7) for k in full.lora)


def test_schedule_free_saves_its_averaged_weights_and_checkpoints_its_training_point(demo_data, tmp_path):
    res = train(tiny_config(demo_data, tmp_path, optimizer="adamw_schedulefree", lr_scheduler="constant",
                            max_train_steps=4, checkpointing_steps=4))
    saved, training = load_file(res.lora_path), load_file(tmp_path / "checkpoint-4" / "pytorch_lora_weights.safetensors")
    assert saved.keys() == training.keys()
    assert all(torch.equal(saved[f"unet.{k}"], v) for k, v in res.lora.items())  # what the run returns is what it saved
    assert any(not torch.allclose(saved[k], training[k]) for k in saved if "lora.up" in k)  # the average, not the point


def test_a_missing_optimizer_package_names_its_extra_before_the_first_step(demo_data, tmp_path, monkeypatch):
    steps = spy_on(monkeypatch, "training_loss")
    monkeypatch.setitem(sys.modules, "prodigyopt", None)  # as if it were not installed
    with pytest.raises(ImportError, match=r'pip install "sd_lora\[prodigy\]"'):
        train(tiny_config(demo_data, tmp_path, optimizer="prodigy"))
    assert steps == []


def test_the_recipe_flags_are_in_the_help_with_their_docments():
    out = subprocess.run([sys.executable, "-m", "sd_lora.train", "--help"], capture_output=True, text=True, timeout=300).stdout
    for flag, words in {"--loss_type": "pseudo-Huber", "--huber_schedule": "follows the timestep", "--huber_c": "threshold",
                        "--debiased_estimation_loss": "1/sqrt(SNR)", "--min_timestep": "smallest", "--max_timestep": "one past",
                        "--timestep_sampling": "logit_normal", "--logit_mean": "mean", "--logit_std": "standard deviation",
                        "--caption_prefix": "trigger word", "--caption_dropout_rate": "classifier-free guidance",
                        "--shuffle_caption": "comma-separated", "--keep_tokens": "leading tags",
                        "--caption_separator": "separates", "--optimizer": "adamw_schedulefree",
                        "--prodigy_beta3": "step-size", "--no_prodigy_decouple": "never"}.items():
        entry = re.search(rf"^  {flag}\b.*?(?=^  -)", out, re.S | re.M)  # its entry in the options, not the usage line
        assert entry, flag
        block = entry.group(0)
        assert words in " ".join(block.split()), (flag, block)
