#!/usr/bin/env python3
"""Developer-run: train a bench checkpoint for a few steps, so that the kronfluence comparison
also runs on weights that are not a random init.

Random weights give near-uniform next-token distributions and gradients of one scale; a trained
model has peaked distributions, memorised sequences with tiny gradients and a wide dynamic range
in its activations, which is where float32 arithmetic can go wrong silently. This trains on the
bench's own English text (tools/bench/shape-text.txt), so the bench's training sequences are
partly memorised when the comparison runs.

With --lora q,v,... it trains a PEFT LoRA adapter over <model-dir> instead (PeftModel.save_pretrained
layout), for the same comparison on an adapter.

Usage (from the repo root):
    test/oracle/.venv/bin/python test/oracle/train_shape.py <model-dir> <out-dir> [--steps 150] [--lora targets]
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("out")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    p.add_argument("--lora", help="train a PEFT LoRA adapter on these comma-separated target modules "
                   "instead of the whole model, and save the adapter (base_model_name_or_path = <model>)")
    p.add_argument("--lora-r", type=int, default=8)
    a = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(a.threads)
    src = Path(a.model)
    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    text = (ROOT / "tools/bench/shape-text.txt").read_text()
    ids = torch.tensor(tok.encode(text, add_special_tokens=False).ids)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    if a.lora:
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=a.lora_r, lora_alpha=2 * a.lora_r, lora_dropout=0.0, bias="none",
                         task_type="CAUSAL_LM", target_modules=a.lora.split(","))
        model = get_peft_model(model, cfg)
    model.train()
    # dropout off: the comparison is about the weights, and the model's configs have none anyway
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=a.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))
    n = len(ids) - a.length
    t0 = time.time()
    for step in range(a.steps):
        starts = torch.randint(0, n, (a.batch,))
        x = torch.stack([ids[s : s + a.length] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 10 == 0 or step == a.steps - 1:
            print(f"step {step} loss {loss.item():.3f} ({time.time() - t0:.0f} s)", flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    if a.lora:
        # PEFT writes the base's config name_or_path; point it at the base folder itself
        conf = json.loads((out / "adapter_config.json").read_text())
        conf["base_model_name_or_path"] = str(src.resolve())
        (out / "adapter_config.json").write_text(json.dumps(conf, indent=2))
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (src / f).exists():
            shutil.copy(src / f, out / f)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
