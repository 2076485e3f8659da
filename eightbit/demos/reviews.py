"""The movie-review sentences and the sentiment probe of the MiniLM demo and benchmark (demo data, not library).

The text is the 10,605 human-rated movie-review sentences of Hutto & Gilbert (ICWSM 2014), shipped only in the
``vaderSentiment==3.3.2`` sdist (not the wheel), fetched once with pip into a cache folder. A quantized encoder
is judged by cosine to the fp32 embeddings (`eightbit.text.cosine_stats`) and by a logistic-regression probe
fitted once on fp32 embeddings and applied to each variant. scikit-learn comes from the optional ``text`` extra
and is imported lazily.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

VADER_SDIST = "vaderSentiment-3.3.2.tar.gz"
# PyPI files are immutable; pinning the hash makes a truncated or substituted download fail loudly.
_VADER_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
_INNER_TARBALL = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
_MOVIE_FILE = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"


def default_cache_dir() -> Path:
    """``<repo>/.venv/share/eightbit-data`` for a development checkout with its venv, else ``~/.cache/eightbit``."""
    venv = Path(__file__).resolve().parents[1] / ".venv"
    # Inside the venv, `make clean` removes the download along with everything else it set up.
    return venv / "share" / "eightbit-data" if venv.is_dir() else Path.home() / ".cache" / "eightbit"


def _download_vader(cache_dir: Path) -> Path:
    target = cache_dir / VADER_SDIST
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", "vaderSentiment==3.3.2"]
    hint = f"{' '.join(cmd[2:])} -d {cache_dir}"
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Download into a sibling temp folder and rename: a killed download never leaves a partial sdist at `target`,
    # and the rename is atomic because both paths are on the same filesystem.
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=cache_dir))
    try:
        try:
            subprocess.run([*cmd, "-d", str(tmp)], check=True, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.SubprocessError) as exc:
            detail = ((exc.stderr if isinstance(exc, subprocess.CalledProcessError) else str(exc)) or "")[-2000:]
            raise RuntimeError(f"could not download the movie-review sentences; run: {hint}\n{detail}") from exc
        got = tmp / VADER_SDIST
        if not got.is_file():
            raise RuntimeError(f"pip did not produce {VADER_SDIST} (found {sorted(os.listdir(tmp))}); run: {hint}")
        digest = hashlib.sha256(got.read_bytes()).hexdigest()
        if digest != _VADER_SHA256:
            raise RuntimeError(f"{VADER_SDIST} has sha256 {digest}, expected {_VADER_SHA256}")
        os.replace(got, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def movie_review_sentences(cache_dir: Path | None = None, *, sdist: Path | None = None) -> list[tuple[str, float]]:
    """Return the 10,605 movie-review sentences as ``(text, mean rating)`` pairs, in file order.

    Ratings are the mean of ~20 human ratings on [-4, 4]; 37 are exactly 0 (neutral). Read from ``sdist`` if given,
    else from ``cache_dir`` (default :func:`default_cache_dir`), downloading the vaderSentiment 3.3.2 sdist with
    pip there on first use. Raises RuntimeError with the command to run if the download fails, ValueError if the
    tarball does not hold the expected file.
    """
    if sdist is None:
        cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        sdist = cache_dir / VADER_SDIST
        if not sdist.is_file():
            sdist = _download_vader(cache_dir)
    # Both tarballs are read in memory: nothing is extracted to disk (no cleanup, no path-traversal concerns).
    try:
        with tarfile.open(sdist, "r:gz") as outer:
            inner_bytes = outer.extractfile(_INNER_TARBALL).read()
        with tarfile.open(fileobj=io.BytesIO(inner_bytes), mode="r:gz") as inner:
            raw = inner.extractfile(_MOVIE_FILE).read()
    except (KeyError, AttributeError, tarfile.TarError) as exc:  # AttributeError: member is not a regular file
        raise ValueError(f"{sdist} does not hold {_INNER_TARBALL} -> {_MOVIE_FILE}: {exc}") from exc
    sentences = []
    # The file is valid UTF-8 (a few accented names, curly quotes) with CRLF line ends; strict decoding
    # makes a different file fail here rather than yield mojibake.
    for lineno, line in enumerate(raw.decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t", 2)  # id, mean rating, text (maxsplit: a tab in the text stays there)
        if len(fields) != 3:
            raise ValueError(f"{_MOVIE_FILE}:{lineno}: expected 3 tab-separated fields, got {len(fields)}")
        sentences.append((fields[2].strip(), float(fields[1])))
    return sentences


@dataclass(frozen=True)
class SentimentSplits:
    """Disjoint text splits for a sentiment probe; labels are 1 for a positive rating, 0 for a negative one."""

    calib_texts: list[str]
    train_texts: list[str]
    train_labels: list[int]
    test_texts: list[str]
    test_labels: list[int]


def sentiment_splits(
    sentences: Sequence[tuple[str, float]],
    *,
    n_test: int = 2000,
    n_train: int = 2000,
    n_calib: int = 512,
    seed: int = 0,
) -> SentimentSplits:
    """Drop neutral sentences (rating 0), shuffle with ``numpy.random.default_rng(seed)``, cut disjoint splits.

    Test is taken first, then probe-train, then calibration, so changing ``n_calib`` never changes the test set.
    Raises ValueError if there are fewer than ``n_test + n_train + n_calib`` non-neutral sentences.
    """
    if min(n_test, n_train, n_calib) < 0:
        raise ValueError(f"split sizes must be >= 0, got n_test={n_test}, n_train={n_train}, n_calib={n_calib}")
    polar = [(text, int(rating > 0)) for text, rating in sentences if rating != 0]
    need = n_test + n_train + n_calib
    if len(polar) < need:
        raise ValueError(
            f"need {need} non-neutral sentences (n_test={n_test} + n_train={n_train} + n_calib={n_calib}), "
            f"got {len(polar)} of {len(sentences)}"
        )
    order = np.random.default_rng(seed).permutation(len(polar))
    test, train, calib = np.split(order[:need], [n_test, n_test + n_train])
    return SentimentSplits(
        calib_texts=[polar[i][0] for i in calib],
        train_texts=[polar[i][0] for i in train],
        train_labels=[polar[i][1] for i in train],
        test_texts=[polar[i][0] for i in test],
        test_labels=[polar[i][1] for i in test],
    )


def probe_accuracy(
    train_x: np.ndarray, train_y: Sequence[int], test_xs: dict[str, np.ndarray], test_y: Sequence[int]
) -> dict[str, float]:
    """Fit one logistic regression on ``train_x`` and return its accuracy on each named test embedding set.

    The probe is fitted once (typically on fp32 embeddings) and reused, so accuracy differences between the
    entries of ``test_xs`` come from the embeddings alone. Fixed ``C=1.0``, ``max_iter=2000``, lbfgs:
    deterministic.
    """
    from sklearn.linear_model import LogisticRegression

    test_y = np.asarray(test_y)
    probe = LogisticRegression(C=1.0, max_iter=2000).fit(np.asarray(train_x), np.asarray(train_y))
    result = {}
    for name, x in test_xs.items():
        if len(x) != len(test_y):
            raise ValueError(f"test set {name!r} has {len(x)} rows, test_y has {len(test_y)}")
        result[name] = float(np.mean(probe.predict(np.asarray(x)) == test_y))
    return result
