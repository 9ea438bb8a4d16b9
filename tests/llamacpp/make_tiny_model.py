"""Write a tiny random-weight llama GGUF that a real llama-server can load.

The tokenizer comes from a vocab-only GGUF (llama.cpp ships them under
``models/``, e.g. ``ggml-vocab-llama-spm.gguf``); every ``tokenizer.*`` key is
copied, and a ChatML ``tokenizer.chat_template`` is added so that
``/v1/chat/completions`` works. The weights are random normal with a fixed
seed (norms are 1), so the same vocab gives the same model every time. The
model says nothing sensible; it is only fast and real.

    python make_tiny_model.py --vocab ggml-vocab-llama-spm.gguf --out tiny.gguf
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter

ARCH = "llama"
N_LAYER = 2
N_EMBD = 128
N_HEAD = 4
N_HEAD_KV = 4
N_FF = 256
N_CTX = 2048
RMS_EPS = 1e-5
ROPE_FREQ_BASE = 10000.0
SEED = 20240801
WEIGHT_STD = 0.02

CHATML = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _scalar(part: np.ndarray, vtype: GGUFValueType) -> Any:
    if vtype == GGUFValueType.STRING:
        return bytes(part).decode("utf-8")
    value = part.tolist()[0]
    return bool(value) if vtype == GGUFValueType.BOOL else value


TokenizerKey = tuple[str, Any, GGUFValueType, "GGUFValueType | None"]


def read_tokenizer(path: str) -> list[TokenizerKey]:
    """Return every ``tokenizer.*`` key of a GGUF file as (key, value, type, subtype).

    Decodes ``ReaderField.parts`` directly rather than ``contents()`` so it
    works with old and new ``gguf`` releases alike.
    """
    reader = GGUFReader(path)
    keys: list[TokenizerKey] = []
    for name, field in reader.fields.items():
        if not name.startswith("tokenizer."):
            continue
        vtype = GGUFValueType(field.types[0])
        if vtype == GGUFValueType.ARRAY:
            sub = GGUFValueType(field.types[-1])
            value = [_scalar(field.parts[i], sub) for i in field.data]
            keys.append((name, value, vtype, sub))
        else:
            keys.append((name, _scalar(field.parts[field.data[0]], vtype), vtype, None))
    return keys


def write_model(vocab_path: str, out_path: str) -> None:
    """Write the tiny model to ``out_path`` (via a temporary name, then rename)."""
    tokenizer = read_tokenizer(vocab_path)
    tokens = next(value for key, value, _, _ in tokenizer if key == "tokenizer.ggml.tokens")
    n_vocab = len(tokens)
    head_dim = N_EMBD // N_HEAD

    tmp_path = out_path + ".tmp"
    writer = GGUFWriter(tmp_path, ARCH)
    writer.add_name("paddler-tiny")
    writer.add_context_length(N_CTX)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_LAYER)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD_KV)
    writer.add_layer_norm_rms_eps(RMS_EPS)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(ROPE_FREQ_BASE)
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(0)  # all F32
    for key, value, vtype, sub in tokenizer:
        if key == "tokenizer.chat_template":
            continue
        writer.add_key_value(key, value, vtype, sub)
    writer.add_chat_template(CHATML)

    rng = np.random.default_rng(SEED)

    def normal(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * WEIGHT_STD).astype(np.float32)

    def ones(n: int) -> np.ndarray:
        return np.ones(n, dtype=np.float32)

    # numpy shapes are ggml's ne reversed: (rows = outputs, cols = inputs).
    writer.add_tensor("token_embd.weight", normal(n_vocab, N_EMBD))
    for i in range(N_LAYER):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", ones(N_EMBD))
        writer.add_tensor(f"blk.{i}.attn_q.weight", normal(N_HEAD * head_dim, N_EMBD))
        writer.add_tensor(f"blk.{i}.attn_k.weight", normal(N_HEAD_KV * head_dim, N_EMBD))
        writer.add_tensor(f"blk.{i}.attn_v.weight", normal(N_HEAD_KV * head_dim, N_EMBD))
        writer.add_tensor(f"blk.{i}.attn_output.weight", normal(N_EMBD, N_HEAD * head_dim))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", ones(N_EMBD))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", normal(N_FF, N_EMBD))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", normal(N_FF, N_EMBD))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", normal(N_EMBD, N_FF))
    writer.add_tensor("output_norm.weight", ones(N_EMBD))
    writer.add_tensor("output.weight", normal(n_vocab, N_EMBD))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp_path, out_path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", required=True, help="a vocab-only GGUF from llama.cpp's models/")
    parser.add_argument("--out", required=True, help="where to write the model")
    args = parser.parse_args(argv)
    write_model(args.vocab, args.out)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
