"Building, saving and loading the tiny model through the same loader as real checkpoints."
import pytest
import torch
from sd_lora.models import tiny_sd_pipeline, load_components, load_pipeline, TINY_SD, resolve_model


def _params(module):
    return {k: v.detach() for k, v in module.state_dict().items()}


def test_save_load_round_trip(tmp_path):
    pipe = tiny_sd_pipeline(seed=3)
    pipe.save_pretrained(tmp_path)
    m = load_components(str(tmp_path))
    for name in ("unet", "vae", "text_encoder"):
        a, b = _params(getattr(pipe, name)), _params(getattr(m, name))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert m.noise_scheduler.config.beta_schedule == "scaled_linear"
    out = load_pipeline(str(tmp_path))
    assert torch.equal(out.unet.conv_in.weight, pipe.unet.conv_in.weight)


def test_embedded_default_is_a_saved_folder():
    path = resolve_model(TINY_SD)
    assert (resolve_model(None) == path) and path.endswith("tiny-sd-v1")
    assert torch.equal(load_components(path).unet.conv_in.weight, tiny_sd_pipeline().unet.conv_in.weight)


def test_seeds_give_different_weights():
    assert not torch.equal(tiny_sd_pipeline(0).unet.conv_in.weight, tiny_sd_pipeline(1).unet.conv_in.weight)


@pytest.mark.parametrize("bad", ["/no/such/model", "./missing-model"])
def test_missing_model_folder_names_the_path(bad):
    with pytest.raises(FileNotFoundError, match=bad.lstrip("./")):
        load_components(bad)


def test_folder_that_is_not_a_pipeline(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_pipeline(str(tmp_path))


@pytest.mark.parametrize("name,family,pipeline", [("sd_lora:tiny-sd2", "sd2", "StableDiffusionPipeline"),
                                                  ("sd_lora:tiny-sdxl", "sdxl", "StableDiffusionXLPipeline")])
def test_tiny_families_are_saved_folders_loaded_like_real_checkpoints(name, family, pipeline):
    from sd_lora.models import tiny_sd2_pipeline, tiny_sdxl_pipeline, model_family
    path = resolve_model(name)
    m = load_components(path)  # by folder, as a real checkpoint would be: no name-based shortcut
    assert model_family(m.unet) == family and (m.text_encoder_2 is not None) == (family == "sdxl")
    built = (tiny_sdxl_pipeline if family == "sdxl" else tiny_sd2_pipeline)()
    assert torch.equal(m.unet.conv_in.weight, built.unet.conv_in.weight)
    assert type(load_pipeline(name)).__name__ == pipeline
    expected = "v_prediction" if family == "sd2" else "epsilon"
    assert m.noise_scheduler.config.prediction_type == expected


def test_another_vae_replaces_the_checkpoints(tmp_path):
    from diffusers import AutoencoderKL
    vae = AutoencoderKL(block_out_channels=(32, 64, 64), latent_channels=4, scaling_factor=0.5,
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3)
    vae.save_pretrained(tmp_path)
    assert load_components("sd_lora:tiny-sdxl", vae_name_or_path=str(tmp_path)).vae.config.scaling_factor == 0.5


def test_a_checkpoint_without_a_first_text_encoder_is_refused_with_the_reason(tmp_path):
    "An SDXL refiner's model_index.json names no text_encoder: say so instead of failing inside transformers."
    import json, shutil
    shutil.copytree(resolve_model("sd_lora:tiny-sdxl"), tmp_path / "refiner")
    index = json.loads((tmp_path / "refiner" / "model_index.json").read_text())
    (tmp_path / "refiner" / "model_index.json").write_text(json.dumps({**index, "text_encoder": [None, None]}))
    with pytest.raises(ValueError, match="no text_encoder"):
        load_components(str(tmp_path / "refiner"))
