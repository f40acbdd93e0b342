"The byte-level CLIP tokenizer of the tiny model."
import string
from sd_lora.models import byte_clip_tokenizer, load_components


def test_round_trip_lowercase_text():
    tok = byte_clip_tokenizer()
    text = "a photo of an astronaut riding a horse on the moon"
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_pads_and_truncates_to_77():
    tok = byte_clip_tokenizer()
    kw = dict(padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
    short, long = tok(["a cat"], **kw).input_ids, tok(["x" * 500], **kw).input_ids
    assert tok.model_max_length == 77
    assert short.shape == long.shape == (1, 77)
    assert short[0, -1] == tok.pad_token_id
    assert long[0, -1] == tok.eos_token_id


def test_no_unknown_tokens_for_printable_ascii():
    tok = byte_clip_tokenizer()
    text = string.printable.strip()
    tokens = tok.tokenize(text)
    assert tok.unk_token not in tokens
    # without merges every byte is one token: the characters come back in order (CLIP lower-cases)
    assert "".join(t.replace("</w>", "") for t in tokens) == "".join(text.lower().split())


def test_saved_tokenizer_loads_identically():
    tok = load_components().tokenizer
    assert tok("Hello, world!").input_ids == byte_clip_tokenizer()("Hello, world!").input_ids
    assert len(tok) == 514
