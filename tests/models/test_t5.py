"""umT5 encoder and tokenizer: release-layout loading, masking, trimming, padding, the prompt cache."""

from __future__ import annotations

import io

import pytest
import torch

from flashportrait.config import from_mapping
from flashportrait.golden import GoldenCase
from flashportrait.models.t5 import (
    PromptCache,
    T5EncoderConfig,
    TextEncoder,
    UMT5Encoder,
    load_umt5_encoder,
    pad_to_length,
    relative_position_buckets,
    trim_to_lengths,
)
from flashportrait.models.tokenizer import TokenizerError, UMT5Tokenizer
from flashportrait.weights import CheckpointMismatchError

CORPUS = [
    "The girl is singing a song.",
    "A man talks to the camera and smiles.",
    "Portrait of a woman laughing, soft light.",
    "Der Mann spricht.",
    "一个女孩在唱歌",
]


@pytest.fixture(scope="module")
def golden(golden_dir):
    return GoldenCase.load(golden_dir / "t5_encoder_tiny.json")


@pytest.fixture(scope="module")
def golden_config(golden) -> T5EncoderConfig:
    return from_mapping(T5EncoderConfig, golden.config["neutral"])


def _state_dict(golden) -> dict[str, torch.Tensor]:
    params = golden.params()
    return {k: params[k].clone() for k in params}


def test_release_pth_gives_golden_outputs(tmp_path, golden, golden_config):
    # models_t5_umt5-xxl-enc-bf16.pth: a plain torch.save of the encoder's keys, no prefix
    path = tmp_path / "models_t5_umt5-xxl-enc-bf16.pth"
    torch.save(_state_dict(golden), path)
    model, report = load_umt5_encoder(path, golden_config, dtype=torch.float32)
    assert report.ok and report.loaded == len(golden.params())
    ids, mask = golden.tensor("input/input_ids"), golden.tensor("input/attention_mask")
    with torch.no_grad():
        hidden = model(ids, mask)
    rtol, atol = golden.rtol_atol("last_hidden_state")
    torch.testing.assert_close(hidden, golden.tensor("output/last_hidden_state"), rtol=rtol, atol=atol)
    (trimmed,) = trim_to_lengths(hidden, mask.sum(1))
    assert trimmed.shape == golden.tensor("output/context_trimmed_0").shape
    torch.testing.assert_close(trimmed, golden.tensor("output/context_trimmed_0"), rtol=rtol, atol=atol)


def test_bf16_release_file_runs_in_bf16(tmp_path, golden, golden_config):
    path = tmp_path / "enc.pth"
    torch.save({k: v.to(torch.bfloat16) for k, v in _state_dict(golden).items()}, path)
    model, _ = load_umt5_encoder(path, golden_config, dtype=torch.bfloat16)
    ids, mask = golden.tensor("input/input_ids"), golden.tensor("input/attention_mask")
    with torch.no_grad():
        hidden = model(ids, mask)
    assert hidden.dtype == torch.bfloat16
    # bf16 weights and activations: a few percent of the golden's range, not garbage
    err = (hidden.float() - golden.tensor("output/last_hidden_state")).abs().max()
    assert err < 0.1 * golden.tensor("output/last_hidden_state").abs().max()


@pytest.mark.parametrize("damage", ["missing", "unexpected", "shape"])
def test_wrong_file_names_the_keys(tmp_path, golden, golden_config, damage):
    sd = _state_dict(golden)
    if damage == "missing":
        del sd["blocks.1.ffn.gate.0.weight"]
        expect = "blocks.1.ffn.gate.0.weight"
    elif damage == "unexpected":
        sd["encoder.blocks.0.extra.weight"] = torch.zeros(3)
        expect = "encoder.blocks.0.extra.weight"
    else:
        sd["blocks.0.pos_embedding.embedding.weight"] = torch.zeros(16, 4)
        expect = "blocks.0.pos_embedding.embedding.weight"
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointMismatchError, match=expect.replace(".", r"\.")):
        load_umt5_encoder(path, golden_config, dtype=torch.float32)


def test_padded_tokens_do_not_reach_valid_rows(golden, golden_config):
    model, _ = load_umt5_encoder(golden.params(), golden_config, dtype=torch.float32)
    ids, mask = golden.tensor("input/input_ids"), golden.tensor("input/attention_mask")
    n = int(mask.sum())
    assert n < ids.shape[1], "the golden case must contain padding for this test"
    other = ids.clone()
    other[:, n:] = torch.arange(5, 5 + ids.shape[1] - n)
    with torch.no_grad():
        a, b, unmasked = model(ids, mask), model(other, mask), model(other)
    torch.testing.assert_close(a[:, :n], b[:, :n], rtol=0, atol=1e-6)
    assert (unmasked[:, :n] - a[:, :n]).abs().max() > 1e-3


def test_relative_position_buckets_values():
    buckets = relative_position_buckets(1, 300, num_buckets=32, max_distance=128)[0]
    # keys after the query use the upper half; exact below 8, log-spaced to 128, clamped at 15
    assert buckets[:8].tolist() == [0, 17, 18, 19, 20, 21, 22, 23]
    assert buckets[8].item() == 16 + 8 and buckets[16].item() == 16 + 10
    assert buckets[127].item() == 16 + 15 and buckets[299].item() == 16 + 15
    back = relative_position_buckets(300, 1, num_buckets=32, max_distance=128)[:, 0]
    assert back[:8].tolist() == list(range(8)) and back[16].item() == 10 and back[299].item() == 15
    assert bool((back.diff() >= 0).all())


def test_pad_to_length_and_trim_roundtrip():
    hidden = torch.randn(2, 10, 4)
    trimmed = trim_to_lengths(hidden, torch.tensor([3, 10]))
    assert [t.shape[0] for t in trimmed] == [3, 10]
    padded = pad_to_length(trimmed, 12)
    assert padded.shape == (2, 12, 4)
    assert torch.equal(padded[0, :3], hidden[0, :3]) and bool((padded[0, 3:] == 0).all())
    assert torch.equal(padded[1, :10], hidden[1]) and bool((padded[1, 10:] == 0).all())
    with pytest.raises(ValueError, match="more than the text length"):
        pad_to_length(trimmed, 5)


# ---- tokenizer: a small SentencePiece model and a tokenizer.json built here, no downloads ----


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory):
    import sentencepiece as spm
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram

    folder = tmp_path_factory.mktemp("umt5-tok")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20),
        model_writer=buf,
        vocab_size=80,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        character_coverage=1.0,
        hard_vocab_limit=False,
        normalization_rule_name="identity",
        minloglevel=2,
    )
    (folder / "spiece.model").write_bytes(buf.getvalue())
    sp = spm.SentencePieceProcessor(model_file=str(folder / "spiece.model"))
    # the fast tokenizer in the layout transformers writes for T5: Unigram + Metaspace + "$A </s>"
    pieces = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    tok = Tokenizer(Unigram(pieces, sp.unk_id(), False))
    tok.normalizer = normalizers.Sequence([normalizers.Strip(), normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok.enable_padding(length=7, pad_id=0)  # a file's own padding must not leak into ours
    tok.save(str(folder / "tokenizer.json"))
    return folder


def test_tokenizer_pads_masks_and_appends_eos(tokenizer_folder):
    tok = UMT5Tokenizer.from_folder(tokenizer_folder)
    assert tok.source.endswith("tokenizer.json") and tok.max_length == 512
    batch = tok(["The girl is singing", "A man"])
    assert batch.input_ids.shape == (2, 512) and batch.input_ids.dtype == torch.int64
    for row in range(2):
        n = int(batch.lengths[row])
        assert batch.input_ids[row, n - 1].item() == 1  # EOS last
        assert bool((batch.input_ids[row, : n - 1] > 2).all())  # text, no unk/pad/eos inside
        assert bool((batch.input_ids[row, n:] == 0).all()) and bool(
            (batch.attention_mask[row, n:] == 0).all()
        )
        assert bool((batch.attention_mask[row, :n] == 1).all())
    assert batch.lengths[0] > batch.lengths[1]


def test_tokenizer_truncates_keeping_eos(tokenizer_folder):
    tok = UMT5Tokenizer.from_folder(tokenizer_folder, max_length=16)
    long_text = " ".join(CORPUS)
    full = tok._encode_text(long_text)
    assert len(full) > 16
    batch = tok(long_text)
    assert batch.lengths.tolist() == [16]
    assert batch.input_ids[0].tolist() == [*full[:15], 1]


def test_both_tokenizer_files_agree(tokenizer_folder):
    fast = UMT5Tokenizer.from_tokenizer_json(tokenizer_folder / "tokenizer.json", max_length=32)
    slow = UMT5Tokenizer.from_sentencepiece(tokenizer_folder / "spiece.model", max_length=32)
    for text in [*CORPUS, "A woman smiles at the camera, laughing.", "zzz unknown qqq"]:
        assert fast.ids(text) == slow.ids(text), text


def test_tokenizer_folder_errors(tmp_path):
    with pytest.raises(TokenizerError, match=r"neither tokenizer\.json nor spiece\.model"):
        UMT5Tokenizer.from_folder(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match=r"not a readable tokenizer\.json"):
        UMT5Tokenizer.from_folder(tmp_path)


def test_text_encoder_trims_pads_and_caches(tokenizer_folder):
    torch.manual_seed(0)
    config = T5EncoderConfig(vocab_size=64, hidden_dim=32, attn_dim=32, ffn_dim=48, num_heads=4, num_layers=2)
    encoder = UMT5Encoder(config).eval()
    tok = UMT5Tokenizer.from_folder(tokenizer_folder, max_length=24)
    text = TextEncoder(tok, encoder, cache_size=2)
    prompts = ["The girl is singing", "A man talks", "The girl is singing"]
    out = text.encode(prompts)
    lengths = tok(prompts).lengths.tolist()
    assert [e.shape for e in out] == [(n, 32) for n in lengths]
    # a prompt's embedding does not depend on the other prompts of the batch (padding is masked)
    single = tok("A man talks")
    with torch.no_grad():
        alone = encoder(single.input_ids, single.attention_mask)[0, : lengths[1]]
    torch.testing.assert_close(out[1], alone, rtol=1e-5, atol=1e-6)
    assert out[0] is out[2]
    # cached prompts are not encoded again
    calls = []
    encoder.register_forward_hook(lambda *args: calls.append(1))
    again = text.encode("A man talks")
    assert calls == [] and again[0] is out[1]
    # more new prompts than the cache holds: the hits are still returned
    new = ["Der Mann spricht", "A woman smiles"]
    mixed = text.encode(["A man talks", *new])
    assert mixed[0] is out[1]
    assert [e.shape[0] for e in mixed[1:]] == tok(new).lengths.tolist()
    padded = text.encode_padded(["A man talks", "The girl is singing"])
    assert padded.shape == (2, 24, 32)
    assert torch.equal(padded[0, : lengths[1]], out[1]) and bool((padded[0, lengths[1] :] == 0).all())


def test_prompt_cache_evicts_least_recent():
    cache = PromptCache(2)
    a, b, c = torch.zeros(1), torch.ones(1), torch.full((1,), 2.0)
    cache.put("a", a)
    cache.put("b", b)
    assert cache.get("a") is a  # "b" is now the least recent
    cache.put("c", c)
    assert "b" not in cache and cache.get("a") is a and cache.get("c") is c and len(cache) == 2
    off = PromptCache(0)
    off.put("a", a)
    assert len(off) == 0
