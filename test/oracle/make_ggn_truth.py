#!/usr/bin/env python3
"""Developer-run oracle: ground-truth influence scores for the embedded default model,
from the exact damped Gauss-Newton inverse-Hessian-vector product solved by conjugate
gradient (no Kronecker factoring, no eigenvalue approximation, no Monte-Carlo labels).

For every query q and every training example z of assets/default/data/finetune.jsonl:

    score(q, z) = grad L_z . x_q,    (G/N + lambda I) x_q = grad L_q

- theta: the 14 tracked linear weights (model.layers.*.self_attn.{q,k,v,o}_proj.weight,
  model.layers.*.mlp.{gate,up,down}_proj.weight); embeddings, norms and lm_head fixed.
- L: SUM of -log p(token t+1 | tokens <= t) over the positions t whose target token
  overlaps the completion (format.ts targetWeightsFromOffsets), for training examples
  and queries alike (tokenizeQuery: text = prompt + completion).
- G = sum_z J_z^T H_z J_z, the Gauss-Newton matrix of the SUM training loss: J_z the
  Jacobian of the logits at z's weighted positions, H_z = diag(p) - p p^T per position.
  Products G v are exact (torch.func jvp + vjp), in float64.
- N = 313 training examples; lambda = 0.1 * tr(G/N)/P (P = number of parameters), the
  EK-FAC heuristic 0.1 * mean(Lambda), with tr(G) estimated by Hutchinson probes; the
  value used is rounded to 3 significant digits and recorded. Also lambda x 10 (and
  lambda x 0.1 with --variants 0.1,1,10; that one needs several thousand iterations).
- Multi-shift CG (one Krylov space serves every lambda) to a relative residual
  ||b - A x|| / ||b|| <= --tol, recomputed from scratch at the end and recorded.
- Positive score = supporting: up-weighting z lowers the query loss (KRONFLUENCE.md, fact 9).

Checks (the script fails if one fails): the functional forward used here equals the
transformers forward (float64, eager); token ids and loss weights equal the TypeScript
data layer's for every record and query (node + tsx); the packed prefix-trie forward used
for G v equals the plain one; G is symmetric and v^T G v >= 0 on random vectors; per-example
gradients sum to the full gradient; and on a tiny problem (3 training examples, 1 query,
a 32-row slice of one module) CG agrees with a dense solve of the explicitly built GGN.

Writes test/fixtures/ground-truth/default-ggn.json. Never run by CI or the product.
Usage (from the repo root, after `npm install`):
    test/oracle/.venv/bin/python test/oracle/make_ggn_truth.py [--queries 20] [--tol 1e-5] [--cache DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
from make_fixtures import install_float64_patches  # noqa: E402

MODEL_DIR = REPO / "assets" / "default" / "finetuned"
DATA = REPO / "assets" / "default" / "data"
TRAIN_PATH = DATA / "finetune.jsonl"
QUERIES_PATH = DATA / "queries.json"
OUT_PATH = REPO / "test" / "fixtures" / "ground-truth" / "default-ggn.json"

SUFFIXES = [
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
]
F64 = torch.float64
DENSE_CHECK_MODULE = "model.layers.1.self_attn.v_proj.weight"
DENSE_CHECK_ROWS = 32


def log(*a):
    print(*a, flush=True)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def sig(x: float, digits: int = 8) -> float:
    return float(f"{x:.{digits}g}")


# --------------------------------------------------------------------------- #
# data: the TypeScript data layer's rendering, token ids and loss weights
# --------------------------------------------------------------------------- #
def target_weights_from_offsets(offsets, spans):
    """format.ts targetWeightsFromOffsets: weight[t] = 1 iff token t+1 overlaps a span."""
    w = [0] * len(offsets)
    for t in range(len(offsets) - 1):
        ts, te = offsets[t + 1]
        if te <= ts:
            continue
        if any(ts < e and te > s for s, e in spans):
            w[t] = 1
    return w


def utf16_offsets(text: str, offsets):
    """tokenizers gives offsets in code points; JS strings index UTF-16 code units."""
    if all(ord(c) < 0x10000 for c in text):
        return [tuple(o) for o in offsets]
    units = [0]
    for c in text:
        units.append(units[-1] + (2 if ord(c) >= 0x10000 else 1))
    return [(units[s], units[e]) for s, e in offsets]


def encode(tok, text: str, spans, max_len: int):
    enc = tok.encode(text, add_special_tokens=False)
    ids = enc.ids[:max_len]
    offs = utf16_offsets(text, enc.offsets)[:max_len]
    return ids, target_weights_from_offsets(offs, spans), len(enc.ids) - len(ids)


def load_data(tok, max_len: int, n_queries: int):
    train = []
    for line, raw in enumerate(TRAIN_PATH.read_text().split("\n"), start=1):
        if not raw.strip():
            continue
        rec = json.loads(raw)
        assert set(rec) == {"prompt", "completion"}, f"{TRAIN_PATH}:{line}: not a prompt/completion record"
        text = rec["prompt"] + rec["completion"]
        ids, w, cut = encode(tok, text, [(len(rec["prompt"]), len(text))], max_len)
        train.append({"line": line, "ids": ids, "weights": w, "truncated": cut})
    qs = json.loads(QUERIES_PATH.read_text())
    chosen = [i for i, q in enumerate(qs) if q["kind"] == "planted"]
    chosen += [i for i, q in enumerate(qs) if q["kind"] == "backdoor"]
    chosen += [i for i, q in enumerate(qs) if q["kind"] == "fact_tracing"][:14]
    chosen = chosen[:n_queries]
    queries = []
    for i in chosen:
        q = qs[i]
        text = q["prompt"] + q["completion"]
        ids, w, cut = encode(tok, text, [(len(q["prompt"]), len(text))], max_len)
        assert cut == 0 and any(w), f"query {i}: truncated or nothing to explain"
        queries.append({"index": i, "prompt": q["prompt"], "completion": q["completion"], "kind": q["kind"],
                        "ids": ids, "weights": w})
    return train, queries


TS_SNIPPET = r"""
import { readFileSync } from 'node:fs';
import { loadDataset } from './src/server/data/dataset.ts';
import { contextLength, tokenizeQuery, tokenizeText } from './src/server/data/tokenize.ts';
import { loadTokenizer } from './src/server/model/tokenizer.ts';
const [dir, train, queries] = process.argv.slice(1);
const tok = loadTokenizer(dir);
const L = contextLength(JSON.parse(readFileSync(dir + '/config.json', 'utf8')));
const ds = loadDataset(train);
const out = { L, train: ds.examples.map((e) => {
  const t = tokenizeText(tok, e.text, e.spans, L);
  return { line: e.line, hash: e.hash, ids: t.ids, weights: t.weights, truncated: t.truncated };
}), queries: JSON.parse(readFileSync(queries, 'utf8')).map((q) => {
  const t = tokenizeQuery(tok, q.prompt, q.completion, L);
  return { ids: t.ids, weights: t.weights };
}) };
process.stdout.write(JSON.stringify(out));
"""


def ts_check(train, queries, max_len):
    """Token ids and weights from the TypeScript data layer, compared for every record."""
    cmd = ["node", "--import", "tsx", "--input-type=module", "-e", TS_SNIPPET, "--",
           str(MODEL_DIR), str(TRAIN_PATH), str(QUERIES_PATH)]
    res = subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True)
    ts = json.loads(res.stdout)
    assert ts["L"] == max_len, (ts["L"], max_len)
    assert len(ts["train"]) == len(train), (len(ts["train"]), len(train))
    for ours, theirs in zip(train, ts["train"]):
        for k in ("line", "ids", "weights", "truncated"):
            assert ours[k] == theirs[k], f"line {ours['line']}: {k} differs from the TypeScript data layer"
        ours["hash"] = theirs["hash"]
    for q in queries:
        theirs = ts["queries"][q["index"]]
        assert q["ids"] == theirs["ids"] and q["weights"] == theirs["weights"], f"query {q['index']} differs"
    return len(ts["train"]), len(queries)


# --------------------------------------------------------------------------- #
# the model, as a pure function of the tracked weights
# --------------------------------------------------------------------------- #
class Model:
    def __init__(self):
        from transformers import AutoModelForCausalLM

        install_float64_patches()
        self.hf = AutoModelForCausalLM.from_pretrained(MODEL_DIR, attn_implementation="eager",
                                                       dtype=torch.float32).double().eval()
        cfg = self.hf.config
        self.cfg = cfg
        sd = {k: v.detach().clone() for k, v in self.hf.state_dict().items()}
        self.L = cfg.num_hidden_layers
        self.names = [f"model.layers.{i}.{s}.weight" for i in range(self.L) for s in SUFFIXES]
        self.shapes = [tuple(sd[n].shape) for n in self.names]
        self.sizes = [math.prod(s) for s in self.shapes]
        self.offsets = [sum(self.sizes[:j]) for j in range(len(self.sizes))]
        self.P = sum(self.sizes)
        self.theta = torch.cat([sd[n].reshape(-1) for n in self.names])
        self.emb = sd["model.embed_tokens.weight"]
        self.head = sd["lm_head.weight"]
        self.normf = sd["model.norm.weight"]
        self.ln1 = [sd[f"model.layers.{i}.input_layernorm.weight"] for i in range(self.L)]
        self.ln2 = [sd[f"model.layers.{i}.post_attention_layernorm.weight"] for i in range(self.L)]
        self.inv_freq = self.hf.model.rotary_emb.inv_freq.to(F64)  # HF's own (float32-computed) values
        self.scaling = float(getattr(self.hf.model.rotary_emb, "attention_scaling", 1.0))
        self.H, self.hd, self.D = cfg.num_attention_heads, cfg.head_dim, cfg.hidden_size
        assert cfg.num_key_value_heads == self.H
        self.eps = cfg.rms_norm_eps
        for j, n in enumerate(self.names):
            mod = self.hf.get_submodule(n[: -len(".weight")])
            assert isinstance(mod, torch.nn.Linear) and mod.bias is None, n

    def unflat(self, th):
        return [th[o:o + n].view(s) for o, n, s in zip(self.offsets, self.sizes, self.shapes)]

    def rms(self, x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

    def rope(self, pos):
        fr = pos.to(F64)[..., None] * self.inv_freq
        e = torch.cat((fr, fr), -1)
        return e.cos() * self.scaling, e.sin() * self.scaling

    @staticmethod
    def rot(x):
        h = x.shape[-1] // 2
        return torch.cat((-x[..., h:], x[..., :h]), -1)

    @staticmethod
    def lin(x, W, j, taps):
        y = x @ W.T
        if taps is not None:  # record the input, expose d(loss)/d(output) through a zero offset
            taps["a"][j] = x.detach()
            y = y + taps["e"][j]
        return y

    def _layers(self, th, h, attend, sel, taps):
        """h: [..., D] token states; attend(l, q, k, v) -> [..., D] attention output;
        sel: index of the rows that need logits (applied before the last o_proj)."""
        W = th if isinstance(th, list) else self.unflat(th)  # flat theta, or the list of weights
        lin = self.lin
        for l in range(self.L):
            Wq, Wk, Wv, Wo, Wg, Wu, Wd = W[7 * l: 7 * l + 7]
            x = self.rms(h, self.ln1[l])
            q, k, v = lin(x, Wq, 7 * l, taps), lin(x, Wk, 7 * l + 1, taps), lin(x, Wv, 7 * l + 2, taps)
            a = attend(q, k, v)
            if l == self.L - 1:  # the last layer's o_proj, MLP and head act per position: keep the needed rows
                a, h = a.reshape(-1, self.D)[sel], h.reshape(-1, self.D)[sel]
            h = h + lin(a, Wo, 7 * l + 3, taps)
            x = self.rms(h, self.ln2[l])
            m = F.silu(lin(x, Wg, 7 * l + 4, taps)) * lin(x, Wu, 7 * l + 5, taps)
            h = h + lin(m, Wd, 7 * l + 6, taps)
        return self.rms(h, self.normf) @ self.head.T

    def forward(self, th, ids, sel, taps=None):
        """ids [B, T] (no padding); returns the logits of the flattened rows `sel` of [B*T]."""
        B, T = ids.shape
        H, hd, D = self.H, self.hd, self.D
        cos, sin = self.rope(torch.arange(T))
        mask = torch.full((T, T), float("-inf"), dtype=F64).triu(1)

        def attend(q, k, v):
            q, k, v = (t.view(B, T, H, hd).transpose(1, 2) for t in (q, k, v))
            q, k = q * cos + self.rot(q) * sin, k * cos + self.rot(k) * sin
            s = torch.softmax(q @ k.transpose(-1, -2) * hd ** -0.5 + mask, -1)
            return (s @ v).transpose(1, 2).reshape(B, T, D)

        return self._layers(th, self.emb[ids], attend, sel, taps)

    def forward_trie(self, th, trie):
        """The same logits with the linear layers applied once per distinct prefix (trie node):
        attention gathers the nodes into the buckets' [B, T] layout and scatters one copy back."""
        H, hd, D = self.H, self.hd, self.D
        cos, sin = trie["cos"], trie["sin"]

        def attend(q, k, v):
            q, k, v = (t.view(-1, H, hd) for t in (q, k, v))
            q, k = q * cos + self.rot(q) * sin, k * cos + self.rot(k) * sin
            outs = []
            for idx in trie["layout"]:
                B, T = idx.shape
                mask = torch.full((T, T), float("-inf"), dtype=F64).triu(1)
                qb, kb, vb = (t[idx].transpose(1, 2) for t in (q, k, v))  # [B, H, T, hd]
                a = torch.softmax(qb @ kb.transpose(-1, -2) * hd ** -0.5 + mask, -1) @ vb
                outs.append(a.transpose(1, 2).reshape(B * T, D))
            return torch.cat(outs)[trie["rep"]]

        return self._layers(th, self.emb[trie["tokens"]], attend, trie["sel"], None)


# --------------------------------------------------------------------------- #
# training set layouts: length buckets (per-example gradients) and a prefix trie (G v)
# --------------------------------------------------------------------------- #
def needed(ex):
    """Inputs up to the last weighted position: later tokens cannot change any scored logit."""
    last = max(t for t, w in enumerate(ex["weights"]) if w)
    return ex["ids"][: last + 1], ex["weights"][: last + 1], ex["ids"][1: last + 2]


def make_buckets(examples):
    by_len = {}
    for n, ex in enumerate(examples):
        by_len.setdefault(len(needed(ex)[0]), []).append(n)
    buckets = []
    for T, members in sorted(by_len.items()):
        ids = torch.tensor([needed(examples[n])[0] for n in members])
        w = torch.tensor([needed(examples[n])[1] for n in members])
        nxt = torch.tensor([needed(examples[n])[2] for n in members])
        sel = torch.nonzero(w.reshape(-1)).squeeze(1)
        buckets.append({"members": members, "ids": ids, "sel": sel, "targets": nxt.reshape(-1)[sel],
                        "example_of_row": sel // T})
    return buckets


def make_trie(model, examples, buckets):
    """Every distinct prefix of the training inputs once (a node = its last token); `layout` maps
    the buckets' positions to nodes; rows = the weighted positions, in the buckets' row order."""
    tokens, depth, parent, node_of = [], [], [], {}
    for ex in examples:
        ids = needed(ex)[0]
        for t in range(len(ids)):
            key = tuple(ids[: t + 1])
            if key not in node_of:
                node_of[key] = len(tokens)
                tokens.append(ids[t])
                depth.append(t)
                parent.append(node_of[key[:-1]] if t else -1)
    layout, rep, base = [], [0] * len(tokens), 0  # node of every bucket position; one position per node
    for b in buckets:
        B, T = b["ids"].shape
        idx = torch.tensor([[node_of[tuple(needed(examples[n])[0][: t + 1])] for t in range(T)] for n in b["members"]])
        for flat, u in enumerate(idx.reshape(-1).tolist()):
            rep[u] = base + flat
        layout.append(idx)
        base += B * T
    rows = []
    for b in buckets:
        T = b["ids"].shape[1]
        for flat in b["sel"].tolist():
            ids = needed(examples[b["members"][flat // T]])[0]
            rows.append(node_of[tuple(ids[: flat % T + 1])])
    cos, sin = model.rope(torch.tensor(depth))
    return {"tokens": torch.tensor(tokens), "cos": cos[:, None, :], "sin": sin[:, None, :], "layout": layout,
            "rep": torch.tensor(rep), "sel": torch.tensor(rows), "nodes": len(tokens)}


# --------------------------------------------------------------------------- #
# Gauss-Newton vector products
# --------------------------------------------------------------------------- #
class GGN:
    """v -> sum_rows J^T (diag p - p p^T) J v for f: theta -> logits [rows, V] (exact)."""

    def __init__(self, f, theta):
        from torch.func import linearize, vjp

        out, self.jfn = linearize(f, theta)
        _, self.vfn = vjp(f, theta)
        self.p = torch.softmax(out, -1)

    def __call__(self, V):  # [K, P] -> [K, P]
        from torch.func import vmap

        Jv = vmap(self.jfn)(V)
        p = self.p
        u = p * Jv - p * (p * Jv).sum(-1, keepdim=True)
        return vmap(self.vfn)(u)[0]


def gvp_sum(ggns, V):
    out = ggns[0](V)
    for g in ggns[1:]:
        out = out + g(V)
    return out


# --------------------------------------------------------------------------- #
# multi-shift CG
# --------------------------------------------------------------------------- #
def multishift_cg(matvec, B, shifts, tol, maxit, progress=None):
    """Solves (A + s I) x = b for every s in `shifts` (shifts[0] == 0 <= the others) and every
    row b of B [K, P], with one Krylov space (Jegerlehner's multi-shift CG). A column stops when
    all its shifts' residual estimates |zeta| ||r|| / ||b|| are <= tol. Returns xs [S, K, P] and
    the iterations per column (the true residuals are the caller's to check)."""
    assert shifts[0] == 0 and all(s >= 0 for s in shifts)
    K, S, dt = B.shape[0], len(shifts), B.dtype
    sig_ = torch.tensor(shifts, dtype=dt)[:, None]
    bn = B.norm(dim=1)
    r, p = B.clone(), B.clone()
    xs = torch.zeros(S, *B.shape, dtype=dt)
    ps = B.clone()[None].repeat(S, 1, 1)
    rr = (r * r).sum(1)
    zeta, zeta_prev = torch.ones(S, K, dtype=dt), torch.ones(S, K, dtype=dt)
    alpha_prev, beta_prev = torch.ones(K, dtype=dt), torch.zeros(K, dtype=dt)
    live = torch.ones(S, K, dtype=torch.bool)
    active = torch.ones(K, dtype=torch.bool)
    iters = torch.zeros(K, dtype=torch.long)
    for it in range(1, maxit + 1):
        idx = active.nonzero().squeeze(1)
        Ap = matvec(p[idx])
        alpha = torch.zeros(K, dtype=dt)
        alpha[idx] = rr[idx] / (p[idx] * Ap).sum(1)
        zn = zeta_prev * zeta * alpha_prev / (
            alpha * beta_prev * (zeta_prev - zeta) + zeta_prev * alpha_prev * (1 + sig_ * alpha))
        lv = live & active
        zn = torch.where(lv, zn, zeta)
        ratio = torch.where(lv, zn / zeta, torch.zeros_like(zn))
        alpha_s = alpha * ratio
        xs[:, idx] += alpha_s[:, idx, None] * ps[:, idx]
        r[idx] -= alpha[idx, None] * Ap
        rr_new = (r * r).sum(1)
        beta = torch.zeros(K, dtype=dt)
        beta[idx] = rr_new[idx] / rr[idx]
        beta_s = beta * ratio ** 2
        upd = zn[:, idx, None] * r[idx] + beta_s[:, idx, None] * ps[:, idx]
        ps[:, idx] = torch.where(lv[:, idx, None], upd, ps[:, idx])
        p[idx] = r[idx] + beta[idx, None] * p[idx]
        zeta_prev, zeta = torch.where(lv, zeta, zeta_prev), zn
        alpha_prev = torch.where(active, alpha, alpha_prev)
        beta_prev = torch.where(active, beta, beta_prev)
        rr = torch.where(active, rr_new, rr)
        iters[idx] = it
        rel = zeta.abs() * rr.sqrt() / bn
        live = live & (rel > tol)
        if progress:
            progress(it, rel, live)
        active = live.any(0)
        if not active.any():
            break
    return xs, iters


def pcg(matvec, B, precond, tol, maxit, progress=None):
    """Preconditioned CG for A x = b, every row b of B [K, P], A = `matvec` (SPD) and M^-1 =
    `precond` (SPD). The preconditioner changes only the speed: the solution is A's, and the
    caller recomputes the true residual ||b - A x|| / ||b|| at the end. A column stops when its
    residual ||r|| / ||b|| <= tol."""
    K, dt = B.shape[0], B.dtype
    bn = B.norm(dim=1)
    x = torch.zeros_like(B)
    r = B.clone()
    z = precond(r)
    p = z.clone()
    rz = (r * z).sum(1)
    active = torch.ones(K, dtype=torch.bool)
    iters = torch.zeros(K, dtype=torch.long)
    for it in range(1, maxit + 1):
        idx = active.nonzero().squeeze(1)
        Ap = matvec(p[idx])
        alpha = rz[idx] / (p[idx] * Ap).sum(1)
        x[idx] += alpha[:, None] * p[idx]
        r[idx] -= alpha[:, None] * Ap
        iters[idx] = it
        rel = r.norm(dim=1) / bn
        if progress:
            progress(it, rel[None], active[None])
        active = active & (rel > tol)
        if not active.any():
            break
        idx = active.nonzero().squeeze(1)
        z_new = precond(r[idx])
        rz_new = (r[idx] * z_new).sum(1)
        p[idx] = z_new + (rz_new / rz[idx])[:, None] * p[idx]
        rz[idx] = rz_new
    return x, iters


def ekfac_preconditioner(model, factors_dir: Path, lam: float):
    """M^-1 v per module: Q_G [(Q_G^T V Q_A) / (Lambda / n + lam)] Q_A^T, from EK-FAC factors in
    kronfluence's layout (e.g. the ones `influence-lens fit` writes). Only a preconditioner."""
    from safetensors.torch import load_file

    qa = load_file(factors_dir / "activation_eigenvectors.safetensors")
    qg = load_file(factors_dir / "gradient_eigenvectors.safetensors")
    lm = load_file(factors_dir / "lambda_matrix.safetensors")
    nl = load_file(factors_dir / "num_lambda_processed.safetensors")
    blocks = []
    for j, name in enumerate(model.names):
        mod = name[: -len(".weight")]
        if mod not in lm:
            raise SystemExit(f"{factors_dir} has no factors for {mod}: fit all modules")
        D = lm[mod].to(F64) / float(nl[mod].item()) + lam
        if tuple(D.shape) != model.shapes[j]:
            raise SystemExit(f"{factors_dir}: {mod} has shape {tuple(D.shape)}, the model {model.shapes[j]}")
        blocks.append((qg[mod].to(F64), qa[mod].to(F64), D))

    def apply(R):
        out = torch.empty_like(R)
        for j, (g, a, D) in enumerate(blocks):
            o, n = model.offsets[j], model.sizes[j]
            V = R[:, o: o + n].reshape(-1, *model.shapes[j])
            out[:, o: o + n] = (g @ ((g.T @ V @ a) / D) @ a.T).reshape(R.shape[0], -1)
        return out

    return apply


# --------------------------------------------------------------------------- #
# gradients
# --------------------------------------------------------------------------- #
def per_example_grads(model, examples, buckets):
    """[N, P] gradients of each example's SUM loss: one backward per bucket, then
    G_n = sum over n's tokens of g a^T per module (exact, checked against autograd)."""
    NM = len(model.names)
    out = torch.zeros(len(examples), model.P, dtype=F64)
    for b in buckets:
        B, T = b["ids"].shape
        taps = {"a": {}, "e": {j: 0.0 for j in range(NM)}}
        with torch.no_grad():
            model.forward(model.theta, b["ids"], b["sel"], taps)
        e = {j: torch.zeros(taps["a"][j].shape[:-1] + (model.shapes[j][0],), dtype=F64, requires_grad=True)
             for j in range(NM)}
        taps2 = {"a": {}, "e": e}
        logits = model.forward(model.theta, b["ids"], b["sel"], taps2)
        loss = F.cross_entropy(logits, b["targets"], reduction="sum")
        gs = torch.autograd.grad(loss, [e[j] for j in range(NM)])
        members = torch.tensor(b["members"])
        for j in range(NM):
            a, g = taps2["a"][j], gs[j]
            if a.dim() == 3:
                Gn = torch.einsum("bto,bti->boi", g, a)
            else:  # last-layer rows: only the weighted positions
                Gn = torch.zeros(B, *model.shapes[j], dtype=F64)
                Gn.index_add_(0, b["example_of_row"], g[:, :, None] * a[:, None, :])
            out[members, model.offsets[j]: model.offsets[j] + model.sizes[j]] = Gn.reshape(B, -1)
    return out


def query_grad(model, q):
    ids = torch.tensor([q["ids"]])
    sel = torch.nonzero(torch.tensor(q["weights"])).squeeze(1)
    tgt = torch.tensor(q["ids"][1:] + [0])[sel]
    return torch.func.grad(lambda th: F.cross_entropy(model.forward(th, ids, sel), tgt, reduction="sum"))(model.theta)


# --------------------------------------------------------------------------- #
# checks
# --------------------------------------------------------------------------- #
def check_against_hf(model, examples, queries):
    worst = 0.0
    seqs = [ex["ids"] for ex in examples] + [q["ids"] for q in queries]
    with torch.no_grad():
        for ids in seqs:
            t = torch.tensor([ids])
            ref = model.hf(t).logits[0]
            got = model.forward(model.theta, t, torch.arange(len(ids)))
            worst = max(worst, ((ref - got).abs().max() / ref.abs().max()).item())
    assert worst < 1e-12, worst
    return worst


def dense_check(model, examples, query, seed):
    """3 examples, 1 query, parameters = rows [0, 32) of one module: CG vs a dense solve."""
    j = model.names.index(DENSE_CHECK_MODULE)
    o, rows, cols = model.offsets[j], DENSE_CHECK_ROWS, model.shapes[j][1]
    n_sub = rows * cols

    Ws = [w.clone() for w in model.unflat(model.theta)]

    def embed(w):  # the weights with rows [0, 32) of module j replaced by w (only w carries gradients)
        return Ws[:j] + [torch.cat([w.view(rows, cols), Ws[j][rows:]])] + Ws[j + 1:]

    w0 = model.theta[o:o + n_sub].clone()
    sub = examples[:3]
    buckets = make_buckets(sub)
    fs = [lambda w, b=b: model.forward(embed(w), b["ids"], b["sel"]) for b in buckets]
    ggns = [GGN(f, w0) for f in fs]
    # explicit GGN from the full Jacobian
    G = torch.zeros(n_sub, n_sub, dtype=F64)
    for f, gg in zip(fs, ggns):
        J = torch.func.jacrev(f, chunk_size=512)(w0)  # [rows, V, n_sub]
        p = gg.p
        Hm = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        HJ = torch.einsum("rvw,rwq->rvq", Hm, J)
        G += J.reshape(-1, n_sub).T @ HJ.reshape(-1, n_sub)
    N = len(sub)
    evals = torch.linalg.eigvalsh(G)
    lam = 0.1 * (torch.trace(G) / N / n_sub).item()
    gen = torch.Generator().manual_seed(seed)
    V = torch.randn(3, n_sub, dtype=F64, generator=gen)
    gv_err = ((gvp_sum(ggns, V) - V @ G).norm() / (V @ G).norm()).item()
    g_full = query_grad(model, query)
    b = g_full[o:o + n_sub][None]
    shifts = [0.0, 9 * lam]
    xs, its = multishift_cg(lambda X: gvp_sum(ggns, X) / N + lam * X, b, shifts, 1e-12, 20000)
    errs = []
    for s, x in zip(shifts, xs):
        ref = torch.linalg.solve(G / N + (lam + s) * torch.eye(n_sub, dtype=F64), b[0])
        errs.append(((x[0] - ref).norm() / ref.norm()).item())
    res = {
        "params": f"{DENSE_CHECK_MODULE}[0:{rows}, :] ({n_sub})",
        "train_lines": [ex["line"] for ex in sub],
        "query_index": query["index"],
        "lambda": lam,
        "gvp_vs_dense_rel_err": gv_err,
        "ggn_min_max_eigenvalue": [evals[0].item(), evals[-1].item()],
        "cg_tol": 1e-12,
        "cg_iterations": int(its[0]),
        "cg_vs_dense_solve_rel_err": {"lambda": errs[0], "lambda_x10": errs[1]},
    }
    assert gv_err < 1e-10 and max(errs) < 1e-7 and evals[0] > -1e-12 * evals[-1], res
    return res


# --------------------------------------------------------------------------- #
# output
# --------------------------------------------------------------------------- #
def dumps(obj, indent=0):
    """JSON with lists of numbers (and of strings) on one line."""
    pad, pad1 = " " * indent, " " * (indent + 1)
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        items = [f"{pad1}{json.dumps(k)}: {dumps(v, indent + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, list) and obj and all(isinstance(v, (dict, list)) for v in obj):
        return "[\n" + ",\n".join(pad1 + dumps(v, indent + 1) for v in obj) + "\n" + pad + "]"
    return json.dumps(obj, ensure_ascii=False)


def label(m: float) -> str:
    return "lambda" if m == 1 else f"lambda_x{m:g}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--queries", type=int, default=20, help="first N of the 20 queries (3 planted, 3 backdoor, 14 fact tracing)")
    ap.add_argument("--tol", type=float, default=1e-5, help="CG relative residual (1e-6: about 30%% more time)")
    ap.add_argument("--maxit", type=int, default=20000)
    ap.add_argument("--variants", default="1,10", help="damping multipliers of the heuristic lambda")
    ap.add_argument("--batch", type=int, default=4, help="queries solved in lockstep")
    ap.add_argument("--probes", type=int, default=64, help="Hutchinson probes for tr(G)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-ts-check", action="store_true")
    ap.add_argument("--checks-only", action="store_true", help="run the checks and the trace, no CG")
    ap.add_argument("--precondition", type=Path, default=None,
                    help="EK-FAC factors dir (kronfluence layout) used as the CG preconditioner, one solve per damping "
                         "(e.g. ~/.cache/influence-lens/default/factors-finetuned after `npx influence-lens demo`)")
    ap.add_argument("--out", type=Path, default=OUT_PATH)
    ap.add_argument("--cache", type=Path, default=None,
                    help="keep each batch's CG solutions here and reuse them on a rerun with the same settings")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    variants = sorted(float(v) for v in args.variants.split(","))
    t_start = time.perf_counter()
    secs = {}

    def lap(name, t0):
        secs[name] = round(time.perf_counter() - t0, 2)
        log(f"[{name}] {secs[name]} s")

    t0 = time.perf_counter()
    from tokenizers import Tokenizer

    model = Model()
    tok = Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))
    max_len = model.cfg.max_position_embeddings
    examples, queries = load_data(tok, max_len, args.queries)
    N, P = len(examples), model.P
    checks = {}
    if not args.skip_ts_check:
        nt, nq = ts_check(examples, queries, max_len)
        checks["typescript_ids_and_weights"] = f"identical for {nt} training records and {nq} queries"
        log("TypeScript data layer:", checks["typescript_ids_and_weights"])
    checks["functional_vs_transformers_logits_rel_err"] = check_against_hf(model, examples, queries)
    log("functional forward vs transformers:", checks["functional_vs_transformers_logits_rel_err"])
    buckets = make_buckets(examples)
    trie = make_trie(model, examples, buckets)
    n_rows = sum(len(b["sel"]) for b in buckets)
    log(f"N={N} P={P} weighted positions={n_rows} tokens={sum(len(e['ids']) for e in examples)} "
        f"needed={sum(len(needed(e)[0]) for e in examples)} trie nodes={trie['nodes']}")
    lap("setup", t0)

    t0 = time.perf_counter()
    checks["dense"] = dense_check(model, examples, queries[0], args.seed)
    log("dense check:", checks["dense"])
    lap("dense_check", t0)

    t0 = time.perf_counter()
    ggn_trie = GGN(lambda th: model.forward_trie(th, trie), model.theta)
    ggn_b = [GGN(lambda th, b=b: model.forward(th, b["ids"], b["sel"]), model.theta) for b in buckets]
    with torch.no_grad():
        ref = torch.cat([model.forward(model.theta, b["ids"], b["sel"]) for b in buckets])
        got = model.forward_trie(model.theta, trie)
    checks["trie_vs_plain_logits_rel_err"] = ((ref - got).abs().max() / ref.abs().max()).item()
    gen = torch.Generator().manual_seed(args.seed + 1)
    V = torch.randn(4, P, dtype=F64, generator=gen)
    GV = ggn_trie(V)
    GVb = gvp_sum(ggn_b, V)
    checks["trie_vs_plain_gvp_rel_err"] = ((GV - GVb).norm() / GVb.norm()).item()
    M = V @ GV.T
    checks["symmetry_rel_err"] = ((M - M.T).abs().max() / M.abs().max()).item()
    checks["vGv_random"] = [sig(x, 6) for x in M.diagonal().tolist()]
    log("checks:", {k: checks[k] for k in ("trie_vs_plain_logits_rel_err", "trie_vs_plain_gvp_rel_err",
                                           "symmetry_rel_err", "vGv_random")})
    assert checks["trie_vs_plain_logits_rel_err"] < 1e-12 and checks["trie_vs_plain_gvp_rel_err"] < 1e-10
    assert checks["symmetry_rel_err"] < 1e-10 and min(M.diagonal()) >= 0
    del ggn_b
    # time one product
    ggn_trie(V)
    t1 = time.perf_counter()
    ggn_trie(V)
    gvp_seconds = (time.perf_counter() - t1) / V.shape[0]
    log(f"G v: {gvp_seconds:.3f} s per vector (batch {V.shape[0]})")
    lap("ggn_checks", t0)

    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(args.seed + 2)
    est = []
    for s in range(0, args.probes, args.batch):
        Z = (torch.randint(0, 2, (min(args.batch, args.probes - s), P), generator=gen) * 2 - 1).to(F64)
        est += ((Z * ggn_trie(Z)).sum(1) / N).tolist()
    tr = sum(est) / len(est)
    tr_se = (sum((e - tr) ** 2 for e in est) / (len(est) - 1) / len(est)) ** 0.5
    lam = float(f"{0.1 * tr / P:.3g}")
    log(f"tr(G/N) ~ {tr:.6g} +- {tr_se:.2g} ({len(est)} probes); lambda = 0.1 tr(G/N)/P = {lam:g}")
    lap("trace", t0)

    t0 = time.perf_counter()
    grads = per_example_grads(model, examples, buckets)
    full = torch.func.grad(lambda th: sum(
        F.cross_entropy(model.forward(th, b["ids"], b["sel"]), b["targets"], reduction="sum") for b in buckets))(model.theta)
    checks["per_example_grads_sum_rel_err"] = ((grads.sum(0) - full).norm() / full.norm()).item()
    assert checks["per_example_grads_sum_rel_err"] < 1e-12, checks["per_example_grads_sum_rel_err"]
    Q = torch.stack([query_grad(model, q) for q in queries])
    lap("gradients", t0)
    if args.checks_only:
        log(json.dumps(checks, indent=1))
        return 0

    t0 = time.perf_counter()
    lams = [lam * m for m in variants]
    shifts = [l - lams[0] for l in lams]

    def A(X):
        return ggn_trie(X) / N + lams[0] * X

    precs = [ekfac_preconditioner(model, args.precondition.expanduser(), l) for l in lams] if args.precondition else None
    xs = torch.zeros(len(lams), len(queries), P, dtype=F64)
    iters = [0] * len(queries)
    batch_seconds, reused = [], 0
    for s in range(0, len(queries), args.batch):
        sl = slice(s, min(s + args.batch, len(queries)))
        tb = time.perf_counter()

        def progress(it, rel, live, sl=sl, tb=tb):
            if it % (10 if precs else 100) == 0:
                log(f"  queries {sl.start}..{sl.stop - 1} it {it}: residual estimates "
                    f"{[[f'{v:.1e}' for v in row] for row in rel.tolist()]} {time.perf_counter() - tb:.0f} s")

        key = hashlib.sha256(json.dumps([lams, args.tol, args.maxit, [q["index"] for q in queries[sl]],
                                         Q[sl].sum().item(), str(args.precondition)]).encode()).hexdigest()[:16]
        cached = args.cache / f"cg-{key}.pt" if args.cache else None
        if cached and cached.exists():
            x, its = torch.load(cached)
            reused += 1
            log(f"queries {sl.start}..{sl.stop - 1}: reusing {cached}")
        elif precs:
            # one preconditioned solve per damping (the preconditioner depends on it)
            sols = [pcg(lambda X, l=l: ggn_trie(X) / N + l * X, Q[sl], M, args.tol, args.maxit, progress)
                    for l, M in zip(lams, precs)]
            x = torch.stack([a for a, _ in sols])
            its = torch.stack([b for _, b in sols]).max(0).values
        else:
            x, its = multishift_cg(A, Q[sl], shifts, args.tol, args.maxit, progress)
            if cached:
                args.cache.mkdir(parents=True, exist_ok=True)
                torch.save((x, its), cached)
        xs[:, sl] = x
        iters[sl] = its.tolist()
        batch_seconds.append(round(time.perf_counter() - tb, 1))
        log(f"queries {sl.start}..{sl.stop - 1}: iterations {its.tolist()} in {batch_seconds[-1]} s")
    lap("cg", t0)

    t0 = time.perf_counter()
    residuals = {}
    for i, (m, l) in enumerate(zip(variants, lams)):
        rs = []
        for s in range(0, len(queries), args.batch):
            X, Bq = xs[i, s: s + args.batch], Q[s: s + args.batch]
            R = Bq - (ggn_trie(X) / N + l * X)
            rs += (R.norm(dim=1) / Bq.norm(dim=1)).tolist()
        residuals[label(m)] = [sig(r, 3) for r in rs]
        log(f"true relative residuals, {label(m)} = {l:g}: max {max(rs):.2e}")
        assert max(rs) <= 2 * args.tol, rs
    scores = {label(m): (xs[i] @ grads.T).tolist() for i, m in enumerate(variants)}
    lap("residuals_and_scores", t0)

    # a readable summary: the top supporting lines of each planted / backdoor query
    lines = [ex["line"] for ex in examples]
    for qi, q in enumerate(queries):
        if q["kind"] in ("planted", "backdoor"):
            row = torch.tensor(scores[label(variants[0])][qi])
            top = [lines[k] for k in row.argsort(descending=True)[:6].tolist()]
            log(f"  {q['kind']:8} {q['prompt']!r}->{q['completion']!r}: top lines {top}")

    import numpy
    import tokenizers
    import transformers

    secs["total"] = round(time.perf_counter() - t_start, 2)
    node_v = subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip()
    out = {
        "description": "Ground-truth influence: score(q, z) = grad L_z . x_q with (G/N + m lambda I) x_q = grad L_q, "
                       "G the exact Gauss-Newton matrix of the SUM training loss, solved by multi-shift CG. "
                       "score > 0: training on z lowers the query loss (supporting). "
                       "Written by test/oracle/make_ggn_truth.py.",
        "model": "assets/default/finetuned",
        "params": "tracked linear weights",
        "modules": [n[: -len(".weight")] for n in model.names],
        "num_params": P,
        "loss": "SUM over positions t with weight 1 of -log p(token t+1 | tokens <= t); weight 1 iff token t+1 "
                "overlaps the completion's characters (format.ts targetWeightsFromOffsets), for training "
                "examples (prompt + completion) and queries (tokenizeQuery) alike",
        "ggn": {
            "definition": "G = sum_z J_z^T (diag p - p p^T) J_z over the weighted positions of every training example; "
                          "products G v exact (torch.func jvp + vjp), float64",
            "N": N,
            "weighted_positions": n_rows,
            "trace_over_N": {"estimate": sig(tr), "stderr": sig(tr_se, 3), "method": "Hutchinson, Rademacher",
                             "probes": len(est), "seed": args.seed + 2},
        },
        "damping": {
            "heuristic": "lambda = 0.1 * tr(G/N) / P (EK-FAC's 0.1 * mean(Lambda)), rounded to 3 significant digits",
            "solve": "(G/N + lambda I) x = grad L_q",
            **{label(m): l for m, l in zip(variants, lams)},
        },
        "queries": [{"index": q["index"], "prompt": q["prompt"], "completion": q["completion"], "kind": q["kind"]}
                    for q in queries],
        "train": {"path": "assets/default/data/finetune.jsonl", "lines": lines,
                  **({"hashes": [ex["hash"] for ex in examples]} if "hash" in examples[0] else {})},
        "scores_layout": "scores[label][query][train example]; rows follow `queries`, columns follow `train.lines`",
        "scores": {k: [[sig(v) for v in row] for row in rows_] for k, rows_ in scores.items()},
        "cg": {"method": ("conjugate gradient, one solve per lambda, preconditioned by EK-FAC factors "
                          f"({args.precondition.name}: M = Q_G diag(Lambda/n + lambda) Q_A per module; this changes only "
                          "the speed: the solution is the exact GGN system's, as the recomputed residuals show), x0 = 0")
               if args.precondition else
               "multi-shift conjugate gradient (one Krylov space for every lambda), no preconditioner, x0 = 0",
               "tolerance": args.tol, "batch": args.batch, "iterations": iters, "residuals": residuals,
               "batch_seconds": batch_seconds, "batches_reused_from_cache": reused,
               "residual_definition": "||grad L_q - (G/N + lambda I) x|| / ||grad L_q||, recomputed after the solve"},
        "checks": checks,
        "inputs_sha256": {"model.safetensors": sha256(MODEL_DIR / "model.safetensors"),
                          "finetune.jsonl": sha256(TRAIN_PATH), "queries.json": sha256(QUERIES_PATH)},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
                     "numpy": numpy.__version__, "node": node_v},
        "threads": args.threads,
        "gvp_seconds_per_vector": round(gvp_seconds, 3),
        "seconds": secs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(dumps(out) + "\n")
    log(f"wrote {args.out.relative_to(REPO) if args.out.is_relative_to(REPO) else args.out} in {secs['total']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
