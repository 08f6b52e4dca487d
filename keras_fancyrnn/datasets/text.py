"""Character-level language-modelling data: any local text file as a ``tf.data`` pipeline.

The char-RNN setting (Karpathy 2015; the WildML RNN tutorial; cs224n): a text of ``N`` characters
with vocabulary ``V`` (its distinct characters, sorted) becomes ids ``c_0 .. c_{N-1}``, cut into
``K = (N - 1) // L`` non-overlapping windows of ``L = seq_len`` steps. Window ``k`` is the input
``c_{kL} .. c_{kL+L-1}`` and the next-character target ``c_{kL+1} .. c_{kL+L}`` (the input shifted
by one), so a model is trained with a sparse categorical cross-entropy over ``|V|`` classes at every
step; ``exp`` of that loss is the per-character perplexity. A model that ignores the input and
predicts the unigram frequencies scores the unigram entropy, the baseline to beat.

:func:`tiny_shakespeare` gives the same pipeline for TFDS's ``tiny_shakespeare`` (Karpathy's 1.1 MB
``input.txt``, split 90/5/5 into train/validation/test by TFDS) when it is already prepared in the
TFDS data directory or the network allows downloading it; otherwise it raises
:class:`DatasetUnavailableError` at once, telling the user to pass a local file to
:func:`text_dataset` instead.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from keras_fancyrnn._tf import tf
from keras_fancyrnn.datasets import _common

#: Where TFDS downloads ``tiny_shakespeare`` from.
TINY_SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
_TINY_SHAKESPEARE_SPLITS = ("train", "validation", "test")


class DatasetUnavailableError(RuntimeError):
    """A data set cannot be had here: not prepared locally and not downloadable."""


class CharVocabulary:
    """The characters of a text and their ids: id ``k`` is the ``k``-th character in sorted order.

    Args:
      chars: the distinct characters (strings of length 1), in any order; they are sorted.

    Example::

        vocab = CharVocabulary.from_text("hello")   # chars ('e', 'h', 'l', 'o')
        vocab.encode("hole")                         # array([1, 3, 2, 0], dtype=int32)
        vocab.decode([1, 0, 2, 2, 3])                # 'hello'
    """

    def __init__(self, chars: Iterable[str]) -> None:
        chars = list(chars)
        bad = [c for c in chars if not isinstance(c, str) or len(c) != 1]
        if bad:
            raise ValueError(f"chars must be single characters, got {bad[:5]!r}")
        unique = sorted(set(chars))
        if len(unique) != len(chars):
            raise ValueError("chars must be distinct, got duplicates")
        if not unique:
            raise ValueError("chars must not be empty")
        self.chars: tuple[str, ...] = tuple(unique)
        self._codes = np.array([ord(c) for c in unique], dtype=np.uint32)

    @classmethod
    def from_text(cls, text: str) -> CharVocabulary:
        """The vocabulary of the distinct characters of ``text``."""
        if not text:
            raise ValueError("text must not be empty")
        return cls(np.unique(_codepoints(text)).astype(np.uint32).view("<U1").tolist())

    def __len__(self) -> int:
        return len(self.chars)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CharVocabulary) and self.chars == other.chars

    def __hash__(self) -> int:
        return hash(self.chars)

    def __repr__(self) -> str:
        return f"CharVocabulary({len(self)} chars: {''.join(self.chars)[:40]!r})"

    @property
    def char_to_id(self) -> dict[str, int]:
        """``{char: id}``."""
        return {c: i for i, c in enumerate(self.chars)}

    @property
    def id_to_char(self) -> tuple[str, ...]:
        """``id_to_char[id]`` is the character of ``id`` (the same as :attr:`chars`)."""
        return self.chars

    def encode(self, text: str) -> np.ndarray:
        """int32 ids of the characters of ``text``; raises ``ValueError`` on unknown characters."""
        codes = _codepoints(text)
        ids = np.searchsorted(self._codes, codes)
        known = ids < len(self._codes)
        known[known] = self._codes[ids[known]] == codes[known]
        if not known.all():
            unknown = sorted({chr(c) for c in codes[~known]})
            raise ValueError(
                f"text has {len(unknown)} characters not in the vocabulary: {unknown[:10]!r}; "
                "build the vocabulary from all the texts (CharVocabulary.from_text(a + b))"
            )
        return ids.astype(np.int32)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """The string of the characters with ids ``ids``."""
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() >= len(self)):
            raise ValueError(f"ids must be in [0, {len(self) - 1}], got {ids.min()}..{ids.max()}")
        return "".join(self.chars[i] for i in ids.reshape(-1).tolist())

    def get_config(self) -> dict[str, Any]:
        """``{"chars": "..."}``, e.g. to save beside a model; ``CharVocabulary(**config)``
        restores it."""
        return {"chars": "".join(self.chars)}


def _codepoints(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


def read_text(path_or_text: str | os.PathLike, encoding: str = "utf-8") -> str:
    """The text of a local file, or ``path_or_text`` itself when it is text.

    A ``pathlib.Path`` (any ``os.PathLike``) is always a file. A ``str`` is a file if one exists at
    that path; otherwise it is taken as the text itself when it contains whitespace, and raises
    ``FileNotFoundError`` when it does not (a single token is far more likely a mistyped path).
    """
    if isinstance(path_or_text, os.PathLike):
        with open(path_or_text, encoding=encoding) as f:
            return f.read()
    if not isinstance(path_or_text, str):
        raise TypeError(
            f"path_or_text must be a str or os.PathLike, got {type(path_or_text).__name__}"
        )
    if os.path.isfile(path_or_text):
        with open(path_or_text, encoding=encoding) as f:
            return f.read()
    if not any(c.isspace() for c in path_or_text):
        raise FileNotFoundError(
            f"no such file: {path_or_text!r} (a str without whitespace is read as a path; "
            "raw text must contain whitespace)"
        )
    return path_or_text


def text_dataset(
    path_or_text: str | os.PathLike,
    seq_len: int,
    batch_size: int,
    *,
    vocabulary: CharVocabulary | None = None,
    shuffle: bool = True,
    seed: int = 0,
    drop_remainder: bool = True,
    encoding: str = "utf-8",
) -> tuple[tf.data.Dataset, CharVocabulary]:
    """A char-level language-modelling pipeline over a local text file (or a text).

    Args:
      path_or_text: a local file (``os.PathLike`` or an existing path) or the text itself (see
        :func:`read_text`).
      seq_len: steps per sequence ``L``, ``>= 1``.
      batch_size: sequences per batch, ``>= 1``.
      vocabulary: the character vocabulary; default: built from this text. Pass the training
        text's vocabulary (built from all texts) when making a validation pipeline.
      shuffle: shuffle the windows (with ``seed``, reshuffled each epoch).
      seed: non-negative shuffle seed.
      drop_remainder: drop the last incomplete batch, so every batch has the static shape
        ``(batch_size, seq_len)`` (what a stateful RNN needs).
      encoding: the file's encoding.

    Returns:
      ``(dataset, vocabulary)``: ``dataset`` yields ``(inputs, targets)``, both int32
      ``(batch, seq_len)`` character ids, ``targets`` the inputs shifted one character ahead —
      ``K = (N - 1) // seq_len`` windows of the ``N``-character text; ``vocabulary`` maps
      characters to ids and back (:class:`CharVocabulary`).
    """
    seq_len = _common.check_int(seq_len, "seq_len", 1)
    batch_size = _common.check_int(batch_size, "batch_size", 1)
    seed = _common.check_seed(seed)
    text = read_text(path_or_text, encoding=encoding)
    if vocabulary is None:
        vocabulary = CharVocabulary.from_text(text) if text else None
    return _pipeline(text, vocabulary, seq_len, batch_size, shuffle, seed, drop_remainder)


def _pipeline(
    text: str,
    vocabulary: CharVocabulary | None,
    seq_len: int,
    batch_size: int,
    shuffle: bool,
    seed: int,
    drop_remainder: bool,
) -> tuple[tf.data.Dataset, CharVocabulary]:
    windows = (len(text) - 1) // seq_len
    if windows < 1 or vocabulary is None:
        raise ValueError(
            f"text has {len(text)} characters, fewer than seq_len + 1 = {seq_len + 1}: "
            "lower seq_len or pass a longer text"
        )
    if drop_remainder and windows < batch_size:
        raise ValueError(
            f"text gives {windows} sequences of seq_len={seq_len}, fewer than "
            f"batch_size={batch_size}, so drop_remainder=True would leave no batch: lower "
            "batch_size or seq_len, or pass drop_remainder=False"
        )
    ids = vocabulary.encode(text)
    inputs = ids[: windows * seq_len].reshape(windows, seq_len)
    targets = ids[1 : windows * seq_len + 1].reshape(windows, seq_len)
    dataset = tf.data.Dataset.from_tensor_slices((inputs, targets))
    if shuffle:
        dataset = dataset.shuffle(windows, seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.batch(batch_size, drop_remainder=drop_remainder)
    return dataset.prefetch(tf.data.AUTOTUNE), vocabulary


def _host_reachable(url: str, timeout: float) -> bool:
    """Whether a TCP connection to ``url``'s host opens within ``timeout`` seconds."""
    host = url.split("/")[2]
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _unavailable(reason: str) -> DatasetUnavailableError:
    return DatasetUnavailableError(
        f"tiny_shakespeare is unavailable: {reason}. Download {TINY_SHAKESPEARE_URL} (or use any "
        "local text file) and call keras_fancyrnn.datasets.text_dataset(path, seq_len, "
        "batch_size) instead."
    )


def _tiny_shakespeare_texts(
    data_dir: str | os.PathLike | None, download: bool, timeout: float
) -> dict[str, str]:
    """``{split: text}`` of TFDS's ``tiny_shakespeare``, preparing it first if allowed."""
    try:
        builder = tfds.builder("tiny_shakespeare", data_dir=data_dir)
        if not builder.is_prepared():
            if not download:
                raise _unavailable(f"it is not prepared in {builder.data_dir} and download=False")
            if not _host_reachable(TINY_SHAKESPEARE_URL, timeout):
                raise _unavailable(
                    f"it is not prepared in {builder.data_dir} and "
                    f"{TINY_SHAKESPEARE_URL.split('/')[2]} is unreachable within {timeout:g} s"
                )
            builder.download_and_prepare()
        texts = {}
        for split in _TINY_SHAKESPEARE_SPLITS:
            (example,) = tfds.as_numpy(builder.as_dataset(split=split))
            texts[split] = example["text"].decode("utf-8")
        return texts
    except DatasetUnavailableError:
        raise
    except Exception as err:  # a failed download or a broken TFDS install: say what to do
        raise _unavailable(f"{type(err).__name__}: {err}") from err


def tiny_shakespeare(
    seq_len: int = 100,
    batch_size: int = 64,
    split: str = "train",
    *,
    data_dir: str | os.PathLike | None = None,
    download: bool = True,
    timeout: float = 5.0,
    shuffle: bool = True,
    seed: int = 0,
    drop_remainder: bool = True,
) -> tuple[tf.data.Dataset, CharVocabulary]:
    """:func:`text_dataset` over TFDS's ``tiny_shakespeare`` (Karpathy's char-rnn corpus).

    Uses the prepared copy in ``data_dir`` (TFDS's default when ``None``) if there is one; else, if
    ``download`` and the download host answers within ``timeout`` seconds, lets TFDS download and
    prepare it; else raises :class:`DatasetUnavailableError` at once, saying to pass a local text
    file to :func:`text_dataset` (it never waits on an unreachable network longer than
    ``timeout``).

    Args:
      seq_len, batch_size, shuffle, seed, drop_remainder: as in :func:`text_dataset`.
      split: ``"train"`` (90 % of the text), ``"validation"`` or ``"test"`` (5 % each).
      data_dir: the TFDS data directory.
      download: allow downloading when the data set is not prepared.
      timeout: seconds to wait for the download host before giving up.

    Returns:
      ``(dataset, vocabulary)`` as :func:`text_dataset`; the vocabulary is that of the whole corpus
      (all three splits), so ids agree between splits.
    """
    if split not in _TINY_SHAKESPEARE_SPLITS:
        raise ValueError(f"split must be one of {list(_TINY_SHAKESPEARE_SPLITS)}, got {split!r}")
    seq_len = _common.check_int(seq_len, "seq_len", 1)
    batch_size = _common.check_int(batch_size, "batch_size", 1)
    seed = _common.check_seed(seed)
    texts = _tiny_shakespeare_texts(data_dir, download, timeout)
    vocabulary = CharVocabulary.from_text("".join(texts[s] for s in _TINY_SHAKESPEARE_SPLITS))
    return _pipeline(texts[split], vocabulary, seq_len, batch_size, shuffle, seed, drop_remainder)
