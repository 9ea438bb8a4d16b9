"""The simulated model's tokenizer: stable, cheap, close to a real SPM vocabulary on English.

A token is a word or a punctuation mark with the whitespace in front of it,
so ``"Hello, world."`` is four tokens (five with BOS). Common English words
are single tokens in llama's 32000-token vocabulary too, which keeps the
simulator's token counts within a few per cent of the real tiny model's on
plain prose. Token ids are a CRC of the piece: the same text always gives the
same ids, in every process, so prompt caches and prefixes behave as on a real
server.
"""

from __future__ import annotations

import re
import zlib

N_VOCAB = 32000
BOS_ID = 1
EOS_ID = 2
BOS_TEXT = "<s>"
EOS_TEXT = "</s>"

_PIECE = re.compile(r"\s*(?:\w+|[^\w\s])|\s+$")

#: What the simulated model generates: each token is one of these pieces.
FILLER_WORDS: tuple[str, ...] = (
    " the", " slot", " model", " token", " server", " queue", " prompt", " cache",
    " of", " and", " a", " to", " in", " is", " that", " for", " it", " with",
    " llama", " paddler", " balance", " load", " stream", " reply", " quick",
    " brown", " fox", " jumps", " over", " lazy", " dog", " river", " boat",
    " paddle", " water", " current", " upstream", " downstream", " fleet",
    " request", " answer", " simple", " steps", " website", " story", " once",
    " upon", " time", " there", " was", ",", ".", " we", " they", " then",
    " after", " before", " while", " every", " second", " minute", " hour",
    " day", " night",
)


def split_pieces(text: str) -> list[str]:
    """Split text into the simulator's token pieces: a word or a punctuation
    mark, each with the whitespace in front of it."""
    return _PIECE.findall(text)


def piece_id(piece: str) -> int:
    """The stable token id of a piece (a hash into a 32000-token vocabulary)."""
    return 3 + zlib.crc32(piece.encode("utf-8")) % (N_VOCAB - 3)


_PIECE_BY_ID: dict[int, str] = {piece_id(word): word for word in FILLER_WORDS}
_PIECE_BY_ID[BOS_ID] = BOS_TEXT
_PIECE_BY_ID[EOS_ID] = EOS_TEXT


def tokenize(text: str, add_bos: bool = True) -> list[int]:
    """Tokenize like the simulated model: optional BOS, then one token per piece."""
    tokens = [BOS_ID] if add_bos else []
    tokens.extend(piece_id(piece) for piece in split_pieces(text))
    return tokens


def piece_text(token: int) -> str:
    """The text of a token id the simulator generated (filler words, BOS, EOS).

    Ids of arbitrary prompt words cannot be reversed (they are hashes) and
    come back as C{" <unk>"}.
    """
    return _PIECE_BY_ID.get(token, " <unk>")
