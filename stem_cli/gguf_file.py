"""What a GGUF file says, read straight from its bytes, and the Gemma tokenizer built from it.

transformers converts GGUF files itself, and how well depends on its version. 5.17 builds
Gemma's vocabulary as a Unigram model scored by the file's BPE ranks, so "▁capital" comes out
as "▁c ap it al"; it adds no <bos>; and the copy it saves reloads as single characters. The
weights are fine, but the model reads garbage and answers garbage. So stem builds the Gemma
tokenizer itself from the vocabulary in the file (the same under every transformers version),
and checks the converted weights against the tensors read here (stem_cli/models.py).

The format (llama.cpp's gguf.md, little-endian): b"GGUF", uint32 version, uint64 tensor count,
uint64 key-value count; the key-value pairs; one record per tensor (name, dims innermost first,
type, offset); then the tensor data, each tensor at its offset from the first multiple of
general.alignment after the records. gguf's GGUFReader makes a numpy view of every array
element, which takes about a minute for Gemma's 262K-token vocabulary; this reads it in a second.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_F32, _F16, _BF16 = 0, 1, 30  # the unquantized tensor types; quantized blocks are left to transformers
CONTROL, USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values


@dataclass
class TensorInfo:
    shape: tuple[int, ...]  # numpy order (outermost first)
    type: int
    offset: int  # from the start of the file


@dataclass
class GgufFile:
    path: Path
    metadata: dict  # key -> int | float | bool | str | list[str] | np.ndarray
    tensors: dict[str, TensorInfo]

    def tensor(self, name: str) -> np.ndarray | None:
        """An unquantized tensor as float32, or None if it is quantized or absent."""
        info = self.tensors.get(name)
        if info is None or info.type not in (_F32, _F16, _BF16):
            return None
        count = int(np.prod(info.shape))
        with open(self.path, "rb") as f:
            f.seek(info.offset)
            raw = f.read(count * (4 if info.type == _F32 else 2))
        if info.type == _F32:
            values = np.frombuffer(raw, "<f4")
        elif info.type == _F16:
            values = np.frombuffer(raw, "<f2").astype(np.float32)
        else:  # bfloat16 is the top half of a float32
            values = (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)
        return values.reshape(info.shape).astype(np.float32)


class _Cursor:
    def __init__(self, buf):
        self.buf, self.pos = buf, 0

    def unpack(self, fmt: str):
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.unpack("<Q")
        self.pos += n
        return bytes(self.buf[self.pos - n:self.pos]).decode("utf-8", errors="replace")

    def value(self, kind: int):
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, n = self.unpack("<I"), self.unpack("<Q")
            if item == _STRING:
                return [self.string() for _ in range(n)]
            if item == _ARRAY:
                return [self.value(_ARRAY) for _ in range(n)]
            dtype = np.dtype(_SCALARS[item])
            values = np.frombuffer(self.buf, dtype, count=n, offset=self.pos).copy()
            self.pos += n * dtype.itemsize
            return values
        return self.unpack(_SCALARS[kind])


def read(path: str | Path) -> GgufFile:
    """The metadata and the tensor index of a GGUF file (v2 or v3); ValueError if it is not one."""
    path = Path(path)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        cur = _Cursor(mm)
        if mm[:4] != b"GGUF":
            raise ValueError(f"{path.name} is not a GGUF file")
        version = cur.unpack("<4xI")
        if version not in (2, 3):
            raise ValueError(f"{path.name} is GGUF version {version} (or big-endian); only little-endian v2/v3 are read")
        n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
        metadata = {}
        for _ in range(n_kv):
            key = cur.string()
            metadata[key] = cur.value(cur.unpack("<I"))
        records = []
        for _ in range(n_tensors):
            name = cur.string()
            dims = [cur.unpack("<Q") for _ in range(cur.unpack("<I"))]
            records.append((name, tuple(reversed(dims)), cur.unpack("<I"), cur.unpack("<Q")))
        align = int(metadata.get("general.alignment", 32))
        data = -(-cur.pos // align) * align
    tensors = {name: TensorInfo(shape, kind, data + offset) for name, shape, kind, offset in records}
    return GgufFile(path, metadata, tensors)


# ---------------------------------------------------------------------------- the Gemma tokenizer


def builds_own_tokenizer(metadata: dict) -> bool:
    """Gemma's SentencePiece vocabulary without merges: the tokenizer transformers 5.17 gets wrong."""
    return (
        str(metadata.get("general.architecture", "")).startswith("gemma")
        and metadata.get("tokenizer.ggml.model") == "llama"
        and "tokenizer.ggml.merges" not in metadata
    )


def _respelled(token: str) -> str:
    """A run of spaces is stored as spaces but looked up as '▁'s (the normalizer turns every space into one)."""
    return "\u2581" * len(token) if token and not token.strip(" ") else token


def bpe_merges(tokens: list[str]) -> list[tuple[str, str]]:
    """Every way of cutting a vocabulary piece into two pieces, best first.

    A SentencePiece BPE vocabulary is stored in merge order (a piece is listed after the pieces
    it is made of), so the file's position is the merge rank; of two cuts of one piece the one
    with the longer left part ranks first. The scores are not used: Gemma's are -1000 for every
    special or added token, whatever its place."""
    index = {t: i for i, t in enumerate(tokens)}
    merges = []
    for rank, piece in enumerate(tokens):
        for cut in range(len(piece) - 1, 0, -1):
            left, right = piece[:cut], piece[cut:]
            if left in index and right in index:
                merges.append((rank, left, right))
    merges.sort(key=lambda m: m[0])  # stable: within one piece the longer left part stays first
    return [(left, right) for _, left, right in merges]


def gemma_tokenizer(metadata: dict):
    """Gemma's tokenizer from the file: byte-fallback BPE over text whose spaces are '▁'.

    Token ids are the file's positions. Control tokens (<bos>, <start_of_turn>, <unused…>) are
    special, user-defined ones ("\\n", "<start_of_image>") are matched whole, as llama.cpp does;
    <bos> (and <eos>) are added as the file's add_bos_token (add_eos_token) say."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    raw = list(metadata["tokenizer.ggml.tokens"])
    tokens = [_respelled(t) for t in raw]
    types = [int(t) for t in metadata.get("tokenizer.ggml.token_type", [1] * len(tokens))]

    def token_of(key: str) -> str | None:
        i = metadata.get(f"tokenizer.ggml.{key}")
        return None if i is None else tokens[int(i)]

    bos, eos, unk, pad = (token_of(k) for k in ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id"))
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=bpe_merges(tokens),
                               unk_token=unk, fuse_unk=True, byte_fallback=True))
    # No pre-tokenizer: after the normalizer there is no space left to split on, and merges span '▁'.
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for t, kind in zip(tokens, types) if kind == CONTROL])
    tok.add_tokens([AddedToken(t, normalized=False, special=False)
                    for t, r, kind in zip(tokens, raw, types) if kind == USER_DEFINED and t == r])

    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", True)) and bos is not None
    add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    pre, post = ([f"{bos}:0"] if add_bos else []), ([f"{eos}:0"] if add_eos else [])
    specials = {t: tokens.index(t) for t in (bos,) * add_bos + (eos,) * add_eos}
    tok.post_processor = processors.TemplateProcessing(
        single=[*pre, "$A:0", *post],
        pair=[*pre, "$A:0", *post, *(s.replace(":0", ":1") for s in pre), "$B:1", *(s.replace(":0", ":1") for s in post)],
        special_tokens=list(specials.items()),
    )
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token=unk, pad_token=pad,
                                  clean_up_tokenization_spaces=False)
    if metadata.get("tokenizer.chat_template"):
        out.chat_template = metadata["tokenizer.chat_template"]
    return out
