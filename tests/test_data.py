"Loading image-caption data and turning it into training items."
import random
import pytest
from PIL import Image
from sd_lora.data import load_image_dataset, ImageCaptionDataset, collate, pick_caption
from sd_lora.images import preprocess_image
from sd_lora.models import byte_clip_tokenizer


def test_dataset_name_may_be_a_local_folder(demo_data):
    ds = load_image_dataset(dataset_name=str(demo_data))
    assert len(ds) == 12 and set(ds.column_names) == {"image", "text"}


def test_missing_train_data_dir_names_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_image_dataset(train_data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="--dataset_name"):
        load_image_dataset()


def test_an_empty_folder_stops_before_training_with_the_fix(tmp_path):
    (tmp_path / "metadata.jsonl").write_text("")
    with pytest.raises(ValueError, match="holds no images .*add images and a metadata.jsonl"):
        load_image_dataset(train_data_dir=str(tmp_path))


def test_images_smaller_than_the_resolution_are_upscaled():
    tiny = Image.new("RGB", (12, 8), "teal")
    out = preprocess_image(tiny, 64, center_crop=True)
    assert out["pixel_values"].shape == (3, 64, 64) and out["original_size"] == (8, 12)
    assert out["crop_top_left"] == (0, 16)  # 12 x 8 became 96 x 64; the centre square starts 16 px in


def test_list_captions_are_picked_at_random_per_epoch_and_reproducibly():
    rows = [{"image": Image.new("RGB", (80, 64), "red"), "text": [f"caption {i}" for i in range(6)]}] * 4
    ds = ImageCaptionDataset(rows, byte_clip_tokenizer(), resolution=64, seed=1)
    seen = set()
    for epoch in range(8):
        ds.set_epoch(epoch)
        caps = [ds[i]["caption"] for i in range(4)]
        assert caps == [ds[i]["caption"] for i in range(4)]  # same epoch, same choice
        seen |= set(caps)
    assert len(seen) > 2
    assert pick_caption(["first", "second"]) == "first"


def test_batch_shapes_and_token_padding(demo_data):
    tok = byte_clip_tokenizer()
    ds = ImageCaptionDataset(load_image_dataset(train_data_dir=str(demo_data)), tok, resolution=32, random_flip=True)
    batch = collate([ds[i] for i in range(3)])
    assert batch["pixel_values"].shape == (3, 3, 32, 32)
    assert batch["input_ids"].shape == (3, 77)
    assert batch["indices"].tolist() == [0, 1, 2]
    assert -1 <= float(batch["pixel_values"].min()) and float(batch["pixel_values"].max()) <= 1


def test_random_crop_stays_inside_and_flip_mirrors():
    img = Image.new("RGB", (100, 50))
    img.paste((255, 0, 0), (0, 0, 50, 50))
    rng = random.Random(0)
    for _ in range(20):
        out = preprocess_image(img, 40, rng=rng)
        top, left = out["crop_top_left"]
        assert 0 <= top <= 0 and 0 <= left <= 80 - 40
    flipped = [preprocess_image(img, 40, center_crop=True, random_flip=True, rng=random.Random(s))["pixel_values"]
               for s in range(10)]
    assert any((f[0, :, 0] > 0.9).all() for f in flipped) and any((f[0, :, 0] < -0.9).all() for f in flipped)


def test_bad_interpolation_lists_the_choices():
    with pytest.raises(ValueError, match="lanczos"):
        preprocess_image(Image.new("RGB", (64, 64)), 32, interpolation="cubic-ish")


def test_every_image_mode_becomes_upright_8bit_rgb(tmp_path):
    import io
    import numpy as np
    from sd_lora.images import to_rgb
    cases = {"RGBA": Image.new("RGBA", (8, 6), (0, 0, 255, 128)), "LA": Image.new("LA", (8, 6)),
             "P": Image.new("P", (8, 6)), "CMYK": Image.new("CMYK", (8, 6)), "L": Image.new("L", (8, 6), 7),
             "I;16": Image.fromarray(np.arange(48, dtype=np.uint16).reshape(6, 8) * 1000), "1": Image.new("1", (8, 6))}
    for mode, img in cases.items():
        out = to_rgb(img)
        assert out.mode == "RGB" and out.size == (8, 6), mode
    assert to_rgb(cases["I;16"]).getpixel((7, 5))[0] == 255  # scaled, not clipped
    buf, exif = io.BytesIO(), Image.Exif()
    exif[0x0112] = 8
    Image.new("RGB", (40, 20), "red").save(buf, "JPEG", exif=exif)
    assert to_rgb(Image.open(buf)).size == (20, 40)


def test_max_train_samples_beyond_the_data_set_warns_and_uses_all(demo_data, tmp_path):
    from sd_lora.loaders import make_datasets
    from helpers import tiny_config
    with pytest.warns(UserWarning, match="more than the data set's 12"):
        train_ds, _ = make_datasets(tiny_config(demo_data, tmp_path, max_train_samples=50), byte_clip_tokenizer())
    assert len(train_ds) == 12


def test_training_skips_bad_files_with_one_warning_and_a_summary(demo_data, tmp_path, monkeypatch):
    import json, shutil, warnings
    from PIL import Image
    from sd_lora.train import train
    from helpers import tiny_config
    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    jpeg = (data / "coffee.jpg").read_bytes()
    (data / "coffee.jpg").write_bytes(jpeg[: len(jpeg) // 4])  # truncated
    (data / "moon.jpg").write_bytes(b"")  # zero bytes
    Image.new("RGB", (3000, 2000), "navy").save(data / "huge.jpg")  # past the lowered bomb limit below
    with open(data / "metadata.jsonl", "a") as f:
        for name in ("lost.jpg", "huge.jpg"): f.write(json.dumps({"file_name": name, "text": "a photo"}) + "\n")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2_000_000)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = train(tiny_config(data, tmp_path / "out", max_train_steps=3))
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    first = [m for m in messages if m.startswith("skipping")]
    assert len(first) == 1 and first[0].startswith("skipping 4 of 14 images: ")
    for expected in ("coffee.jpg: OSError", "moon.jpg: Unidentified", "lost.jpg: no such file: add it, or remove its row "
                     "from metadata.jsonl", "huge.jpg: too large"):
        assert expected in first[0]
    assert any(m.startswith("trained on 10 examples: 4 rows") for m in messages)  # the summary at the end
    assert res.skipped_examples == 4 and res.global_step == 3 and res.lora_path.exists()


def test_big_jpegs_decode_reduced_but_keep_their_full_size(tmp_path):
    import io
    from PIL import Image
    from sd_lora.data import ImageCaptionDataset, open_image
    buf = io.BytesIO()
    Image.new("RGB", (4000, 3000), "olive").save(buf, "JPEG")
    img, size = open_image({"bytes": buf.getvalue(), "path": None}, min_side=64)
    assert size == (3000, 4000) and img.size == (500, 375)  # an eighth: still longer than 64 on each side
    (tmp_path / "big.jpg").write_bytes(buf.getvalue())
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "big.jpg", "text": "olive"}\n')
    item = ImageCaptionDataset(load_image_dataset(train_data_dir=str(tmp_path)), byte_clip_tokenizer(), 64, True)[0]
    assert item["original_size"] == (3000, 4000) and item["pixel_values"].shape == (3, 64, 64)


def test_a_folder_of_unreadable_images_stops_before_training(tmp_path):
    from sd_lora.data import drop_unreadable
    (tmp_path / "a.jpg").write_bytes(b"")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.jpg", "text": "x"}\n')
    with pytest.raises(ValueError, match="none of the 1 images can be used, e.g. .*a.jpg"):
        drop_unreadable(load_image_dataset(train_data_dir=str(tmp_path)))


def test_bad_and_long_captions(tmp_path):
    import json
    from sd_lora.data import drop_bad_captions, warn_long_captions
    for i in range(4): Image.new("RGB", (16, 16)).save(tmp_path / f"{i}.png")
    rows = [{"file_name": "0.png", "text": "a cat"}, {"file_name": "1.png", "text": ""},
            {"file_name": "2.png", "text": "   "}, {"file_name": "3.png", "text": "word " * 100}]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = load_image_dataset(train_data_dir=str(tmp_path))
    with pytest.warns(UserWarning, match="skipping 2 of 4 rows"):
        kept = drop_bad_captions(ds)
    assert list(kept["text"]) == ["a cat", "word " * 100]
    with pytest.warns(UserWarning, match="1 captions are longer than 77 tokens"):
        assert warn_long_captions(list(kept["text"]), byte_clip_tokenizer()) == 1
