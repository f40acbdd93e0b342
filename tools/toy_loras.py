"""Train the two purple LoRAs that the inference lessons (07_inference, 07a_mixing, 07c_distributed) load from sd_lora/toy/loras/.

They come before the toy lessons, so they load these files instead of importing the toy modules. The recipe is the
toy LoRA lesson's (`teach_config`): 120 steps on 32 purple pictures of each shape, about 25 s each on two CPU cores.
- purple_a.safetensors: rank 8, alpha 16, seed 0, with as many base pictures mixed in (diffusers' format);
- purple_b_kohya.safetensors: rank 4, alpha 8, seed 1, purple pictures only (the kohya format UIs exchange).
Usage: `python tools/toy_loras.py` rewrites both files (training is deterministic on the same machine).
"""
import shutil
import tempfile
from pathlib import Path

from sd_lora.core import quiet
from sd_lora.outputs import KOHYA_FILE
from sd_lora.toy.lora import concept_data, teach_config
from sd_lora.train import train

OUT = Path(__file__).resolve().parent.parent / "sd_lora" / "toy" / "loras"
RECIPES = {"purple_a.safetensors": (8, 0, 1.0, "pytorch_lora_weights.safetensors"),
           "purple_b_kohya.safetensors": (4, 1, 0.0, KOHYA_FILE)}

if __name__ == "__main__":
    quiet()
    OUT.mkdir(parents=True, exist_ok=True)
    for name, (rank, seed, base_share, written) in RECIPES.items():
        with tempfile.TemporaryDirectory() as tmp:
            pictures = concept_data(Path(tmp) / "data", n_new=32, base_per_new=base_share, seed=seed)
            res = train(teach_config(pictures, Path(tmp) / "run", max_train_steps=120, rank=rank,
                                     lora_alpha=2 * rank, seed=seed))
            shutil.copy(res.output_dir / written, OUT / name)
        print("wrote", OUT / name)
