"Generation shared over two CPU processes through notebook_launcher gives exactly the single-process images and scores."
from dataclasses import dataclass
from pathlib import Path
import numpy as np
import pytest
import torch
from accelerate import Accelerator, PartialState
from sd_lora.launch import launch_train
from sd_lora.train import train
from sd_lora.run import forget_accelerate_state
from sd_lora.inference import inference_pipeline, generate, load_lora
from sd_lora.mixing import set_lora_weights
from sd_lora.distributed import (split_batches, gather_in_order, map_in_parallel, generate_distributed, lora_effect,
                                 GenerateJob, launch_generate)
from helpers import tiny_config

PROMPTS = ["a red square", "a cat", "a blue circle", "a rocket", "a cup of coffee"]
KW = dict(num_inference_steps=4, height=64, width=64)


@pytest.fixture(scope="module")
def loras(demo_data, tmp_path_factory):
    return [train(tiny_config(demo_data, tmp_path_factory.mktemp(f"lora{i}"), max_train_steps=8, seed=i, rank=4,
                              lora_alpha=8, eval_samples=0)).lora_path for i in range(2)]


@dataclass
class Cases:
    out: str
    lora: str
    cpu: bool = True


def _many_cases(job):
    "Each rank: gathered indices for several prompt counts and batch sizes, and the API's images and scores."
    acc = Accelerator(cpu=job.cpu)
    res = {"world": acc.num_processes, "threads": torch.get_num_threads(), "gathered": {}, "images": {}}
    for n in (1, 2, 3, 5, 7):
        for bs in (1, 2, 3):
            idx = [i for b in split_batches(n, acc, bs) for i in b]
            res["gathered"][n, bs] = gather_in_order(torch.tensor(idx)[:, None] * 10, idx, n)[:, 0].tolist()
    pipe = inference_pipeline(device=acc.device)
    load_lora(pipe, job.lora, "a")
    for n, bs in [(1, 1), (2, 1), (3, 1), (5, 1), (5, 2)]:
        images = generate_distributed(pipe, PROMPTS[:n], seed=11, state=acc, batch_size=bs, **KW)
        res["images"][n, bs] = np.stack([np.asarray(im) for im in images])
    res["effect"] = lora_effect(pipe, PROMPTS, seed=11, state=acc, **KW).cpu()
    torch.save(res, Path(job.out) / f"rank{acc.process_index}.pt")
    acc.wait_for_everyone()
    acc.end_training()


def one_process(pipe, prompts, seed, batch_size):
    "The single-process reference: the same batches of consecutive prompts, one thread as each launched process had."
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        images = [im for i in range(0, len(prompts), batch_size)
                  for im in generate(pipe, prompts[i:i + batch_size], seed=seed + i, **KW)]
    finally: torch.set_num_threads(threads)
    return np.stack([np.asarray(im) for im in images])


def test_two_processes_match_one_for_every_prompt_count(loras, tmp_path):
    launch_train(Cases(str(tmp_path), str(loras[0])), num_processes=2, use_port="29593", fn=_many_cases)
    r0, r1 = (torch.load(tmp_path / f"rank{i}.pt", weights_only=False) for i in (0, 1))
    assert r0["world"] == r1["world"] == 2 and r0["threads"] == 1
    for (n, bs), got in r0["gathered"].items():
        assert got == r1["gathered"][n, bs] == [10 * i for i in range(n)], (n, bs)  # each prompt once, in order
    pipe = inference_pipeline(device="cpu")
    load_lora(pipe, loras[0], "a")
    for (n, bs), images in r0["images"].items():
        assert np.array_equal(images, one_process(pipe, PROMPTS[:n], 11, bs)), (n, bs)
        assert np.array_equal(r1["images"][n, bs], images)
    with_lora = one_process(pipe, PROMPTS, 11, 1).astype(np.float32)
    pipe.disable_lora()
    base = one_process(pipe, PROMPTS, 11, 1).astype(np.float32)
    one_process_effect = torch.from_numpy(np.abs(with_lora - base).mean(axis=(1, 2, 3)))
    torch.testing.assert_close(r0["effect"], one_process_effect, atol=1e-4, rtol=0)
    torch.testing.assert_close(r1["effect"], r0["effect"], atol=0, rtol=0)
    assert (r0["effect"] > 0).all()


def test_launch_generate_job_with_two_loras_writes_from_rank0(loras, tmp_path):
    job = GenerateJob(PROMPTS, out=str(tmp_path / "out" / "images.pt"), loras=[f"{loras[0]}:0.7", f"{loras[1]}:0.5"],
                      seed=5, score=True, cpu=True, **KW)
    res = launch_generate(job, num_processes=2, use_port="29594")
    assert [im.size for im in res["images"]] == [(64, 64)] * 5 and res["effect"].shape == (5,)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["images.pt"]
    pipe = inference_pipeline(device="cpu")
    load_lora(pipe, loras[0], "lora0")
    load_lora(pipe, loras[1], "lora1")
    set_lora_weights(pipe, {"lora0": 0.7, "lora1": 0.5})
    assert np.array_equal(np.stack([np.asarray(im) for im in res["images"]]), one_process(pipe, PROMPTS, 5, 1))


@pytest.fixture
def state():
    "A single-process state, cleared afterwards so that later launches in this session can start."
    forget_accelerate_state()
    yield PartialState(cpu=True)
    forget_accelerate_state()


def test_single_process_needs_no_launcher_and_refuses_no_prompts(state):
    assert split_batches(3, state) == [[0], [1], [2]]
    assert split_batches(5, state, batch_size=2) == [[0, 1], [2, 3], [4]]
    assert map_in_parallel(lambda idx: torch.tensor(idx) * 2, 5, state, batch_size=2).tolist() == [0, 2, 4, 6, 8]
    rows = torch.arange(3)[:, None] * 10
    assert gather_in_order(rows, [0, 1, 2], 3)[:, 0].tolist() == [0, 10, 20]
    with pytest.raises(ValueError, match="No prompts"):
        split_batches(0, state)
    with pytest.raises(RuntimeError, match=r"Prompts \[2\] came back from no process"):
        gather_in_order(rows[:2], [0, 1], 3)
