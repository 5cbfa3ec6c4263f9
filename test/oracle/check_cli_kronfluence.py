#!/usr/bin/env python3
"""Developer-run, end to end: does `influence-lens explain`, given TEXT (a JSONL corpus and
prompt/completion queries), rank and score the training examples as kronfluence does when the
same text is tokenized independently in Python?

The bench (`npm run bench -- ekfac --shape|--model`) compares the two on token ids it hands to
both; this check starts from text, so it also covers what surrounds the maths: the CLI's
tokenization (BOS/EOS from the tokenizer's post-processor), the prompt/completion loss mask, JSONL
parsing, the factor files written by `fit` and read by `explain`, and the result's example ids.

Python side, independent of our code:
  - ids and offsets from Python `tokenizers` on the model's tokenizer.json (special tokens added
    by its post-processor, as transformers 5 does); a training record {"text"} is scored on every
    target; a query's targets are the tokens whose characters overlap the completion (they must
    form a suffix, else the check stops);
  - kronfluence 1.0.1 through bench_kronfluence.py: EK-FAC, empirical labels (our `fit` defaults
    to sampled ones, the true Fisher, so the check passes `--labels empirical`), all linear modules,
    absolute damping 1e-3, SUM losses;
  - the query's loss -log p(completion | prompt) from transformers directly.
Our side: `influence-lens fit --modules all`, then ONE `influence-lens explain --queries
<file> --damping 1e-3 --top-k <all> --json` (the multi-query path).
Checks per query: the loss agrees to 1e-4 relative, Spearman >= 0.99 over all training
examples, the largest score difference <= 1e-3 of the largest |score|, the same top-5 set.
Exits 1 when a check fails.

With a PEFT LoRA adapter folder as --model, both sides track the adapter's LoRA A and B layers
(kronfluence over `PeftModel.from_pretrained`, our CLI given the adapter folder).

Usage (from the repo root, after `npm run build`):
    test/oracle/.venv/bin/python test/oracle/check_cli_kronfluence.py \
        --model <hf-model-dir> --data <train.jsonl> --queries <queries.jsonl> --out <dir>
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def spearman(x, y):
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    vx = sum((a - mx) ** 2 for a in rx) ** 0.5
    vy = sum((b - my) ** 2 for b in ry) ** 0.5
    return cov / (vx * vy)


def query_ids(tok, prompt, completion):
    """ids of prompt+completion and the index of the first scored token (a token is scored when
    its characters overlap the completion; special tokens, offsets (0, 0), never are)."""
    enc = tok.encode(prompt + completion)
    n = len(prompt)
    scored = [
        j for j, (s, e) in enumerate(enc.offsets) if e > s and e > n and not enc.special_tokens_mask[j]
    ]
    if not scored:
        raise SystemExit(f"query {prompt!r} + {completion!r}: no completion token")
    p = scored[0]
    if scored != list(range(p, len(enc.ids))):
        raise SystemExit(f"query {prompt!r}: the scored tokens are not a suffix ({scored}); pick another query")
    if p == 0:
        raise SystemExit(f"query {prompt!r}: the first token is scored; it has no position predicting it")
    return enc.ids, p


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="a checkpoint folder, or a PEFT LoRA adapter folder whose "
                    "base_model_name_or_path is a local folder")
    ap.add_argument("--data", required=True, help='JSONL of {"text": ...} records')
    ap.add_argument("--queries", required=True, help='JSONL of {"prompt": ..., "completion": ...}')
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--cli", default=shlex.join(["node", str(ROOT / "bin/influence-lens.js")]))
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = Path(a.model)
    adapter = model_dir if (model_dir / "adapter_config.json").exists() else None
    base_dir = Path(json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]) if adapter else model_dir
    if adapter and not base_dir.is_absolute():
        base_dir = adapter / base_dir  # a relative base is read from the adapter's folder, as the CLI reads it
    tok = Tokenizer.from_file(str((model_dir if (model_dir / "tokenizer.json").exists() else base_dir) / "tokenizer.json"))

    train_text = [json.loads(line)["text"] for line in Path(a.data).read_text().splitlines() if line.strip()]
    queries = [json.loads(line) for line in Path(a.queries).read_text().splitlines() if line.strip()]
    train = [tok.encode(t).ids for t in train_text]
    qs = [query_ids(tok, q["prompt"], q["completion"]) for q in queries]
    data = {"train": train, "queries": [{"ids": ids, "prompt_length": p} for ids, p in qs]}
    (out / "data.json").write_text(json.dumps(data))

    # the query losses, straight from transformers
    torch.set_num_threads(a.threads)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    losses = []
    with torch.no_grad():
        for ids, p in qs:
            x = torch.tensor([ids])
            logp = torch.log_softmax(model(input_ids=x).logits[0, :-1].double(), -1)
            losses.append(-sum(logp[t - 1, ids[t]].item() for t in range(p, len(ids))))
    del model

    # kronfluence on the same text
    kdir = out / "kronfluence"
    r = subprocess.run(
        [sys.executable, str(ROOT / "test/oracle/bench_kronfluence.py"), "--model", str(base_dir),
         *(["--adapter", str(adapter)] if adapter else []),
         "--data", str(out / "data.json"), "--out", str(kdir), "--threads", str(a.threads),
         "--labels", "empirical", "--modules", "all", "--damping", "1e-3", "--no-warmup"],
        capture_output=True, text=True,
    )
    if r.returncode != 0:
        raise SystemExit(f"bench_kronfluence.py failed:\n{r.stderr[-2000:]}")
    theirs = json.loads((kdir / "kronfluence_scores.json").read_text())

    # ours, from the text
    cli = shlex.split(a.cli)  # a path with spaces stays one argument
    factors = out / "factors"
    shutil.rmtree(factors, ignore_errors=True)  # this check's own output, refitted every run
    r = subprocess.run(cli + ["fit", "--model", str(model_dir), "--data", a.data, "--out", str(factors),
                              "--modules", "all", "--labels", "empirical"], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"influence-lens fit failed:\n{r.stderr[-2000:]}")
    r = subprocess.run(cli + ["explain", "--model", str(model_dir), "--factors", str(factors), "--data", a.data,
                              "--queries", a.queries, "--damping", "1e-3", "--top-k", str(len(train)), "--json"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"influence-lens explain failed:\n{r.stderr[-2000:]}")
    results = [json.loads(line) for line in r.stdout.splitlines() if line.strip()]
    if len(results) != len(queries):
        raise SystemExit(f"explain wrote {len(results)} results for {len(queries)} queries")

    failures = []
    report = []
    for q, (res, row, loss) in enumerate(zip(results, theirs, losses)):
        ours = [None] * len(train)
        for ex in res["supporting"] + res["opposing"]:
            ours[ex["id"]["line"] - 1] = ex["score"]
        if any(v is None for v in ours):
            failures.append(f"query {q}: explain returned scores for {sum(v is not None for v in ours)} of {len(train)}")
            continue
        rho = spearman(ours, row)
        scale = max(abs(v) for v in row)
        rel = max(abs(x - y) for x, y in zip(ours, row)) / scale
        top = lambda v: set(sorted(range(len(v)), key=lambda i: -v[i])[:5])  # noqa: E731
        same_top = top(ours) == top(row)
        loss_rel = abs(res["query"]["loss"] - loss) / abs(loss)
        report.append({"query": q, "spearman": rho, "relative_error": rel, "same_top5": same_top,
                       "loss_ours": res["query"]["loss"], "loss_transformers": loss, "loss_relative_error": loss_rel})
        print(f"query {q}: Spearman {rho:.4f}, largest difference / largest |score| {rel:.1e}, "
              f"same top-5 {same_top}, loss {res['query']['loss']:.4f} vs transformers {loss:.4f}")
        if rho < 0.99:
            failures.append(f"query {q}: Spearman {rho:.4f} < 0.99")
        if rel > 1e-3:
            failures.append(f"query {q}: scores differ by {rel:.1e} of the largest")
        if not same_top:
            failures.append(f"query {q}: top-5 sets differ")
        if loss_rel > 1e-4:
            failures.append(f"query {q}: loss {res['query']['loss']} vs transformers {loss}")
    (out / "check.json").write_text(json.dumps({"model": str(model_dir), "queries": report, "failures": failures}, indent=1))
    for f in failures:
        print(f"FAIL {f}")
    print("ok" if not failures else f"{len(failures)} check(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
