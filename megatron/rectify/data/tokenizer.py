"""The byte-level tokenizer: every UTF-8 byte is a token id (0-255), plus one end-of-document id.

:class:`ByteTokenizer` maps every UTF-8 byte to its own token id and adds one end-of-document id
(256); ``vocab_size`` is 257. It is a real megatron-core tokenizer (a
:class:`~megatron.core.tokenizers.text.text_tokenizer.MegatronTokenizerText`, the class every
tokenizer that ``megatron.training`` builds in 0.19 is), so ``GPTDataset``, the pretrain script
and checkpoints treat it like any other. megatron-core 0.19.2 ships a ``ByteLevelTokenizer``
library, but ``build_tokenizer(args)`` cannot select it (no ``--tokenizer-type`` for it) and it
does not round-trip text (``ids_to_text`` strips trailing whitespace, its default EOD id 0 is
also the NUL byte, and an EOD id of 256 makes it raise), hence this small class.

Owns: the tokenizer, :func:`build_tokenizer` (megatron's plus ``ByteLevel``) and the argparse
choice ``--tokenizer-type ByteLevel``. The one change to megatron's own modules,
:func:`install_byte_level_tokenizer`, is in :mod:`megatron.rectify.megatron_patches` (with
every other patch of megatron) and re-exported here. Needs no GPU.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
from megatron.core.tokenizers.text.libraries.abstract_tokenizer import (
    MegatronTokenizerTextAbstract,
)
from megatron.core.tokenizers.text.text_tokenizer import MegatronTokenizerText

# The patch of megatron that selects this tokenizer lives in the register of megatron patches;
# re-exported here, next to the tokenizer it installs.
from megatron.rectify.megatron_patches import install_byte_level_tokenizer

__all__ = [
    "BYTE_LEVEL_TOKENIZER_TYPE",
    "BYTE_VOCAB_SIZE",
    "BYTE_EOD_ID",
    "BYTE_PAD_ID",
    "ByteLevelCodec",
    "ByteTokenizer",
    "build_byte_tokenizer",
    "build_tokenizer",
    "add_byte_level_tokenizer_choice",
    "install_byte_level_tokenizer",
]

#: The ``--tokenizer-type`` value for :class:`ByteTokenizer` (training and preprocessing).
BYTE_LEVEL_TOKENIZER_TYPE = "ByteLevel"
#: 256 byte values plus the end-of-document id.
BYTE_VOCAB_SIZE = 257
#: End-of-document id: outside the byte range, so a NUL byte in the text stays a NUL byte.
BYTE_EOD_ID = 256
#: No padding token, as megatron's ``NullTokenizer``: ``GPTDataset`` pads a short sample with this
#: id, masks its loss and maps it to token 0 before the embedding, so it never reaches the model.
BYTE_PAD_ID = -1

_BYTE_TOKENS = tuple(f"<0x{b:02X}>" for b in range(256))  # SentencePiece byte-fallback spelling
_EOD_TOKEN = "<eod>"


class ByteLevelCodec(MegatronTokenizerTextAbstract):
    """The "library" half of :class:`ByteTokenizer`: text <-> UTF-8 byte ids.

    megatron-core splits a tokenizer into a library object (text_to_ids, ids_to_text, special
    ids) and a :class:`MegatronTokenizerText` wrapper that the training code talks to; this is
    the library object. Token strings are spelled ``<0xNN>`` (as SentencePiece's byte fallback)
    and ``<eod>``, so that ``vocab`` is a proper str -> id mapping.
    """

    def __init__(self) -> None:
        self._vocab = {tok: i for i, tok in enumerate(_BYTE_TOKENS)}
        self._vocab[_EOD_TOKEN] = BYTE_EOD_ID

    # --- text <-> ids -------------------------------------------------------------------------
    def text_to_ids(self, text: str) -> list[int]:
        """UTF-8 bytes of ``text`` (strict: lone surrogates raise, as they are not text)."""
        return list(text.encode("utf-8"))

    def ids_to_text(self, ids: Sequence[int], remove_special_tokens: bool = True) -> str:
        """Inverse of :meth:`text_to_ids` (exact for any valid UTF-8 text).

        Ids outside 0-255 (EOD, padding) carry no text and are dropped. A model may generate a
        byte sequence that is not valid UTF-8; such bytes become U+FFFD rather than an error.
        """
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")

    def text_to_tokens(self, text: str) -> list[str]:
        return [_BYTE_TOKENS[b] for b in text.encode("utf-8")]

    def tokens_to_text(self, tokens: Sequence[str]) -> str:
        return self.ids_to_text(self.tokens_to_ids(tokens))

    def tokens_to_ids(self, tokens: str | Sequence[str]) -> list[int]:
        if isinstance(tokens, str):
            tokens = [tokens]
        try:
            return [self._vocab[t] for t in tokens]
        except KeyError as exc:
            raise ValueError(f"not a byte-level token: {exc.args[0]!r}") from None

    def ids_to_tokens(self, ids: int | Sequence[int]) -> list[str]:
        if isinstance(ids, int):
            ids = [ids]
        return [_BYTE_TOKENS[i] if 0 <= i < 256 else self._special_token(i) for i in ids]

    @staticmethod
    def _special_token(i: int) -> str:
        if i == BYTE_EOD_ID:
            return _EOD_TOKEN
        raise ValueError(f"token id {i} is outside the byte-level vocabulary (0-{BYTE_EOD_ID})")

    def offsets(self, ids: Sequence[int], text: str) -> list[int]:
        """Character offset in ``text`` at which each token starts.

        A byte that continues a multi-byte character (``0b10xxxxxx``) starts inside the
        character that began before it, so it reports that character's offset.
        """
        out: list[int] = []
        chars = 0
        for i in ids:
            if 0 <= i < 256 and (i & 0xC0) != 0x80:  # a character's first byte
                out.append(chars)
                chars += 1
            else:
                out.append(max(chars - 1, 0) if 0 <= i < 256 else chars)
        return out

    def add_special_tokens(self, special_tokens: Any = None) -> None:
        raise NotImplementedError("the byte-level vocabulary is fixed (256 bytes + <eod>)")

    # --- vocabulary and special ids -----------------------------------------------------------
    @property
    def vocab(self) -> dict[str, int]:
        return dict(self._vocab)

    @property
    def inv_vocab(self) -> dict[int, str]:
        return {i: t for t, i in self._vocab.items()}

    @property
    def vocab_size(self) -> int:
        return BYTE_VOCAB_SIZE

    @property
    def eod(self) -> int:
        return BYTE_EOD_ID

    @property
    def eos_id(self) -> int:
        return BYTE_EOD_ID

    @property
    def pad_id(self) -> int:
        return BYTE_PAD_ID

    @property
    def bos_id(self) -> None:
        return None

    @property
    def unk_id(self) -> None:
        return None  # every byte string is representable

    @property
    def mask_id(self) -> None:
        return None

    @property
    def cls_id(self) -> None:
        return None

    @property
    def sep_id(self) -> None:
        return None

    @property
    def additional_special_tokens_ids(self) -> list[int]:
        return []


class ByteTokenizer(MegatronTokenizerText):
    """Byte-level tokenizer with megatron-core's tokenizer interface.

    ``tokenize``/``detokenize``, ``vocab_size`` (257), ``eod``/``eos`` (256), ``pad`` (-1: none),
    ``vocab``, ``offsets`` and ``unique_identifiers`` (which megatron's dataset cache hashes) all
    behave as for the tokenizers ``megatron.training`` builds itself. Build it with
    :func:`build_byte_tokenizer` or, in a megatron run, ``--tokenizer-type ByteLevel`` after
    :func:`install_byte_level_tokenizer`.
    """

    def __init__(self) -> None:
        config = {
            "library": "byte-level",
            "model_type": "gpt",
            "chat_template": None,
            "class_name": type(self).__name__,
            "class_path": type(self).__module__,
        }
        super().__init__(None, config)

    def _restore_model(self, **kwargs: Any) -> ByteLevelCodec:
        # megatron-core would look the library class up by name among its own libraries.
        return ByteLevelCodec()

    def tokenize_to_array(self, text: str) -> np.ndarray:
        """Fast path for bulk preprocessing: the UTF-8 bytes of ``text`` as a uint8 array."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

    @property
    def unique_identifiers(self) -> OrderedDict:
        return OrderedDict(
            [
                ("class", f"{type(self).__module__}.{type(self).__qualname__}"),
                ("vocab_size", BYTE_VOCAB_SIZE),
                ("eod", BYTE_EOD_ID),
                ("pad", BYTE_PAD_ID),
            ]
        )

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={BYTE_VOCAB_SIZE}, eod={BYTE_EOD_ID})"


def build_byte_tokenizer() -> ByteTokenizer:
    """The byte-level tokenizer (stateless; every call returns an equivalent object)."""
    return ByteTokenizer()


# --------------------------------------------------------------------------------------------
# megatron.training integration (no patching: plain functions megatron can call)
# --------------------------------------------------------------------------------------------


def _require_transformers(args: argparse.Namespace) -> None:
    """Fail early and clearly where megatron would fail late or try to download.

    megatron's ``HuggingFaceTokenizer`` wraps ``transformers.AutoTokenizer``; without
    ``transformers`` it dies with a ``NameError``, and given a name that is not a local path
    ``AutoTokenizer`` tries the Hugging Face Hub.
    """
    if importlib.util.find_spec("transformers") is None:
        raise RuntimeError(
            "--tokenizer-type HuggingFaceTokenizer needs the 'transformers' package, which is not "
            "installed (pip install transformers)"
        )
    if not args.tokenizer_model:
        raise RuntimeError("--tokenizer-type HuggingFaceTokenizer needs --tokenizer-model DIR")


def build_tokenizer(args: argparse.Namespace, **kwargs: Any) -> Any:
    """megatron-core's ``build_tokenizer(args)`` plus ``args.tokenizer_type == "ByteLevel"``.

    For ``ByteLevel`` it also sets ``args.padded_vocab_size`` exactly as megatron does for its own
    tokenizers (257 rounded up to ``make_vocab_size_divisible_by * TP``), since model building
    reads that attribute. Every other type goes to megatron-core unchanged.
    """
    # The module, not the same-named function in it (megatron.training imported the latter).
    core_build = importlib.import_module("megatron.core.tokenizers.utils.build_tokenizer")

    if getattr(args, "tokenizer_type", None) == BYTE_LEVEL_TOKENIZER_TYPE:
        tokenizer = build_byte_tokenizer()
        if (
            getattr(args, "pad_vocab_size", True)
            and getattr(args, "padded_vocab_size", None) is None
        ):
            core_build._set_padded_vocab_size(args, tokenizer)
        return tokenizer
    if getattr(args, "tokenizer_type", None) == "HuggingFaceTokenizer":
        _require_transformers(args)
    return core_build.build_tokenizer(args, **kwargs)


def add_byte_level_tokenizer_choice(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Let ``--tokenizer-type`` accept ``ByteLevel`` on a parser that has megatron's tokenizer
    arguments (megatron derives the choices from a ``Literal`` type, so they cannot be extended
    by declaring the argument again). Returns ``parser``, so it also works as (part of) an
    ``extra_args_provider``."""
    action = parser._option_string_actions.get("--tokenizer-type")  # noqa: SLF001 (argparse)
    if action is None:
        raise ValueError("parser has no --tokenizer-type argument (add megatron's args first)")
    choices = tuple(action.choices or ())
    if BYTE_LEVEL_TOKENIZER_TYPE not in choices:
        action.choices = (*choices, BYTE_LEVEL_TOKENIZER_TYPE)
    return parser
