#!/usr/bin/env python3
"""Developer-run oracle: builds tiny random-weight HF causal LMs, a shared tiny
byte-level BPE tokenizer, and float64-computed golden tensors for the
TypeScript implementation of Influence Lens.

Never run by CI or by the product. See test/oracle/README.md.

Usage (from the repo root):
    test/oracle/.venv/bin/python test/oracle/make_fixtures.py
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import torch
import torch.nn as nn

REPO = Path(__file__).resolve().parents[2]
FIX = REPO / "test" / "fixtures"
MODELS = FIX / "models"
GOLDEN = FIX / "golden"

B, T = 3, 12
LENGTHS = [12, 8, 12]
ROW2_WEIGHTED = range(5, 11)  # positions 5..10 inclusive have weight 1 in row 2
PAD_ID = 0
SPECIAL = "<|endoftext|>"
VOCAB_TARGET = 320

CORPUS = """\
The quick brown fox jumps over the lazy dog. The dog sleeps in the sun, and the fox
runs into the forest to look for food. Every morning the farmer opens the gate and
counts the sheep, one by one, until the last one is in the field.

Influence functions ask a simple question: which training examples made the model
say this? To answer it we look at gradients of the loss with respect to the weights,
and we compare the gradient of a query with the gradients of many training documents.

In a small café in Zürich, a naïve student ordered a crème brûlée and a coffee. The
waiter smiled 👍 and said: "Of course, it will be ready in a minute." Outside, the
rain kept falling on the old streets of the city, and the trams rang their bells.

Models learn patterns from data. Tokens are pieces of words; a tokenizer splits text
into tokens, and the model predicts the next token given the previous ones. Numbers
like 1, 2, 3, 42 and 2024 appear too, as do symbols such as #, @, % and &.
Tokyo is written 東京 in Japanese. Good morning! Good night! 😀
"""

SENTENCES = [
    "The quick brown fox jumps over the lazy dog and runs into the forest.",
    "Influence functions ask which training examples made the model say this.",
    "In a small café in Zürich, a naïve student ordered a coffee and waited.",
]

TOKENIZER_TEST_STRINGS = [
    "The quick brown fox jumps over the lazy dog.",
    "  leading and trailing spaces  ",
    "line one\nline two\n\nline four",
    "café naïve Zürich",
    "👍 ok",
    "東京",
    "Numbers 42 and 2024, symbols #@%&!",
    "\tTabbed\ttext and   multiple   spaces",
]

HIDDEN, LAYERS, HEADS, INTER, MAXPOS = 32, 2, 4, 64, 64


# --------------------------------------------------------------------------- #
# float64 purity patches: HF upcasts some ops to float32 (softmax dtype, RMSNorm,
# rotary cos/sin). When the model is float64 we keep everything float64.
# (inv_freq itself is still computed by HF in float32 at init; its float32-rounded
# values are what HF models use, so we keep them.)
# --------------------------------------------------------------------------- #
_orig_softmax = torch.nn.functional.softmax


def _softmax64(input, dim=None, _stacklevel=3, dtype=None):  # noqa: A002
    if dtype is not None and input.dtype == torch.float64:
        dtype = torch.float64
    return _orig_softmax(input, dim=dim, _stacklevel=_stacklevel, dtype=dtype)


def _rmsnorm_forward(self, hidden_states):
    input_dtype = hidden_states.dtype
    h = hidden_states.to(torch.float64) if input_dtype == torch.float64 else hidden_states.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + self.variance_epsilon)
    return self.weight * h.to(input_dtype)


@torch.no_grad()
def _rotary_forward(self, x, position_ids):
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    freqs = position_ids[..., None].to(dt) * self.inv_freq.to(device=x.device, dtype=dt)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos = emb.cos() * self.attention_scaling
    sin = emb.sin() * self.attention_scaling
    return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def install_float64_patches():
    torch.nn.functional.softmax = _softmax64
    from transformers.models.gpt_neox import modeling_gpt_neox as neox
    from transformers.models.llama import modeling_llama as llama
    from transformers.models.mistral import modeling_mistral as mistral
    from transformers.models.phi3 import modeling_phi3 as phi3
    from transformers.models.qwen2 import modeling_qwen2 as qwen2
    from transformers.models.qwen3 import modeling_qwen3 as qwen3

    for cls in (llama.LlamaRMSNorm, qwen2.Qwen2RMSNorm, qwen3.Qwen3RMSNorm, mistral.MistralRMSNorm, phi3.Phi3RMSNorm):
        cls.forward = _rmsnorm_forward
    for cls in (
        llama.LlamaRotaryEmbedding,
        qwen2.Qwen2RotaryEmbedding,
        qwen3.Qwen3RotaryEmbedding,
        mistral.MistralRotaryEmbedding,
        neox.GPTNeoXRotaryEmbedding,
        phi3.Phi3RotaryEmbedding,
    ):
        # keep dynamic_rope_update out: all our rope types are static (Phi-3's longrope keeps its
        # short factors for sequences within the original context, as every golden batch is)
        cls.forward = _rotary_forward


# --------------------------------------------------------------------------- #
# tokenizer
# --------------------------------------------------------------------------- #
def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_TARGET,
        min_frequency=2,
        special_tokens=[SPECIAL],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([CORPUS], trainer=trainer)
    assert tok.token_to_id(SPECIAL) == 0, tok.token_to_id(SPECIAL)
    return tok


def wrap_tokenizer(tok):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL,
        eos_token=SPECIAL,
        pad_token=SPECIAL,
        unk_token=SPECIAL,
        model_max_length=MAXPOS,
        padding_side="right",
        add_bos_token=False,
        add_eos_token=False,
    )


def tokenizer_goldens(tok):
    out = []
    for s in TOKENIZER_TEST_STRINGS:
        enc = tok.encode(s, add_special_tokens=False)
        out.append(
            {
                "text": s,
                "ids": list(enc.ids),
                "tokens": list(enc.tokens),
                "offsets": [list(o) for o in enc.offsets],
                "decoded": tok.decode(enc.ids, skip_special_tokens=False),
            }
        )
    return {
        "note": "Python `tokenizers` Tokenizer.encode(text, add_special_tokens=False); offsets are "
        "[start, end) in Python str indices (Unicode code points), exactly as Python reports them.",
        "tokenizers_version": __import__("tokenizers").__version__,
        "vocab_size": tok.get_vocab_size(),
        "cases": out,
    }


# --------------------------------------------------------------------------- #
# models
# --------------------------------------------------------------------------- #
def make_config(name, vocab):
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=vocab,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    if name == "gpt2":
        return GPT2Config(
            n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=None, n_positions=MAXPOS,
            activation_function="gelu_new", layer_norm_epsilon=1e-5, initializer_range=0.2,
            tie_word_embeddings=True, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            **common,
        )
    if name in ("gpt_neox", "gpt_neox_seq"):
        return GPTNeoXConfig(
            hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
            intermediate_size=INTER, max_position_embeddings=MAXPOS, hidden_act="gelu",
            layer_norm_eps=1e-5, initializer_range=0.2,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
            use_parallel_residual=(name == "gpt_neox"), tie_word_embeddings=False,
            attention_dropout=0.0, hidden_dropout=0.0, attention_bias=True,
            **common,
        )
    if name == "llama":
        # rope_theta 100 + original_max_position_embeddings 32 so that, with head_dim 8
        # (wavelengths 6.3, 19.9, 62.8, 199), all three llama3 branches are exercised:
        # unchanged (< 8), smoothed (8..32), scaled by 1/factor (> 32).
        return LlamaConfig(
            hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
            num_key_value_heads=2, intermediate_size=INTER, max_position_embeddings=MAXPOS,
            hidden_act="silu", rms_norm_eps=1e-5, initializer_range=0.2, tie_word_embeddings=True,
            rope_parameters={
                "rope_type": "llama3", "rope_theta": 100.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 32,
            },
            attention_bias=False, mlp_bias=False,
            **common,
        )
    if name == "qwen2":
        return Qwen2Config(
            hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
            num_key_value_heads=2, intermediate_size=INTER, max_position_embeddings=MAXPOS,
            hidden_act="silu", rms_norm_eps=1e-6, initializer_range=0.2, tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            use_sliding_window=False, sliding_window=None,
            **common,
        )
    if name == "mistral":
        return MistralConfig(
            hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
            num_key_value_heads=1, intermediate_size=INTER, max_position_embeddings=MAXPOS,
            hidden_act="silu", rms_norm_eps=1e-5, initializer_range=0.2, tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            sliding_window=6,
            **common,
        )
    raise ValueError(name)


MODEL_NAMES = ["gpt2", "gpt_neox", "gpt_neox_seq", "llama", "qwen2", "mistral"]
SEEDS = {n: 1000 + i for i, n in enumerate(MODEL_NAMES)}


def randomize_(model, seed):
    """Deterministic re-init independent of HF init code."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():  # tied weights are yielded once
            if pname.endswith("bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g, dtype=torch.float32))
            elif p.dim() == 1:  # LayerNorm / RMSNorm weights
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g, dtype=torch.float32))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g, dtype=torch.float32))


def build_model(name, vocab, hf_tok):
    from transformers import AutoModelForCausalLM

    cfg = make_config(name, vocab)
    torch.manual_seed(SEEDS[name])
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    randomize_(model, SEEDS[name])
    model.eval()
    d = MODELS / name
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    model.save_pretrained(d, safe_serialization=True)
    hf_tok.save_pretrained(d)
    return d


# --------------------------------------------------------------------------- #
# goldens
# --------------------------------------------------------------------------- #
def make_batch(tok):
    ids = torch.zeros(B, T, dtype=torch.int64)
    mask = torch.zeros(B, T, dtype=torch.int64)
    for b, s in enumerate(SENTENCES):
        enc = tok.encode(s, add_special_tokens=False).ids
        assert len(enc) >= LENGTHS[b], (s, len(enc))
        L = LENGTHS[b]
        assert PAD_ID not in enc[:L]
        ids[b, :L] = torch.tensor(enc[:L])
        mask[b, :L] = 1
    tgt = torch.zeros(B, T, dtype=torch.int64)
    w = torch.zeros(B, T, dtype=torch.float32)
    for b in range(B):
        L = LENGTHS[b]
        for t in range(T):
            if t + 1 < L:
                tgt[b, t] = ids[b, t + 1]
        if b == 2:
            for t in ROW2_WEIGHTED:
                w[b, t] = 1.0
        else:
            w[b, : L - 1] = 1.0
    return ids, mask, tgt, w


def is_linear(m):
    from transformers.pytorch_utils import Conv1D

    return isinstance(m, (nn.Linear, Conv1D))


def compute_goldens(name, model_dir, batch):
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    ids, mask, tgt, w = batch
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager", dtype=torch.float32)
    model = model.double().eval()
    model.zero_grad(set_to_none=True)

    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}
    stored_keys = sorted(stored)
    # Map stored safetensors keys -> in-memory parameters. transformers 5 may rename on
    # load (e.g. GPT-NeoX stores `embed_out.weight` but the module is `lm_head`), so fall
    # back to matching by exact value (weights are random, so matches are unique).
    named = dict(model.named_parameters(remove_duplicate=False))
    params = {}
    for k in stored_keys:
        if k in named and torch.equal(named[k].detach().float(), stored[k]):
            params[k] = named[k]
            continue
        cands = {id(p): (n, p) for n, p in named.items()
                 if p.shape == stored[k].shape and torch.equal(p.detach().float(), stored[k])}
        assert len(cands) == 1, f"{name}: cannot map stored key {k}: {[c[0] for c in cands.values()]}"
        (n, p), = cands.values()
        print(f"[{name}] stored key {k!r} is in-memory parameter {n!r}")
        params[k] = p
    assert len({id(p) for p in params.values()}) == len(params), f"{name}: two stored keys share a param"
    n_unique = len({id(p) for p in named.values()})
    assert n_unique == len(params), f"{name}: {n_unique} unique params but {len(params)} stored tensors"

    out_emb = model.get_output_embeddings()
    decoder_linears = []
    for mname, m in model.named_modules():
        if is_linear(m) and m is not out_emb:
            decoder_linears.append(mname)
    acts, outs, hooks = {}, {}, []

    def mk_hook(mname):
        def hook(mod, inp, outp):
            assert mname not in acts, f"{mname} called twice"
            acts[mname] = inp[0].detach().clone()
            outp.retain_grad()
            outs[mname] = outp
        return hook

    mods = dict(model.named_modules())
    for mname in decoder_linears:
        hooks.append(mods[mname].register_forward_hook(mk_hook(mname)))

    res = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
    logits = res.logits  # [B,T,V] float64
    assert logits.dtype == torch.float64
    logp = torch.log_softmax(logits, dim=-1)
    nll = -logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
    loss = (w.double() * nll).sum(-1)
    total = loss.sum()
    total.backward()
    for h in hooks:
        h.remove()

    # last hidden state must be post-final-norm: check lm_head(h) == logits
    h_last = res.hidden_states[-1]
    relogits = out_emb(h_last)
    err = (relogits - logits).abs().max().item()
    assert err < 1e-10, f"{name}: hidden_states[-1] is not post-final-norm (err {err})"
    mf = mask.double().unsqueeze(-1)
    hidden_mean = (h_last * mf).sum(1) / mf.sum(1)

    V = logits.shape[-1]
    tensors = {
        "input_ids": ids.clone(),
        "attention_mask": mask.clone(),
        "target_ids": tgt.clone(),
        "target_weights": w.clone(),
        "logits": logits.detach().float(),
        "token_nll": nll.detach().float(),
        "loss": loss.detach().float(),
        "hidden_mean": hidden_mean.detach().float(),
    }
    for mname in decoder_linears:
        a = acts[mname]
        g = outs[mname].grad
        assert g is not None, mname
        tensors[f"a.{mname}"] = a.reshape(B * T, a.shape[-1]).float()
        tensors[f"g.{mname}"] = g.reshape(B * T, g.shape[-1]).float()
    zero_grads = []
    for k in stored_keys:
        gr = params[k].grad
        assert gr is not None, f"{name}: no grad for {k}"
        if gr.abs().max().item() == 0.0:
            zero_grads.append(k)
        tensors[f"grad.{k}"] = gr.detach().float()
    # self-check: per-module weight/bias gradient == sum over tokens of g (x) a
    pid = {id(p): k for k, p in params.items()}
    for mname in decoder_linears:
        m = mods[mname]
        a64 = acts[mname].reshape(B * T, -1)
        g64 = outs[mname].grad.reshape(B * T, -1)
        gw = g64.T @ a64 if isinstance(m, nn.Linear) else a64.T @ g64  # Conv1D stores [in, out]
        k = pid.get(id(m.weight))
        assert k is not None and torch.allclose(params[k].grad, gw, rtol=1e-9, atol=1e-12), mname
        if m.bias is not None:
            kb = pid[id(m.bias)]
            assert torch.allclose(params[kb].grad, g64.sum(0), rtol=1e-9, atol=1e-12), mname
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    out = GOLDEN / f"{name}.safetensors"
    # single metadata key: safetensors does not keep a stable metadata order
    save_file(tensors, str(out), metadata={"model": name})

    # sanity
    import math

    real = w > 0
    nll_real = nll.detach()[real]
    print(
        f"[{name}] V={V} logV={math.log(V):.4f} nll(weighted) mean={nll_real.mean().item():.4f} "
        f"std={nll_real.std().item():.4f} min={nll_real.min().item():.4f} max={nll_real.max().item():.4f} "
        f"loss={[round(x, 4) for x in loss.tolist()]} logits std={logits.std().item():.4f}"
    )
    mean_abs = {k: tensors[k].abs().mean().item() for k in tensors if k.startswith("grad.")}
    print(f"[{name}] grad mean_abs min={min(mean_abs.values()):.3e} max={max(mean_abs.values()):.3e} "
          f"n_params={len(stored_keys)} n_linears={len(decoder_linears)}")
    if nll_real.std().item() < 1e-2:
        print(f"WARNING [{name}]: token NLL nearly constant (init too small?)")
    if zero_grads:
        print(f"WARNING [{name}]: zero gradients for {zero_grads}")
    return decoder_linears, stored_keys


def check_sliding_window(model_dir):
    """Mistral: verify the window is actually applied (changing a token > window back
    must not change the logits at position t)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").double().eval()
    ids = torch.arange(1, 13).unsqueeze(0)
    ids2 = ids.clone()
    ids2[0, 0] = 50
    with torch.no_grad():
        l1 = model(input_ids=ids).logits
        l2 = model(input_ids=ids2).logits
    diff = (l1 - l2).abs().amax(-1)[0]
    # 2 layers, window 6 => receptive field 2*(6-1)=10 back; position 11 can't see position 0
    print(f"[mistral] sliding-window check: max |dlogits| per position = {[f'{x:.1e}' for x in diff.tolist()]}")
    assert diff[11] == 0 and diff[10] > 0, "sliding window not applied as expected"


def main():
    from safetensors.torch import save_file  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    MODELS.mkdir(parents=True, exist_ok=True)
    GOLDEN.mkdir(parents=True, exist_ok=True)

    trained = build_tokenizer()
    vocab = trained.get_vocab_size()
    print(f"tokenizer vocab size: {vocab}")
    hf_tok = wrap_tokenizer(trained)
    for name in MODEL_NAMES:
        build_model(name, vocab, hf_tok)

    # Everything below uses the tokenizer.json exactly as shipped in the model dirs
    # (transformers rewrites the post_processor to an empty TemplateProcessing on save).
    from tokenizers import Tokenizer

    shipped = [(MODELS / n / "tokenizer.json").read_bytes() for n in MODEL_NAMES]
    assert all(x == shipped[0] for x in shipped), "tokenizer.json differs between model dirs"
    tok = Tokenizer.from_file(str(MODELS / MODEL_NAMES[0] / "tokenizer.json"))
    for s in TOKENIZER_TEST_STRINGS + SENTENCES:
        a, b = tok.encode(s, add_special_tokens=False), trained.encode(s, add_special_tokens=False)
        assert a.ids == b.ids and a.offsets == b.offsets, s
        assert tok.encode(s).ids == a.ids, s  # add_special_tokens=True adds nothing
    with open(GOLDEN / "tokenizer-encodings.json", "w", encoding="utf-8") as f:
        json.dump(tokenizer_goldens(tok), f, ensure_ascii=False, indent=1)
        f.write("\n")

    batch = make_batch(tok)
    print("input_ids:\n", batch[0])

    install_float64_patches()
    for name in MODEL_NAMES:
        compute_goldens(name, MODELS / name, batch)
    check_sliding_window(MODELS / "mistral")

    for name in MODEL_NAMES:
        d = MODELS / name
        m = AutoModelForCausalLM.from_pretrained(d)
        t = AutoTokenizer.from_pretrained(d)
        for s in TOKENIZER_TEST_STRINGS + SENTENCES:
            ids = t(s, add_special_tokens=False)["input_ids"]
            assert ids == tok.encode(s, add_special_tokens=False).ids, (name, s)
            ids = t(s)["input_ids"]  # default add_special_tokens=True must add nothing
            assert ids == tok.encode(s, add_special_tokens=False).ids, (name, s, "special")
        print(f"OK reload {name}: {type(m).__name__} {type(t).__name__} tied={m.config.tie_word_embeddings}")

    import tokenizers
    import transformers
    import safetensors
    print("versions: python", sys.version.split()[0], "torch", torch.__version__, "transformers",
          transformers.__version__, "tokenizers", tokenizers.__version__, "safetensors", safetensors.__version__)


if __name__ == "__main__":
    main()
