#!/usr/bin/env python3
"""Developer-run oracle: EK-FAC factors and influence scores computed by the
reference library `kronfluence` (1.0.1), for the tiny `llama` and `qwen2`
fixture models, plus an independent dense float64 check of those scores.

Writes test/fixtures/kronfluence/<model>/:
    data.json                 token ids of the 24 training sequences and 3 queries
    meta.json                 settings (damping, tracked modules, conventions)
    factors_ekfac/            kronfluence's own factor directory, copied verbatim
    scores.safetensors        all [3,24], module.<name> [3,24], self [24],
                              all_heuristic_damping [3,24] (float64)

See test/oracle/KRONFLUENCE.md for what kronfluence stores and how.
Never run by CI. Usage (from the repo root):
    test/oracle/.venv/bin/python test/oracle/make_kronfluence.py
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from make_fixtures import install_float64_patches  # noqa: E402

from kronfluence.analyzer import Analyzer, prepare_model  # noqa: E402
from kronfluence.arguments import FactorArguments, ScoreArguments  # noqa: E402
from kronfluence.task import Task  # noqa: E402
from kronfluence.utils.dataset import DataLoaderKwargs  # noqa: E402

REPO = HERE.parents[1]
MODELS = REPO / "test" / "fixtures" / "models"
OUT = REPO / "test" / "fixtures" / "kronfluence"

MODEL_NAMES = ["llama", "qwen2"]
VOCAB = 320
PAD_ID = 0
N_TRAIN = 24
N_QUERY = 3
BATCH = 8
DAMPING = 1e-3
SEED = 20240611
LINEAR_SUFFIXES = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
]
F64 = torch.float64


# --------------------------------------------------------------------------- #
# data
# --------------------------------------------------------------------------- #
def make_data():
    g = torch.Generator().manual_seed(SEED)
    train = []
    for _ in range(N_TRAIN):
        n = int(torch.randint(6, 17, (1,), generator=g))
        train.append([int(x) for x in torch.randint(1, VOCAB, (n,), generator=g)])
    queries = []
    for _ in range(N_QUERY):
        p = int(torch.randint(4, 7, (1,), generator=g))
        c = int(torch.randint(3, 6, (1,), generator=g))
        ids = [int(x) for x in torch.randint(1, VOCAB, (p + c,), generator=g)]
        queries.append({"ids": ids, "prompt_length": p})
    return {"train": train, "queries": queries}


def target_weights(ids, prompt_length=None):
    """Engine convention: position t predicts token t+1. Returns weights for t = 0..len-2."""
    n = len(ids)
    if prompt_length is None:
        return [1.0] * (n - 1)
    return [1.0 if t + 1 >= prompt_length else 0.0 for t in range(n - 1)]


class SeqDataset(torch.utils.data.Dataset):
    def __init__(self, items):
        # items: list of (ids, labels) where labels[j] = ids[j] or -100 (HF convention:
        # label j is the target predicted at position j-1)
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def to_items_train(train):
    return [(ids, [-100] + ids[1:]) for ids in train]


def to_items_query(queries):
    out = []
    for q in queries:
        ids, p = q["ids"], q["prompt_length"]
        out.append((ids, [-100 if j < p else ids[j] for j in range(len(ids))]))
    return out


def collate(items):
    """Right padding to the batch max length."""
    L = max(len(ids) for ids, _ in items)
    input_ids = torch.full((len(items), L), PAD_ID, dtype=torch.long)
    labels = torch.full((len(items), L), -100, dtype=torch.long)
    mask = torch.zeros((len(items), L), dtype=torch.long)
    for i, (ids, lab) in enumerate(items):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(ids)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


def summed_ce(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    shift_logits = logits[:, :-1, :].reshape(-1, logits.size(-1))
    shift_labels = batch["labels"][:, 1:].reshape(-1)
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum")


class LMTask(Task):
    def __init__(self, tracked):
        self.tracked = tracked

    def compute_train_loss(self, batch, model, sample=False):
        if sample:
            raise AssertionError("use_empirical_fisher=True: labels are the data labels")
        return summed_ce(model, batch)

    def compute_measurement(self, batch, model):
        return summed_ce(model, batch)

    def get_influence_tracked_modules(self):
        return self.tracked

    def get_attention_mask(self, batch):
        return batch["attention_mask"]


def load_model(name):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(MODELS / name, attn_implementation="eager", dtype=torch.float32)
    return model.double().eval()


def tracked_names(model):
    names = []
    for i in range(model.config.num_hidden_layers):
        for s in LINEAR_SUFFIXES:
            names.append(f"model.layers.{i}.{s}")
    mods = dict(model.named_modules())
    for n in names:
        assert isinstance(mods[n], torch.nn.Linear), n
    return names


# --------------------------------------------------------------------------- #
# kronfluence run
# --------------------------------------------------------------------------- #
def run_kronfluence(name, data, workdir):
    model = load_model(name)
    tracked = tracked_names(model)
    task = LMTask(tracked)
    model = prepare_model(model, task)
    analyzer = Analyzer(
        analysis_name=name, model=model, task=task, cpu=True, disable_tqdm=True,
        output_dir=str(workdir), log_level=logging.WARNING,
    )
    dl = DataLoaderKwargs(collate_fn=collate)
    train_ds = SeqDataset(to_items_train(data["train"]))
    query_ds = SeqDataset(to_items_query(data["queries"]))
    fargs = FactorArguments(
        strategy="ekfac",
        use_empirical_fisher=True,
        covariance_max_examples=100_000,
        lambda_max_examples=100_000,
        covariance_data_partitions=1,
        covariance_module_partitions=1,
        lambda_data_partitions=1,
        lambda_module_partitions=1,
        activation_covariance_dtype=F64,
        gradient_covariance_dtype=F64,
        eigendecomposition_dtype=F64,
        per_sample_gradient_dtype=F64,
        lambda_dtype=F64,
    )
    analyzer.fit_all_factors(
        factors_name="ekfac", dataset=train_ds, per_device_batch_size=BATCH,
        dataloader_kwargs=dl, factor_args=fargs, overwrite_output_dir=True,
    )

    def sargs(**kw):
        base = dict(
            damping_factor=DAMPING, query_gradient_low_rank=None, compute_per_module_scores=False,
            compute_per_token_scores=False, data_partitions=1, module_partitions=1,
            query_gradient_svd_dtype=F64, per_sample_gradient_dtype=F64, precondition_dtype=F64,
            score_dtype=F64,
        )
        base.update(kw)
        return ScoreArguments(**base)

    scores = {}
    for sname, args in [
        ("all", sargs()),
        ("per_module", sargs(compute_per_module_scores=True)),
        ("heuristic", sargs(damping_factor=None)),
    ]:
        analyzer.compute_pairwise_scores(
            scores_name=sname, factors_name="ekfac", query_dataset=query_ds, train_dataset=train_ds,
            per_device_query_batch_size=N_QUERY, per_device_train_batch_size=BATCH,
            dataloader_kwargs=dl, score_args=args, overwrite_output_dir=True,
        )
        scores[sname] = analyzer.load_pairwise_scores(sname)
    analyzer.compute_self_scores(
        scores_name="self", factors_name="ekfac", train_dataset=train_ds, per_device_train_batch_size=BATCH,
        dataloader_kwargs=dl, score_args=sargs(), overwrite_output_dir=True,
    )
    scores["self"] = analyzer.load_self_scores("self")
    return tracked, workdir / name / "factors_ekfac", scores


# --------------------------------------------------------------------------- #
# independent dense check
# --------------------------------------------------------------------------- #
def per_example_stats(model, tracked, ids, labels):
    """Unpadded single-sequence forward/backward. Returns per-module: G [out, in(+1)]
    (bias column LAST), sum_t a a^T (with the 1 appended if bias), sum_t g g^T, #tokens."""
    mods = dict(model.named_modules())
    acts, grads = {}, {}
    hooks = []
    for n in tracked:
        m = mods[n]

        def fh(mod, inp, out, n=n):
            acts[n] = inp[0].detach()[0]
            out.register_hook(lambda g, n=n: grads.__setitem__(n, g.detach()[0]))

        hooks.append(m.register_forward_hook(fh))
    model.zero_grad(set_to_none=True)
    x = torch.tensor([ids])
    lab = torch.tensor([labels])
    logits = model(input_ids=x).logits
    loss = F.cross_entropy(logits[0, :-1], lab[0, 1:], ignore_index=-100, reduction="sum")
    loss.backward()
    for h in hooks:
        h.remove()
    out = {}
    for n in tracked:
        m = mods[n]
        a = acts[n]
        G = m.weight.grad.detach().clone()
        if m.bias is not None:
            G = torch.cat([G, m.bias.grad.detach().clone()[:, None]], dim=1)
            a = torch.cat([a, torch.ones(a.size(0), 1, dtype=a.dtype)], dim=1)
        g = grads[n]
        # sanity: autograd weight gradient == sum_t g_t a_t^T
        assert torch.allclose(G, g.t() @ a, rtol=1e-10, atol=1e-13)
        out[n] = (G, a.t() @ a, g.t() @ g, a.size(0))
    return out


def canonicalize_safetensors(path: Path) -> None:
    """safetensors (Rust) writes `__metadata__` in hash-map order, so kronfluence's files
    differ byte-wise between runs although tensors are bit-identical. Rewrite the header
    with metadata keys sorted (same bytes otherwise; header length unchanged, space-padded)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    enc = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    assert len(enc) <= n, (path, len(enc), n)
    path.write_bytes(raw[:8] + enc + b" " * (n - len(enc)) + raw[8 + n :])


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def dense_check(name, data, tracked, factor_dir, scores):
    model = load_model(name)
    train_items = to_items_train(data["train"])
    query_items = to_items_query(data["queries"])
    tr = [per_example_stats(model, tracked, ids, lab) for ids, lab in train_items]
    qu = [per_example_stats(model, tracked, ids, lab) for ids, lab in query_items]

    A = load_file(factor_dir / "activation_covariance.safetensors")
    S = load_file(factor_dir / "gradient_covariance.safetensors")
    nA = load_file(factor_dir / "num_activation_covariance_processed.safetensors")
    nS = load_file(factor_dir / "num_gradient_covariance_processed.safetensors")
    QA = load_file(factor_dir / "activation_eigenvectors.safetensors")
    QS = load_file(factor_dir / "gradient_eigenvectors.safetensors")
    eA = load_file(factor_dir / "activation_eigenvalues.safetensors")
    eS = load_file(factor_dir / "gradient_eigenvalues.safetensors")
    Lam = load_file(factor_dir / "lambda_matrix.safetensors")
    nL = load_file(factor_dir / "num_lambda_processed.safetensors")

    n_tokens = sum(len(ids) for ids in data["train"])
    errs = {"A_sum": 0.0, "S_sum": 0.0, "eig": 0.0, "lambda_sum": 0.0, "pair_module": 0.0,
            "pair_all": 0.0, "self": 0.0, "heuristic": 0.0}
    total = torch.zeros(N_QUERY, N_TRAIN, dtype=F64)
    total_h = torch.zeros(N_QUERY, N_TRAIN, dtype=F64)
    self_total = torch.zeros(N_TRAIN, dtype=F64)
    for n in tracked:
        # covariance sums and counts (padding excluded, every real token counted)
        assert int(nA[n]) == n_tokens and int(nS[n]) == n_tokens, (n, nA[n], nS[n], n_tokens)
        assert int(nL[n]) == N_TRAIN, (n, nL[n])
        A_ref = sum(t[n][1] for t in tr)
        S_ref = sum(t[n][2] for t in tr)
        errs["A_sum"] = max(errs["A_sum"], rel(A[n], A_ref))
        errs["S_sum"] = max(errs["S_sum"], rel(S[n], S_ref))
        # eigendecomposition of the MEAN covariance, ascending, eigenvectors in columns
        for C, cnt, Q, e in [(A[n], nA[n], QA[n], eA[n]), (S[n], nS[n], QS[n], eS[n])]:
            M = C / cnt
            assert bool((e[1:] >= e[:-1]).all())
            errs["eig"] = max(errs["eig"], rel(Q @ torch.diag(e) @ Q.t(), M), rel(M @ Q, Q * e[None, :]))
        # lambda = SUM over examples of (Q_S^T G Q_A)^2
        Lam_ref = sum((QS[n].t() @ t[n][0] @ QA[n]) ** 2 for t in tr)
        errs["lambda_sum"] = max(errs["lambda_sum"], rel(Lam[n], Lam_ref))

        # explicit EK-FAC matrix in row-major vec(G) (G is [out, in(+1)]):
        # vec(Q_S^T G Q_A) = (Q_S ⊗ Q_A)^T vec(G)
        E = torch.kron(QS[n], QA[n])
        lam_mean = (Lam[n] / nL[n]).reshape(-1)
        Gt = torch.stack([t[n][0].reshape(-1) for t in tr], dim=1)  # [D, 24]
        Gq = torch.stack([q[n][0].reshape(-1) for q in qu], dim=1)  # [D, 3]
        for damp, key in [(DAMPING, "pair"), (0.1 * float(lam_mean.mean()), "heur")]:
            H = E @ torch.diag(lam_mean + damp) @ E.t()
            X = torch.linalg.solve(H, Gt)
            s = Gq.t() @ X
            if key == "pair":
                errs["pair_module"] = max(errs["pair_module"], rel(scores["per_module"][n], s))
                total += s
                self_total += (Gt * X).sum(0)
            else:
                total_h += s
    errs["pair_all"] = rel(scores["all"]["all_modules"], total)
    errs["self"] = rel(scores["self"]["all_modules"], self_total)
    errs["heuristic"] = rel(scores["heuristic"]["all_modules"], total_h)
    return errs


# --------------------------------------------------------------------------- #
def main():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    install_float64_patches()
    data = make_data()
    ok = True
    for name in MODEL_NAMES:
        out = OUT / name
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        with tempfile.TemporaryDirectory() as tmp:
            tracked, fdir, scores = run_kronfluence(name, data, Path(tmp))
            shutil.copytree(fdir, out / "factors_ekfac")
        fdir = out / "factors_ekfac"
        errs = dense_check(name, data, tracked, fdir, scores)
        print(f"[{name}] dense-check max relative errors: " + ", ".join(f"{k}={v:.2e}" for k, v in errs.items()))
        if max(errs.values()) > 1e-8:
            ok = False

        tensors = {"all": scores["all"]["all_modules"].to(F64).contiguous(),
                   "self": scores["self"]["all_modules"].to(F64).contiguous(),
                   "all_heuristic_damping": scores["heuristic"]["all_modules"].to(F64).contiguous()}
        for n in tracked:
            tensors[f"module.{n}"] = scores["per_module"][n].to(F64).contiguous()
        save_file(tensors, out / "scores.safetensors",
                  metadata={"producer": "kronfluence 1.0.1 via test/oracle/make_kronfluence.py",
                            "damping_factor": repr(DAMPING)})
        (out / "data.json").write_text(json.dumps(data, indent=1) + "\n")
        meta = {
            "model": f"test/fixtures/models/{name}",
            "kronfluence_version": "1.0.1",
            "precision": "float64 model (model.double(), eager attention, oracle float64 patches)",
            "strategy": "ekfac",
            "use_empirical_fisher": True,
            "batch_size": BATCH,
            "padding": "right, pad id 0, attention_mask passed to the model and to kronfluence",
            "damping_factor": DAMPING,
            "heuristic_damping": "all_heuristic_damping uses damping_factor=None, i.e. 0.1*mean(lambda_matrix/num_lambda_processed) per module",
            "train_loss": "SUM over sequences and target positions t < len-1 of CE(logits[t], ids[t+1])",
            "measurement": "SUM over query positions t with t+1 >= prompt_length of CE(logits[t], ids[t+1])",
            "score": "sum_modules vec(G_query)^T H^-1 vec(G_train); positive = training example lowers the query loss",
            "tracked_modules": tracked,
            "scores_keys": {"all": "[3 queries, 24 train]", "module.<name>": "[3, 24]", "self": "[24]",
                            "all_heuristic_damping": "[3, 24]"},
            "dense_check_max_rel_error": {k: float(f"{v:.3e}") for k, v in errs.items()},
        }
        (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        for p in sorted(out.rglob("*.safetensors")):
            before = load_file(p)
            canonicalize_safetensors(p)
            after = load_file(p)
            assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    if not ok:
        raise SystemExit("dense check FAILED (> 1e-8)")
    print("OK")


if __name__ == "__main__":
    main()
