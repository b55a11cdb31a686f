"""A model folder for `--load-format dummy`: a config of a named shape and a small tokenizer.

Weights cannot travel to a bare GPU host (16 GB for Llama-3-8B), and throughput does not depend on
their values: SGLang's dummy loader fills them at random, and `ignore_eos` fixes the output
length. The folder holds the shape's `config.json` and SmolLM2's tokenizer (vocabulary 49152,
shipped gzipped in bench/models/tokenizer), so the model's embedding and head are that size.

    lsa-bench dummy-model --shape llama3-8b --out DIR      (prints DIR)
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import sys
from pathlib import Path

TOKENIZER = Path(__file__).resolve().parents[2] / "bench" / "models" / "tokenizer"
VOCAB = 49152

_LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "attention_bias": False,
    "mlp_bias": False, "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "vocab_size": VOCAB,
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
}
SHAPES = {
    # Llama-3-8B's attention and MLP (32 layers, 8 KV heads of 128: 128 KiB of bf16 KV per token)
    "llama3-8b": {**_LLAMA, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                  "max_position_embeddings": 131072, "rope_theta": 500000.0, "torch_dtype": "bfloat16"},
    # a few MB, for the CPU smoke form of the GPU checks
    "tiny": {**_LLAMA, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4,
             "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
             "max_position_embeddings": 8192, "rope_theta": 100000.0, "torch_dtype": "float32"},
}


def write(shape: str, out: Path) -> Path:
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    out.mkdir(parents=True, exist_ok=True)
    cfg = dict(SHAPES[shape])
    cfg["rope_parameters"] = {"rope_theta": cfg["rope_theta"], "rope_type": "default"}
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    with gzip.open(TOKENIZER / "tokenizer.json.gz", "rb") as src, open(out / "tokenizer.json", "wb") as dst:
        shutil.copyfileobj(src, dst)
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        shutil.copyfile(TOKENIZER / name, out / name)
    return out


def main(argv: list[str] | None = None, prog: str = "lsa-bench dummy-model") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    print(write(args.shape, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
