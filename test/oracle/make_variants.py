#!/usr/bin/env python3
"""Developer-run oracle: config variants of the Llama family that change the forward
pass (per-layer sliding window, biases, head_dim != hidden/heads, linear RoPE scaling,
Qwen3's per-head query/key norms), Phi-3 (fused projections, partial RoPE, longrope) and
Gemma 3 (text),
as tiny random checkpoints with float64 forward/backward goldens. Reuses the tokenizer,
batch and golden code of make_fixtures.py, so the files have the same layout.

Never run by CI or by the product. See test/oracle/README.md.

Usage (from the repo root, after make_fixtures.py has made test/fixtures/models/llama):
    test/oracle/.venv/bin/python test/oracle/make_variants.py [NAME ...]   (default: all)
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402

VARIANTS = ["qwen2_swa", "llama_variant", "qwen3", "gemma3", "phi3", "phi3_longrope"]
SEEDS = {"qwen2_swa": 2000, "llama_variant": 2001, "qwen3": 2002, "gemma3": 2003, "phi3": 2004, "phi3_longrope": 2005}


def make_config(name, vocab):
    from transformers import Gemma3TextConfig, LlamaConfig, Phi3Config, Qwen2Config, Qwen3Config

    common = dict(vocab_size=vocab, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if name == "qwen2_swa":
        # Qwen2 keeps the first max_window_layers layers on full attention and slides the
        # window on the rest; transformers 5 writes the result as layer_types.
        cfg = Qwen2Config(
            hidden_size=mf.HIDDEN, num_hidden_layers=2, num_attention_heads=mf.HEADS,
            num_key_value_heads=2, intermediate_size=mf.INTER, max_position_embeddings=mf.MAXPOS,
            hidden_act="silu", rms_norm_eps=1e-6, initializer_range=0.2, tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            use_sliding_window=True, sliding_window=4, max_window_layers=1,
            **common,
        )
        assert cfg.layer_types == ["full_attention", "sliding_attention"], cfg.layer_types
        return cfg
    if name == "llama_variant":
        # every optional Llama feature at once: q/k/v/o biases, MLP biases, a head_dim
        # larger than hidden/heads, linear RoPE scaling, untied head.
        return LlamaConfig(
            hidden_size=mf.HIDDEN, num_hidden_layers=2, num_attention_heads=mf.HEADS,
            num_key_value_heads=2, head_dim=12, intermediate_size=mf.INTER,
            max_position_embeddings=mf.MAXPOS, hidden_act="silu", rms_norm_eps=1e-5,
            initializer_range=0.2, tie_word_embeddings=False,
            rope_parameters={"rope_type": "linear", "rope_theta": 500.0, "factor": 2.0},
            attention_bias=True, mlp_bias=True,
            **common,
        )
    if name == "qwen3":
        # Qwen3: RMSNorm of each query and key head before RoPE; here also everything optional
        # at once: q/k/v/o biases (attention_bias), a head_dim other than hidden/heads, a tied
        # head (as Qwen3-0.6B) and the window on layer 1 only.
        cfg = Qwen3Config(
            hidden_size=mf.HIDDEN, num_hidden_layers=2, num_attention_heads=mf.HEADS,
            num_key_value_heads=2, head_dim=12, intermediate_size=mf.INTER,
            max_position_embeddings=mf.MAXPOS, hidden_act="silu", rms_norm_eps=1e-6,
            initializer_range=0.2, tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            attention_bias=True, use_sliding_window=True, sliding_window=4, max_window_layers=1,
            **common,
        )
        assert cfg.layer_types == ["full_attention", "sliding_attention"], cfg.layer_types
        return cfg
    if name == "gemma3":
        # Gemma 3 text (Gemma3ForCausalLM): sliding layers around a full one, each kind with its
        # own RoPE (linear scaling on the full layer, as Gemma-3-4B), query_pre_attn_scalar other
        # than head_dim, head_dim other than hidden/heads, q/k/v/o biases, tied head.
        cfg = Gemma3TextConfig(
            hidden_size=mf.HIDDEN, num_hidden_layers=3, num_attention_heads=mf.HEADS,
            num_key_value_heads=2, head_dim=12, intermediate_size=mf.INTER,
            max_position_embeddings=mf.MAXPOS, hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6,
            initializer_range=0.2, tie_word_embeddings=True, attention_bias=True, query_pre_attn_scalar=10,
            sliding_window=4, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 50.0},
            },
            **common,
        )
        return cfg
    if name == "phi3":
        # Phi-3: q/k/v from one qkv_proj, gate/up from one gate_up_proj, GQA, half of each head
        # rotated (partial_rotary_factor 0.5, as a top-level key like Phi-4-mini's), a sliding
        # window on every layer, untied head.
        return Phi3Config(
            hidden_size=mf.HIDDEN, num_hidden_layers=2, num_attention_heads=mf.HEADS,
            num_key_value_heads=2, intermediate_size=mf.INTER, max_position_embeddings=mf.MAXPOS,
            original_max_position_embeddings=mf.MAXPOS, hidden_act="silu", rms_norm_eps=1e-5,
            initializer_range=0.2, tie_word_embeddings=False, sliding_window=5,
            rope_parameters={"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 0.5},
            **common,
        )
    if name == "phi3_longrope":
        # Phi-3.5 / Phi-4-mini's LongRoPE, short factors (every sequence is within the original
        # context), max_position_embeddings 4x it so that cos and sin are scaled by
        # sqrt(1 + ln 4 / ln 64); 6 of each head's 8 features rotated (0.75, as Phi-4-mini), tied head.
        return Phi3Config(
            hidden_size=mf.HIDDEN, num_hidden_layers=2, num_attention_heads=mf.HEADS,
            num_key_value_heads=mf.HEADS, intermediate_size=mf.INTER, max_position_embeddings=4 * mf.MAXPOS,
            original_max_position_embeddings=mf.MAXPOS, hidden_act="silu", rms_norm_eps=1e-5,
            initializer_range=0.2, tie_word_embeddings=True,
            rope_parameters={
                "rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
                "short_factor": [1.0, 1.7, 3.1], "long_factor": [2.0, 5.0, 9.0],
            },
            **common,
        )
    raise ValueError(name)


def install_gemma3_float64_patches():
    """Gemma3RMSNorm and its rotary embedding compute in float32 whatever the input: in float64
    for the goldens, as make_fixtures.py does for the other families."""
    from transformers.models.gemma3 import modeling_gemma3 as gemma3

    def norm_forward(self, x):
        dt = torch.float64 if x.dtype == torch.float64 else torch.float32
        h = x.to(dt)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.to(dt))).type_as(x)

    @torch.no_grad()
    def rotary_forward(self, x, position_ids, layer_type):
        dt = torch.float64 if x.dtype == torch.float64 else torch.float32
        inv_freq = getattr(self, f"{layer_type}_inv_freq")
        scaling = getattr(self, f"{layer_type}_attention_scaling")
        freqs = position_ids[..., None].to(dt) * inv_freq.to(device=x.device, dtype=dt)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * scaling).to(dtype=x.dtype), (emb.sin() * scaling).to(dtype=x.dtype)

    gemma3.Gemma3RMSNorm.forward = norm_forward
    gemma3.Gemma3RotaryEmbedding.forward = rotary_forward


def build(name, vocab, hf_tok):
    from transformers import AutoModelForCausalLM

    cfg = make_config(name, vocab)
    torch.manual_seed(SEEDS[name])
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    mf.randomize_(model, SEEDS[name])
    model.eval()
    d = mf.MODELS / name
    if d.exists():
        import shutil

        shutil.rmtree(d)
    d.mkdir(parents=True)
    model.save_pretrained(d, safe_serialization=True)
    hf_tok.save_pretrained(d)
    return d


def check_per_layer_window(model_dir):
    """Layer 0 must see the whole prefix and layer 1 only the window: changing token 0
    changes the logits at the last position (through layer 0, then layer 1's window
    over positions that saw token 0); with the window on every layer it could not."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").double().eval()
    ids = torch.arange(1, 13).unsqueeze(0)
    ids2 = ids.clone()
    ids2[0, 0] = 50
    with torch.no_grad():
        diff = (model(input_ids=ids).logits - model(input_ids=ids2).logits).abs().amax(-1)[0]
    print(f"[{model_dir.name}] per-layer window check: max |dlogits| = {[f'{x:.1e}' for x in diff.tolist()]}")
    assert diff[11] > 0, "layer 0 should attend over the full prefix"


def main():
    from safetensors import safe_open
    from safetensors.torch import save_file
    from tokenizers import Tokenizer

    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    names = sys.argv[1:] or VARIANTS
    unknown = [n for n in names if n not in VARIANTS]
    assert not unknown, f"unknown variants {unknown} (known: {VARIANTS})"
    hf_tok = mf.wrap_tokenizer(mf.build_tokenizer())
    vocab = hf_tok.backend_tokenizer.get_vocab_size()
    for name in names:
        build(name, vocab, hf_tok)
    tok = Tokenizer.from_file(str(mf.MODELS / "llama" / "tokenizer.json"))
    for name in names:
        assert (mf.MODELS / name / "tokenizer.json").read_bytes() == (mf.MODELS / "llama" / "tokenizer.json").read_bytes()
    batch = mf.make_batch(tok)
    mf.install_float64_patches()
    install_gemma3_float64_patches()
    for name in names:
        mf.compute_goldens(name, mf.MODELS / name, batch)
        # the engine tests do not read the logits: drop them to keep the fixture small
        path = mf.GOLDEN / f"{name}.safetensors"
        with safe_open(str(path), "pt") as f:
            kept = {k: f.get_tensor(k) for k in f.keys() if k != "logits"}
        save_file(kept, str(path), metadata={"model": name})
    for name in names:
        if name in ("qwen2_swa", "qwen3", "gemma3"):
            check_per_layer_window(mf.MODELS / name)


if __name__ == "__main__":
    main()
