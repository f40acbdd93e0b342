"Big models: an empty skeleton filled by load_checkpoint_and_dispatch equals a plain load, with about half the memory."
import contextlib
import io
import pytest
import torch
from accelerate import infer_auto_device_map
from sd_lora.dispatch import (save_big_unet, PeakMemory, plain_load, empty_unet, is_empty, dispatch_load,
                              split_modules)


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    return save_big_unet(tmp_path_factory.mktemp("big") / "unet")


@pytest.fixture(scope="module")
def reference(big, probe):
    "The plain load's output on the probe."
    return run(plain_load(big), probe)


@pytest.fixture(scope="module")
def probe():
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500]), torch.randn(1, 4, 768, generator=g)


def run(unet, probe):
    with torch.no_grad(): return unet(*probe).sample.cpu()


def test_the_big_model_is_a_few_hundred_mb(big):
    size = (big / "diffusion_pytorch_model.safetensors").stat().st_size
    assert 300 * 2**20 < size < 500 * 2**20


def test_skeleton_has_every_parameter_and_no_storage(big):
    skeleton = empty_unet(big)
    assert is_empty(skeleton)
    assert {p.device.type for p in skeleton.parameters()} == {"meta"}
    assert sum(p.numel() for p in skeleton.parameters()) == sum(p.numel() for p in plain_load(big).parameters())


CPU_ONLY = {"cpu": "8GiB"}  # device_map="auto" may fill only the CPU: the memory measured is all this process's


def test_dispatched_load_equals_plain_load_with_less_memory(big, probe, reference):
    with PeakMemory() as m_plain:
        out_plain = run(plain_load(big), probe)
    with PeakMemory() as m_disp:
        unet = dispatch_load(big, max_memory=CPU_ONLY)
        out_disp = run(unet, probe)
    assert torch.equal(out_disp, out_plain) and torch.equal(out_plain, reference)
    assert not is_empty(unet) and set(unet.hf_device_map.values()) == {"cpu"}
    model_mib = (big / "diffusion_pytorch_model.safetensors").stat().st_size / 2**20
    assert m_plain.mib > 1.6 * model_mib  # random init + a second copy from the checkpoint
    assert m_disp.mib < 1.3 * model_mib
    assert m_disp.seconds > 0 and m_plain.seconds > 0


def test_peak_memory_sees_a_short_lived_allocation():
    def spike():
        x = torch.ones(32, 2**20)  # 128 MiB, freed on return
        return float(x[0, 0])
    with PeakMemory() as m:
        spike()
    assert 100 < m.mib < 200


def test_no_split_modules_are_kept_whole_and_offloaded_model_still_matches(big, probe, reference, tmp_path):
    skeleton = empty_unet(big)
    budget = {"cpu": "150MiB"}
    careful = infer_auto_device_map(skeleton, max_memory=budget, no_split_module_classes=skeleton._no_split_modules)
    careless = infer_auto_device_map(skeleton, max_memory=budget)
    assert split_modules(skeleton, careful) == [] and split_modules(skeleton, careless) != []
    with contextlib.redirect_stderr(io.StringIO()):
        offloaded = dispatch_load(big, max_memory=budget, offload_folder=tmp_path)
    assert set(offloaded.hf_device_map.values()) == {"cpu", "disk"}
    assert any(tmp_path.iterdir())
    assert torch.equal(run(offloaded, probe), reference)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="device_map='auto' on a GPU needs one")
def test_auto_device_map_puts_the_model_on_the_gpu(big, probe, reference):
    unet = dispatch_load(big)
    assert set(unet.hf_device_map.values()) == {0}
    out = run(unet, [p.to("cuda") for p in probe])
    torch.testing.assert_close(out, reference, atol=1e-2, rtol=1e-2)
