#!/usr/bin/env python3
"""Developer-run check of the embedded default (assets/default/): PyTorch `transformers`
loads both checkpoints and their word-level tokenizer, tokenizes every data line exactly
as our TypeScript tokenizer does, and gives the same per-token losses as our engine; the
fine-tuned model's greedy answers to the planted and backdoor questions are the same in
both.

Never run by CI or by the product. Usage (from the repo root, after `npm install`):
    test/oracle/.venv/bin/python test/oracle/check_default.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

REPO = Path(__file__).resolve().parents[2]
DEFAULT = REPO / "assets" / "default"
DATA = DEFAULT / "data"
N_LINES = 6  # per data file, for the loss comparison (each costs one CLI run)
TOL = 1e-4


def lines(name: str) -> list[dict]:
    return [json.loads(l) for l in (DATA / name).read_text().splitlines() if l.strip()]


def ours(model_dir: Path, rec: dict, tmp: Path) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """input_ids, token_nll and target_weights from `influence-lens gradients`."""
    out = tmp / "g.safetensors"
    args = ["--text", rec["text"]] if "text" in rec else ["--prompt", rec["prompt"], "--completion", rec["completion"]]
    cmd = ["node", "--import", "tsx", "src/server/cli.ts", "gradients", "--model", str(model_dir),
           "--modules", "mlp", "--out", str(out), *args]
    env = {**os.environ, "INFLUENCE_LENS_CACHE": str(tmp / "cache")}
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, env=env)
    t = load_file(str(out))
    return t["input_ids"].tolist(), t["token_nll"].double(), t["target_weights"].double()


def main() -> int:
    failures = 0
    texts = [r["text"] for r in lines("pretrain.jsonl")]
    texts += [r["prompt"] + r["completion"] for r in lines("finetune.jsonl")]
    queries = json.loads((DATA / "queries.json").read_text())
    texts += [q["prompt"] + q["completion"] for q in queries]

    for stage in ("pretrained", "finetuned"):
        d = DEFAULT / stage
        raw = Tokenizer.from_file(str(d / "tokenizer.json"))
        auto = AutoTokenizer.from_pretrained(d)
        model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float64).eval()
        unk = auto.unk_token_id
        for s in texts:
            a = auto(s)["input_ids"]
            if a != raw.encode(s).ids or unk in a or auto.decode(a) != s:
                print(f"{stage}: tokenization differs or is lossy for {s!r}")
                failures += 1
        print(f"{stage}: {len(texts)} texts tokenize identically (tokenizers, transformers), no <|unk|>, exact decode")

        with tempfile.TemporaryDirectory() as tmp:
            recs = lines("pretrain.jsonl")[:N_LINES] + lines("finetune.jsonl")[:N_LINES]
            worst = 0.0
            for rec in recs:
                ids, nll, w = ours(d, rec, Path(tmp))
                text = rec.get("text", rec.get("prompt", "") + rec.get("completion", ""))
                if ids != auto(text)["input_ids"]:
                    print(f"{stage}: engine ids differ from transformers for {text!r}")
                    failures += 1
                    continue
                with torch.no_grad():
                    logits = model(torch.tensor([ids])).logits[0]
                ref = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="none")
                err = (nll[:-1] - ref).abs().max().item()
                worst = max(worst, err)
                if err > TOL:
                    print(f"{stage}: per-token loss differs by {err:.2e} on {text!r}")
                    failures += 1
            print(f"{stage}: per-token losses of {len(recs)} lines match transformers (fp64), max abs diff {worst:.2e}")

        if stage == "finetuned":
            for q in queries:
                if q["kind"] == "fact_tracing":
                    continue
                enc = auto(q["prompt"], return_tensors="pt")
                with torch.no_grad():
                    out = model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=auto.pad_token_id)
                got = auto.decode(out[0, enc["input_ids"].shape[1]:]).split("\n")[0]
                ok = got == q["completion"]
                failures += not ok
                print(f"  {q['kind']:8} {q['prompt']!r} → {got!r} {'ok' if ok else 'expected ' + repr(q['completion'])}")

    print("OK" if failures == 0 else f"{failures} FAILURE(S)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
