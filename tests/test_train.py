"The training loop: steps, clipping, precision, accumulation, resume, outputs."
import sys
import pytest
import torch
from safetensors.torch import load_file
from sd_lora.run import setup
from sd_lora.train import train, train_step
from sd_lora.outputs import hub_files, KOHYA_FILE
from sd_lora.models import load_pipeline
from helpers import tiny_config, read_json, full_and_resumed


def _unet_out(unet):
    g = torch.Generator().manual_seed(1)
    x, text = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad(): return unet(x, torch.tensor([20, 700]), text).sample


def test_clipping_clips_the_lora_gradients(demo_data, tmp_path):
    run = setup(tiny_config(demo_data, tmp_path, max_grad_norm=0.01))
    seen, inner = [], run.optimizer.optimizer
    step = inner.step
    def spy(*a, **k):
        seen.append(float(torch.nn.utils.get_total_norm([p.grad for p in run.params])))
        return step(*a, **k)
    inner.step = spy
    _, pre, skipped = train_step(run, next(iter(run.dataloader)))
    run.accelerator.end_training()
    assert float(pre) > 0.01 and float(skipped) == 0.0
    assert seen[0] == pytest.approx(0.01, rel=1e-4)


def test_resume_mid_epoch_with_accumulation_matches_uninterrupted_run(demo_data, tmp_path):
    kw = dict(max_train_steps=5, gradient_accumulation_steps=2, checkpointing_steps=2, random_flip=True,
              lr_scheduler="cosine", lr_warmup_steps=1)
    full, resumed = full_and_resumed(demo_data, tmp_path, 2, **kw)
    assert resumed.global_step == full.global_step == 5
    assert resumed.history.losses == pytest.approx(full.history.losses[2:], abs=1e-6)
    assert resumed.history.lrs == pytest.approx(full.history.lrs[2:])
    a, b = load_file(full.lora_path), load_file(resumed.lora_path)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-7) for k in a)


def test_bf16_on_cpu_keeps_lora_in_fp32(demo_data, tmp_path):
    res = train(tiny_config(demo_data, tmp_path, mixed_precision="bf16"))
    assert all(torch.isfinite(torch.tensor(res.history.losses)))
    assert {v.dtype for v in load_file(res.lora_path).values()} == {torch.float32}
    assert read_json(tmp_path / "train_config.json")["mixed_precision"] == "bf16"


def test_gradient_checkpointing_gives_the_same_weights(demo_data, tmp_path):
    plain = train(tiny_config(demo_data, tmp_path / "plain", max_train_steps=2))
    ckpt = train(tiny_config(demo_data, tmp_path / "ckpt", max_train_steps=2, gradient_checkpointing=True))
    assert all(torch.allclose(plain.lora[k], ckpt.lora[k], atol=1e-6) for k in plain.lora)


def test_v_prediction_with_min_snr_and_noise_offset_trains(demo_data, tmp_path):
    res = train(tiny_config(demo_data, tmp_path, prediction_type="v_prediction", snr_gamma=5.0, noise_offset=0.1))
    assert len(res.history.losses) == 4 and all(l == l for l in res.history.losses)
    assert read_json(tmp_path / "train_config.json")["prediction_type"] == "v_prediction"


def test_scale_lr_multiplies_by_batch_and_accumulation(demo_data, tmp_path):
    res = train(tiny_config(demo_data, tmp_path, scale_lr=True, learning_rate=1e-4, gradient_accumulation_steps=2,
                            max_train_steps=1))
    assert res.history.lrs[0] == pytest.approx(1e-4 * 2 * 2)


def test_kohya_file_loads_to_the_same_outputs(demo_data, tmp_path):
    train(tiny_config(demo_data, tmp_path, rank=4, lora_alpha=8))
    ours, kohya = load_pipeline(), load_pipeline()
    ours.load_lora_weights(tmp_path)
    kohya.load_lora_weights(tmp_path, weight_name=KOHYA_FILE)
    assert torch.allclose(_unet_out(ours.unet), _unet_out(kohya.unet), atol=1e-5)
    assert not torch.allclose(_unet_out(ours.unet), _unet_out(load_pipeline().unet), atol=1e-4)


def test_push_to_hub_uploads_the_final_folder_only(demo_data, tmp_path, monkeypatch):
    import huggingface_hub
    calls = {}
    monkeypatch.setattr(huggingface_hub, "create_repo",
                        lambda repo_id, **kw: calls.update(repo=repo_id, token=kw.get("token")) or
                        type("R", (), {"repo_id": f"me/{repo_id}"})())
    monkeypatch.setattr(huggingface_hub, "create_commit",
                        lambda repo_id, ops, **kw: calls.update(files=sorted(o.path_in_repo for o in ops)))
    secret = "hf_SECRETtoken123"
    train(tiny_config(demo_data, tmp_path / "my-lora", checkpointing_steps=2, push_to_hub=True, hub_token=secret,
                      report_to="tensorboard"))
    assert calls["repo"] == "my-lora" and calls["token"] == secret
    assert calls["files"] == hub_files(tmp_path / "my-lora")
    assert not any(f.startswith("checkpoint-") for f in calls["files"])
    assert "pytorch_lora_weights.safetensors" in calls["files"] and KOHYA_FILE in calls["files"]
    for f in (tmp_path / "my-lora").rglob("*"):
        if f.is_file(): assert secret.encode() not in f.read_bytes(), f


def test_unknown_column_lists_the_available_ones(demo_data, tmp_path):
    with pytest.raises(ValueError, match=r"its columns are \['image', 'text'\]"):
        setup(tiny_config(demo_data, tmp_path, caption_column="caption"))


def test_8bit_adam_without_bitsandbytes_says_how_to_install(demo_data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    with pytest.raises(ImportError, match=r'pip install "sd_lora\[8bit\]"'):
        setup(tiny_config(demo_data, tmp_path, use_8bit_adam=True))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_xformers_without_cuda_is_a_clear_error(demo_data, tmp_path):
    with pytest.raises(RuntimeError, match="needs CUDA and xformers"):
        setup(tiny_config(demo_data, tmp_path, enable_xformers_memory_efficient_attention=True))


def test_logged_loss_is_the_mean_over_the_micro_steps_taken(demo_data, tmp_path):
    "12 images in batches of 4 make 3 micro-batches an epoch: with accumulation 2 the second window holds one."
    kw = dict(train_batch_size=4, learning_rate=0.0, max_train_steps=None, num_train_epochs=1)  # weights stay put
    single = train(tiny_config(demo_data, tmp_path / "a", gradient_accumulation_steps=1, **kw))
    accumulated = train(tiny_config(demo_data, tmp_path / "b", gradient_accumulation_steps=2, merge_accumulation=False, **kw))
    assert len(single.history.losses) == 3 and len(accumulated.history.losses) == 2
    assert accumulated.history.losses[0] == pytest.approx((single.history.losses[0] + single.history.losses[1]) / 2, rel=1e-5)
    assert accumulated.history.losses[1] == pytest.approx(single.history.losses[2], rel=1e-5)  # not halved


@pytest.fixture(scope="module")
def eager_run(demo_data, tmp_path_factory):
    "A plain 4-step run, the reference for the compiled ones."
    return train(tiny_config(demo_data, tmp_path_factory.mktemp("eager"), max_train_steps=4))


@pytest.mark.parametrize("scope", ["blocks", "unet"])
def test_compiled_unet_trains_the_same_maths(demo_data, tmp_path, eager_run, scope):
    "--dynamo_backend compiles the transformer blocks or the whole UNet; on the CPU aot_eager (no code generation) checks the graphs."
    compiled = train(tiny_config(demo_data, tmp_path / "compiled", max_train_steps=4, dynamo_backend="aot_eager",
                                 dynamo_scope=scope))
    assert compiled.history.losses == pytest.approx(eager_run.history.losses, rel=1e-5)
    a, b = load_file(eager_run.lora_path), load_file(compiled.lora_path)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_a_compile_mode_without_inductor_is_a_clear_error(demo_data, tmp_path):
    with pytest.raises(ValueError, match="--dynamo_mode reduce-overhead is a mode of the inductor backend.*--dynamo_backend inductor"):
        train(tiny_config(demo_data, tmp_path / "out", dynamo_backend="aot_eager", dynamo_mode="reduce-overhead"))
    assert not (tmp_path / "out" / "pytorch_lora_weights.safetensors").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("scope", ["blocks", "unet"])
def test_cuda_graphs_train_the_same_maths(demo_data, tmp_path, scope):
    "inductor's reduce-overhead mode (generated kernels replayed as CUDA graphs) against eager, both in bf16."
    kw = dict(max_train_steps=6, mixed_precision="bf16", eval_samples=0)
    eager = train(tiny_config(demo_data, tmp_path / "eager", **kw))
    graphs = train(tiny_config(demo_data, tmp_path / "graphs", dynamo_backend="inductor", dynamo_mode="reduce-overhead",
                               dynamo_scope=scope, **kw))
    assert graphs.history.losses == pytest.approx(eager.history.losses, rel=0.05)  # bf16: fused kernels round differently
    a, b = load_file(eager.lora_path), load_file(graphs.lora_path)
    assert a.keys() == b.keys()
    up = [k for k in a if "lora.up" in k]  # the up matrices start at zero: they hold only what training learned
    learned_a, learned_b = (torch.cat([w[k].float().flatten() for k in up]) for w in (a, b))
    assert torch.nn.functional.cosine_similarity(learned_a, learned_b, dim=0) > 0.9


def test_validation_during_training_samples_like_the_saved_lora(tmp_path):
    "In-loop validation uses the checkpoint's own sampler (DDIM for the toy model), as a reloaded pipeline does."
    import numpy as np
    from PIL import Image
    from sd_lora.toy.lora import concept_data, teach_config
    cfg = teach_config(concept_data(tmp_path / "data", n_new=4), tmp_path / "out", max_train_steps=10,
                       validation_prompt="a purple circle", num_validation_images=2, validation_steps=10)
    train(cfg)
    last, final = (np.asarray(Image.open(tmp_path / "out" / "validation" / f)) for f in ("step-000010.png", "final.png"))
    assert np.array_equal(last, final)


def test_the_loop_reads_the_device_only_when_it_logs(demo_data, tmp_path):
    """No host sync in a step (issue 4): the loss, the gradient norm and the skip flags stay on the device until a
    logging step. Every read of a tensor's value goes through aten._local_scalar_dense, which a dispatch mode sees."""
    import traceback
    from collections import Counter
    from torch.utils._python_dispatch import TorchDispatchMode
    from sd_lora.train import train_loop

    class Reads(TorchDispatchMode):
        def __init__(self): super().__init__(); self.places = []
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                ours = [f for f in traceback.extract_stack() if f.filename.endswith("sd_lora/train.py")]
                self.places.append(ours[-1].name if ours[-1].name == "log_step" else ours[-1].line.split("(")[0])
            return func(*args, **(kwargs or {}))

    # 12 images in micro-batches of 2, accumulation 2: 3 steps an epoch, 6 steps in 2 epochs, logged at steps 3 and 6
    run = setup(tiny_config(demo_data, tmp_path, train_batch_size=2, gradient_accumulation_steps=2, max_train_steps=6,
                            logging_steps=3, eval_samples=0))
    with Reads() as reads: train_loop(run)
    run.accelerator.end_training()
    places = Counter(reads.places)
    assert places.pop("log_step") > 0
    assert places.pop("losses, norms = [float") == 6 + 6  # after the loop: the losses and the norms
    assert places.pop("return History") == 1  # and the skipped count
    # the sampler, once an epoch, read where the loader is iterated: the loop, or epoch_batches' generator of completed batches
    assert set(places) <= {"for batch in epoch_batches", "return "} and sum(places.values()) <= 2
