"""Tokenisers behind one small interface: a built-in byte-level one and Hugging Face ``tokenizer.json`` files.

Nothing here touches the network. A tokeniser is found by a path (a ``tokenizer.json`` file, or a folder holding
one or the byte tokeniser's ``tokenizer_config.json``, as model directories do) or by the name of a Hub repository
already in the local Hugging Face cache, resolved by ``huggingface_hub`` itself (``HF_HUB_CACHE`` / ``HF_HOME``).

Every tokeniser exposes ``vocab_size`` padded up to a multiple of :data:`VOCAB_MULTIPLE` so the embedding and
LM-head matrices get tensor-core friendly shapes; the ids above the tokeniser's own vocabulary never occur in
prepared data and are dropped by ``decode``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path

__all__ = [
    "BYTE_EOS_ID",
    "ByteTokenizer",
    "EOS_CANDIDATES",
    "HFTokenizer",
    "Tokenizer",
    "TokenizerNotFoundError",
    "VOCAB_MULTIPLE",
    "load_tokenizer",
    "train_byte_level_bpe",
]

VOCAB_MULTIPLE = 64
"""``vocab_size`` of every tokeniser is rounded up to a multiple of this."""

BYTE_EOS_ID = 256
"""End-of-document id of the byte tokeniser (ids 0..255 are the UTF-8 bytes themselves)."""

EOS_CANDIDATES: tuple[str, ...] = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|eos|>", "[EOS]")
"""Special tokens tried, in order, as the end-of-document token of a ``tokenizer.json`` without an explicit one."""


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


class TokenizerNotFoundError(FileNotFoundError):
    """A tokeniser spec that is neither ``"byte"``, an existing path, nor a locally cached hub repository."""


class Tokenizer(ABC):
    """Common interface of all tokenisers.

    Attributes:
        name: short human-readable name (``"byte"``, a hub repository id, or the file's folder name).
        vocab_size: number of embedding rows a model needs, padded to a multiple of :data:`VOCAB_MULTIPLE`.
        eos_id: id appended after every document.
        fingerprint: identifies the exact vocabulary; prepared data records it to catch mismatches.
    """

    name: str
    vocab_size: int
    eos_id: int
    fingerprint: str

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without any special token added."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; special and padding ids are dropped."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """``encode`` over many texts; subclasses override it when a batched path is faster."""
        return [self.encode(text) for text in texts]

    def slug(self) -> str:
        """A file-system safe identifier of this tokeniser, used in cache folder names."""
        return re.sub(r"[^A-Za-z0-9._-]+", "-", self.name).strip("-") or "tokenizer"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as tokens: ids 0..255 are bytes, 256 is EOS, ``vocab_size`` is 320 (257 padded to 64).

    Any text round-trips exactly; no file or download is needed.
    """

    name = "byte"
    eos_id = BYTE_EOS_ID
    vocab_size = _round_up(BYTE_EOS_ID + 1, VOCAB_MULTIPLE)
    fingerprint = "byte-utf8-eos256"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizers`` model read from a ``tokenizer.json`` file.

    Args:
        path: the ``tokenizer.json`` file.
        name: display name; defaults to the folder holding the file (or the file's stem).
        eos_token: the end-of-document token; by default the first of :data:`EOS_CANDIDATES` in the vocabulary.
    """

    def __init__(self, path: str | os.PathLike[str], name: str | None = None, eos_token: str | None = None) -> None:
        from tokenizers import Tokenizer as _HFTokenizer

        self.path = Path(path)
        raw = self.path.read_bytes()
        self._tokenizer = _HFTokenizer.from_str(raw.decode("utf-8"))
        # A special token's text inside a document ("<|endoftext|>" in a source file) is encoded as text:
        # only the EOS appended between documents may carry the EOS id.
        self._tokenizer.encode_special_tokens = True
        if name is None:
            name = self.path.parent.name if self.path.name == "tokenizer.json" else self.path.stem
        self.name = name
        self.base_vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        self.vocab_size = _round_up(self.base_vocab_size, VOCAB_MULTIPLE)
        self.eos_token = self._find_eos(eos_token)
        eos_id = self._tokenizer.token_to_id(self.eos_token)
        assert eos_id is not None  # _find_eos only returns tokens of the vocabulary
        self.eos_id = eos_id
        self.fingerprint = "sha256:" + hashlib.sha256(raw).hexdigest()[:16]

    def _find_eos(self, eos_token: str | None) -> str:
        if eos_token is not None:
            if self._tokenizer.token_to_id(eos_token) is None:
                raise ValueError(f"eos_token={eos_token!r} is not in the vocabulary of {self.path}")
            return eos_token
        for candidate in EOS_CANDIDATES:
            if self._tokenizer.token_to_id(candidate) is not None:
                return candidate
        raise ValueError(
            f"{self.path} has none of the end-of-document tokens {list(EOS_CANDIDATES)}; pass eos_token= explicitly"
        )

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special tokens' texts inside it are encoded as ordinary text."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [enc.ids for enc in self._tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        kept = [int(i) for i in ids if 0 <= int(i) < self.base_vocab_size]
        return self._tokenizer.decode(kept, skip_special_tokens=True)


TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
"""Beside exported weights: the byte tokeniser is described by this file (``tokenizer_class`` ByteTokenizer)."""


def _is_byte_description(path: Path) -> bool:
    try:
        return json.loads(path.read_text()).get("tokenizer_class") == ByteTokenizer.__name__
    except (OSError, ValueError, AttributeError):
        return False


def _from_folder(folder: Path, name: str, eos_token: str | None) -> Tokenizer | None:
    """The tokeniser a folder holds (``tokenizer.json``, or the byte tokeniser's description), or None."""
    if (folder / TOKENIZER_FILE).is_file():
        return HFTokenizer(folder / TOKENIZER_FILE, name=name, eos_token=eos_token)
    if _is_byte_description(folder / TOKENIZER_CONFIG_FILE):
        return ByteTokenizer()
    return None


def _from_hub_cache(repo_id: str, cache_dir: str | os.PathLike[str] | None,
                    eos_token: str | None) -> tuple[Tokenizer | None, str]:
    """(tokeniser of a cached Hub repository or None, where it was looked for), without network access."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    for filename in (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE):
        try:
            path = Path(hf_hub_download(repo_id, filename, cache_dir=cache_dir, local_files_only=True))
        except (LocalEntryNotFoundError, HFValidationError):
            continue
        found = _from_folder(path.parent, repo_id, eos_token)
        if found is not None:
            return found, ""
    where = Path(cache_dir) if cache_dir is not None else Path(constants.HF_HUB_CACHE)
    return None, f"the local Hugging Face cache {where}: no {repo_id} with a {TOKENIZER_FILE}"


def load_tokenizer(spec: str | Tokenizer, eos_token: str | None = None,
                   cache_dir: str | os.PathLike[str] | None = None) -> Tokenizer:
    """Resolve a tokeniser spec, offline.

    Args:
        spec: ``"byte"``; a path to a ``tokenizer.json`` or to a folder holding one (or the byte tokeniser's
            ``tokenizer_config.json``: an exported model directory); or a Hub repository id (``"gpt2"``,
            ``"org/name"``) already in the local Hugging Face cache. A ``Tokenizer`` instance is returned unchanged.
        eos_token: end-of-document token of a ``tokenizer.json`` (ignored for ``"byte"``).
        cache_dir: the Hugging Face cache to look in (default: ``huggingface_hub``'s, from ``HF_HUB_CACHE`` /
            ``HF_HOME``).

    Raises:
        TokenizerNotFoundError: nothing matched; the message lists every place that was tried.
    """
    if isinstance(spec, Tokenizer):
        return spec
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"tokenizer must be 'byte', a path or a cached hub name, got {spec!r}")
    if spec == "byte":
        return ByteTokenizer()
    path = Path(spec).expanduser()
    tried = ["the built-in 'byte' tokenizer (spec is not 'byte')", f"a path: {path.resolve()} does not exist"]
    if path.is_file():
        return HFTokenizer(path, eos_token=eos_token)
    if path.is_dir():
        found = _from_folder(path, path.name, eos_token)
        if found is not None:
            return found
        tried[1] = f"a folder: {path.resolve()} has no {TOKENIZER_FILE} or byte {TOKENIZER_CONFIG_FILE}"
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", spec):
        found, where = _from_hub_cache(spec, cache_dir, eos_token)
        if found is not None:
            return found
        tried.append(where)
    raise TokenizerNotFoundError(
        f"cannot find tokenizer {spec!r} offline; tried "
        + "; ".join(tried)
        + f". Pass 'byte', a tokenizer.json path, or download it first while online: `hf download {spec} "
        + f"{TOKENIZER_FILE}`."
    )


def train_byte_level_bpe(
    texts: Iterable[str],
    vocab_size: int,
    path: str | os.PathLike[str],
    *,
    eos_token: str = EOS_CANDIDATES[0],
    length: int | None = None,
    show_progress: bool = False,
) -> HFTokenizer:
    """Train a byte-level BPE tokeniser on ``texts``, offline, and save it as the ``tokenizer.json`` ``path``.

    Byte-level pre-tokenisation (the GPT-2 split of words, digits, punctuation and whitespace runs, over the 256
    byte symbols) means every text is encodable and round-trips through ``decode``; ``eos_token`` is the only
    special token (id 0). The vocabulary holds at most ``vocab_size`` entries (fewer when the texts run out of
    pairs seen at least twice).

    Args:
        texts: the training documents.
        vocab_size: the largest vocabulary, byte alphabet and ``eos_token`` included.
        path: where the ``tokenizer.json`` is written.
        eos_token: the end-of-document token.
        length: the number of texts, for the progress bar only.
        show_progress: show the trainer's progress bars.
    """
    from tokenizers import Tokenizer as _HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 1:
        raise ValueError(f"vocab_size must be at least {len(alphabet) + 1} (256 bytes and EOS), got {vocab_size}")
    tokenizer = _HFTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[eos_token],
        initial_alphabet=alphabet,
        show_progress=show_progress,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=length)
    tokenizer.save(str(path))
    return HFTokenizer(path, eos_token=eos_token)
