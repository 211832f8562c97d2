"""The CLIP tokenizer built from open-clip-torch's BPE file is the real one."""

from __future__ import annotations

from transformers import CLIPTokenizer


def test_real_clip_token_ids(tokenizer_dirs):
    tok = CLIPTokenizer.from_pretrained(tokenizer_dirs["sd1"])
    ids = tok("a photo of the cat", padding="max_length", max_length=77).input_ids
    # ids of OpenAI CLIP's tokenizer: <|startoftext|> a photo of the cat <|endoftext|>
    assert ids[:7] == [49406, 320, 1125, 539, 518, 2368, 49407]
    assert len(ids) == 77 and ids[-1] == 49407 and tok.model_max_length == 77


def test_sd2_tokenizer_pads_with_exclamation_mark(tokenizer_dirs):
    tok = CLIPTokenizer.from_pretrained(tokenizer_dirs["sd2"])
    ids = tok("a cat", padding="max_length", max_length=77).input_ids
    assert tok.pad_token_id == 0 and ids[3] == 49407 and set(ids[4:]) == {0}


def test_shipped_testbed_is_at_most_25_mb_and_tokenizes_like_clip():
    from diffmem.testbed import testbed_path

    files = [f for f in testbed_path().rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) <= 25_000_000
    tok = CLIPTokenizer.from_pretrained(testbed_path() / "tokenizer")  # compact tokenizer.json
    assert tok("a photo of the cat").input_ids[:7] == [49406, 320, 1125, 539, 518, 2368, 49407]
