#!/usr/bin/env python3
"""Developer-run oracle: PEFT LoRA adapters on the tiny random base models of
make_fixtures.py, saved with PeftModel.save_pretrained, and float64 goldens of the
adapted model (per-token loss, and a/g of every LoRA A and B linear layer).

Never run by CI or by the product. See test/oracle/README.md.

Usage (from the repo root, after make_fixtures.py and make_variants.py):
    test/oracle/.venv/bin/python test/oracle/make_lora.py [NAME ...]   (default: all)
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402

# name -> (base model dir, LoRA settings). The GPT-2 one targets Conv1D layers, which PEFT
# only adapts with fan_in_fan_out=True; the Llama one uses rsLoRA's scaling on another.
ADAPTERS = {
    "llama_lora": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])),
    "llama_rslora": ("llama", dict(r=4, lora_alpha=6, target_modules=["o_proj", "up_proj"], use_rslora=True)),
    "gpt2_lora": ("gpt2", dict(r=2, lora_alpha=5, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)),
    # Phi-3's fused projections, as PEFT adapts them: one LoRA pair for all of q/k/v, one for gate/up
    "phi3_lora": ("phi3", dict(r=4, lora_alpha=8, target_modules=["qkv_proj", "gate_up_proj", "o_proj"])),
}


def build_adapter(name, base_name, settings, seed):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base_dir = mf.MODELS / base_name
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    cfg = LoraConfig(lora_dropout=0.1, bias="none", task_type="CAUSAL_LM", **settings)
    peft_model = get_peft_model(base, cfg)
    # PEFT starts B at zero (the adapter changes nothing); random A and B make it matter.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    out = mf.MODELS / name
    shutil.rmtree(out, ignore_errors=True)
    peft_model.save_pretrained(out)
    # The base, relative to the adapter folder (PEFT wrote the path we loaded it from).
    cfg_path = out / "adapter_config.json"
    c = json.loads(cfg_path.read_text())
    c["base_model_name_or_path"] = f"../{base_name}"
    c["target_modules"] = sorted(c["target_modules"])  # PEFT writes a set, in hash order
    cfg_path.write_text(json.dumps(c, indent=2, sort_keys=True) + "\n")
    (out / "README.md").unlink(missing_ok=True)  # PEFT's model card template
    return out


def compute_goldens(name, base_name, adapter_dir, batch):
    from peft import PeftModel
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    ids, mask, tgt, w = batch
    base = AutoModelForCausalLM.from_pretrained(mf.MODELS / base_name, attn_implementation="eager", dtype=torch.float32)
    model = PeftModel.from_pretrained(base.double(), adapter_dir, is_trainable=True).double().eval()
    lora = {}
    for mname, m in model.named_modules():
        for part in ("lora_A", "lora_B"):
            if mname.endswith(f".{part}.default"):
                lora[mname[: -len(".default")]] = m
    assert lora, name
    acts, outs = {}, {}

    def mk_hook(mname):
        def hook(mod, inp, outp):
            assert mname not in acts, f"{mname} called twice"
            acts[mname] = inp[0].detach().clone()
            outp.retain_grad()
            outs[mname] = outp

        return hook

    hooks = [m.register_forward_hook(mk_hook(n)) for n, m in lora.items()]
    res = model(input_ids=ids, attention_mask=mask, use_cache=False)
    logits = res.logits
    assert logits.dtype == torch.float64
    nll = -torch.log_softmax(logits, dim=-1).gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
    loss = (w.double() * nll).sum(-1)
    loss.sum().backward()
    for h in hooks:
        h.remove()
    B, T = ids.shape
    tensors = {
        "input_ids": ids.clone(),
        "attention_mask": mask.clone(),
        "target_ids": tgt.clone(),
        "target_weights": w.clone(),
        "token_nll": nll.detach().float(),
        "loss": loss.detach().float(),
    }
    for mname, m in lora.items():
        a = acts[mname].reshape(B * T, -1)
        g = outs[mname].grad.reshape(B * T, -1)
        tensors[f"a.{mname}"] = a.float()
        tensors[f"g.{mname}"] = g.float()
        # self-check: the LoRA weight's gradient is Σ_t g_t a_tᵀ (dropout off, no bias)
        assert m.bias is None
        assert torch.allclose(m.weight.grad, g.T @ a, rtol=1e-9, atol=1e-12), mname
    # the adapter matters: the base alone gives other losses
    with model.disable_adapter(), torch.no_grad():
        base_logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    diff = (base_logits - logits).abs().max().item()
    assert diff > 1e-2, f"{name}: the adapter changes the logits by only {diff}"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(mf.GOLDEN / f"{name}.safetensors"),
              metadata={"model": name})
    print(f"[{name}] {len(lora)} LoRA modules, loss={[round(x, 4) for x in loss.tolist()]}, "
          f"adapter moves logits by up to {diff:.3f}")


def main():
    from tokenizers import Tokenizer

    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    tok = Tokenizer.from_file(str(mf.MODELS / "llama" / "tokenizer.json"))
    batch = mf.make_batch(tok)
    names = sys.argv[1:] or list(ADAPTERS)
    unknown = [n for n in names if n not in ADAPTERS]
    assert not unknown, f"unknown adapters {unknown} (known: {list(ADAPTERS)})"
    for i, (name, (base_name, settings)) in enumerate(ADAPTERS.items()):
        if name not in names:
            continue
        out = build_adapter(name, base_name, settings, seed=1400 + i)
        mf.install_float64_patches()
        compute_goldens(name, base_name, out, batch)
    import peft

    print("versions: torch", torch.__version__, "peft", peft.__version__)


if __name__ == "__main__":
    main()
