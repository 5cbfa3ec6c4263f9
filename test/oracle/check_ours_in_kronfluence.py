#!/usr/bin/env python3
"""Developer-run oracle: do factor files written by OUR `influence-lens fit` load in
kronfluence 1.0.1, and does kronfluence score with them what they say?

Input (committed, written by our CLI; see test/oracle/README.md for the command):
    test/fixtures/kronfluence/ours-llama-fp32/factors/   our factor directory, verbatim
It is copied to <tmp>/ours/factors_ours/ (kronfluence's `<output_dir>/<analysis>/factors_<name>/`
layout) and read there by kronfluence's own Analyzer. Checks, all of which must pass:
  1. kronfluence's loaders (`load_covariance_matrices`, `load_eigendecomposition`,
     `load_lambda_matrices`) return every tensor bit-identical to the file, in its stored dtype.
  2. kronfluence's `perform_eigendecomposition` of our covariance files (fp64) gives our stored
     eigenvalues and, up to sign, our eigenvectors (checks the covariance sums and token counts).
  3. kronfluence's pairwise scores (fp64 model and score dtypes, damping 1e-3 and damping_factor=None)
     equal an independent dense fp64 computation from the raw file tensors and autograd
     per-example gradients, to 1e-8 relative.
  4. kronfluence's pairwise scores with its default dtypes (fp32 model, fp32 preconditioning and
     scores): how far they are from (3) is recorded, as the scale for the TypeScript fp32 tolerance.
Scoring data and conventions are those of make_kronfluence.py: the 3 queries x 24 training
sequences of test/fixtures/kronfluence/llama/data.json, SUM losses, right padding.

Writes test/fixtures/kronfluence/ours-llama-fp32/golden.json. Usage (from the repo root):
    test/oracle/.venv/bin/python test/oracle/check_ours_in_kronfluence.py
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from make_fixtures import install_float64_patches  # noqa: E402
from make_kronfluence import (  # noqa: E402
    LMTask,
    SeqDataset,
    collate,
    per_example_stats,
    rel,
    to_items_query,
    to_items_train,
)

import kronfluence  # noqa: E402
from kronfluence.analyzer import Analyzer, prepare_model  # noqa: E402
from kronfluence.arguments import FactorArguments, ScoreArguments  # noqa: E402
from kronfluence.utils.dataset import DataLoaderKwargs  # noqa: E402

REPO = HERE.parents[1]
FIX = REPO / "test" / "fixtures" / "kronfluence" / "ours-llama-fp32"
FACTORS = FIX / "factors"
DATA = REPO / "test" / "fixtures" / "kronfluence" / "llama" / "data.json"
MODEL = REPO / "test" / "fixtures" / "models" / "llama"
BATCH = 8
DAMPING = 1e-3
F64 = torch.float64
FILES = [
    "activation_covariance", "gradient_covariance", "num_activation_covariance_processed",
    "num_gradient_covariance_processed", "activation_eigenvectors", "activation_eigenvalues",
    "gradient_eigenvectors", "gradient_eigenvalues", "lambda_matrix", "num_lambda_processed",
]


def raw_factors():
    """Every tensor of every factor file as stored (dtype kept), read with safetensors itself."""
    out, dtypes = {}, {}
    for f in FILES:
        with safe_open(FACTORS / f"{f}.safetensors", framework="pt", device="cpu") as h:
            out[f] = {k: h.get_tensor(k) for k in h.keys()}
        dtypes[f] = sorted({str(t.dtype).replace("torch.", "") for t in out[f].values()})
    return out, dtypes


def load_model(precision):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(MODEL, attn_implementation="eager", dtype=torch.float32)
    return (m.double() if precision == "fp64" else m).eval()


def analyzer_for(precision, modules, workdir):
    """An Analyzer whose factors `ours` are a copy of our directory. One output dir per precision:
    kronfluence refuses an analysis dir whose saved model differs from the one it is given."""
    workdir = workdir / precision
    shutil.copytree(FACTORS, workdir / "ours" / "factors_ours")
    model = load_model(precision)
    task = LMTask(modules)
    model = prepare_model(model, task)
    return Analyzer(analysis_name="ours", model=model, task=task, cpu=True, disable_tqdm=True,
                    output_dir=str(workdir), log_level=logging.WARNING)


def pairwise(analyzer, data, precision, damping, tag):
    kw = dict(damping_factor=damping, query_gradient_low_rank=None, compute_per_module_scores=False,
              compute_per_token_scores=False, data_partitions=1, module_partitions=1)
    if precision == "fp64":
        kw.update(query_gradient_svd_dtype=F64, per_sample_gradient_dtype=F64, precondition_dtype=F64, score_dtype=F64)
    name = f"{precision}_{tag}"
    analyzer.compute_pairwise_scores(
        scores_name=name, factors_name="ours",
        query_dataset=SeqDataset(to_items_query(data["queries"])),
        train_dataset=SeqDataset(to_items_train(data["train"])),
        per_device_query_batch_size=len(data["queries"]), per_device_train_batch_size=BATCH,
        dataloader_kwargs=DataLoaderKwargs(collate_fn=collate), score_args=ScoreArguments(**kw),
        overwrite_output_dir=True,
    )
    return analyzer.load_pairwise_scores(name)["all_modules"].to(F64)


def check_loaders(analyzer, raw):
    """1: kronfluence's loaders return the stored tensors unchanged (no cast at load)."""
    loaded = {}
    loaded.update(analyzer.load_covariance_matrices("ours"))
    loaded.update(analyzer.load_eigendecomposition("ours"))
    loaded.update(analyzer.load_lambda_matrices("ours"))
    assert sorted(loaded) == sorted(FILES), sorted(loaded)
    for f in FILES:
        assert sorted(loaded[f]) == sorted(raw[f]), (f, sorted(loaded[f]))
        for m, t in raw[f].items():
            k = loaded[f][m]
            assert k.dtype == t.dtype and k.shape == t.shape and torch.equal(k, t), (f, m, k.dtype, t.dtype)
    return "bit-identical, stored dtypes kept"


def check_eigen_refit(analyzer, raw, modules):
    """2: kronfluence's own fp64 eigendecomposition of our covariance files."""
    analyzer.perform_eigendecomposition(
        factors_name="refit", load_from_factors_name="ours", overwrite_output_dir=True,
        factor_args=FactorArguments(strategy="ekfac", eigendecomposition_dtype=F64),
    )
    refit = analyzer.load_eigendecomposition("refit")
    errs = {"eigenvalues": 0.0, "eigenvectors_up_to_sign": 0.0}
    for m in modules:
        for side in ("activation", "gradient"):
            e_ours = raw[f"{side}_eigenvalues"][m].to(F64)
            e_k = refit[f"{side}_eigenvalues"][m].to(F64)  # cast back to the covariance dtype (F32) by kronfluence
            errs["eigenvalues"] = max(errs["eigenvalues"], rel(e_k, e_ours))
            Q = raw[f"{side}_eigenvectors"][m].to(F64)
            Qk = refit[f"{side}_eigenvectors"][m].to(F64)
            # column j of each is eigenvector j; |<q_j, q'_j>| = 1 when the eigenvalues are distinct
            d = (Q * Qk).sum(0).abs()
            errs["eigenvectors_up_to_sign"] = max(errs["eigenvectors_up_to_sign"], float((1 - d).abs().max()))
    return errs


def dense_scores(raw, modules, data, damping):
    """3: scores from the raw file tensors with explicit matrices, independent of kronfluence and of us:
    score(q, z) = sum_modules vec(G_q)^T (Q_S kron Q_A) diag(1/(lam/n + d)) (Q_S kron Q_A)^T vec(G_z),
    with d = damping, or 0.1 * mean(lam/n) per module when damping is None."""
    model = load_model("fp64")
    tr = [per_example_stats(model, modules, ids, lab) for ids, lab in to_items_train(data["train"])]
    qu = [per_example_stats(model, modules, ids, lab) for ids, lab in to_items_query(data["queries"])]
    total = torch.zeros(len(qu), len(tr), dtype=F64)
    for m in modules:
        QA = raw["activation_eigenvectors"][m].to(F64)
        QS = raw["gradient_eigenvectors"][m].to(F64)
        lam = (raw["lambda_matrix"][m].to(F64) / raw["num_lambda_processed"][m].to(F64)).reshape(-1)
        d = 0.1 * float(lam.mean()) if damping is None else damping
        E = torch.kron(QS, QA)
        Gt = torch.stack([t[m][0].reshape(-1) for t in tr], dim=1)
        Gq = torch.stack([q[m][0].reshape(-1) for q in qu], dim=1)
        total += Gq.t() @ (E @ torch.diag(1.0 / (lam + d)) @ (E.t() @ Gt))
    return total


def spearman(a, b):
    ra = torch.argsort(torch.argsort(a)).to(F64)
    rb = torch.argsort(torch.argsort(b)).to(F64)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def main():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    data = json.loads(DATA.read_text())
    ours_args = json.loads((FACTORS / "influence_lens_arguments.json").read_text())
    modules = list(ours_args["modules"])
    raw, dtypes = raw_factors()
    for f in FILES:
        assert sorted(raw[f]) == sorted(modules), (f, sorted(raw[f]))
    settings = {"fp64": {"damping_1e-3": DAMPING, "heuristic": None}, "fp32": {"damping_1e-3": DAMPING, "heuristic": None}}
    scores = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        # 4 first: kronfluence's defaults on an fp32 model, before the fp64 patches are installed
        a32 = analyzer_for("fp32", modules, work)
        scores["fp32"] = {tag: pairwise(a32, data, "fp32", d, tag) for tag, d in settings["fp32"].items()}
        install_float64_patches()
        a64 = analyzer_for("fp64", modules, work)
        load_check = check_loaders(a64, raw)
        eigen_errs = check_eigen_refit(a64, raw, modules)
        scores["fp64"] = {tag: pairwise(a64, data, "fp64", d, tag) for tag, d in settings["fp64"].items()}
    dense_errs = {tag: rel(scores["fp64"][tag], dense_scores(raw, modules, data, d))
                  for tag, d in settings["fp64"].items()}
    fp32_vs_fp64 = {
        tag: {
            "max_rel": rel(scores["fp32"][tag], scores["fp64"][tag]),
            "min_spearman": min(spearman(scores["fp32"][tag][q], scores["fp64"][tag][q])
                                for q in range(len(data["queries"]))),
        }
        for tag in settings["fp32"]
    }
    print(f"loaders: {load_check}")
    print("kronfluence eigendecomposition of our covariances: " + ", ".join(f"{k}={v:.2e}" for k, v in eigen_errs.items()))
    print("kronfluence fp64 scores vs dense: " + ", ".join(f"{k}={v:.2e}" for k, v in dense_errs.items()))
    print(f"kronfluence fp32 defaults vs its fp64: {fp32_vs_fp64}")
    if max(dense_errs.values()) > 1e-8:
        raise SystemExit("kronfluence's scores from our files differ from the dense check (> 1e-8)")
    if eigen_errs["eigenvalues"] > 1e-5 or eigen_errs["eigenvectors_up_to_sign"] > 1e-4:
        raise SystemExit(f"kronfluence's eigendecomposition of our covariances differs from ours: {eigen_errs}")

    golden = {
        "producer": f"kronfluence {kronfluence.__version__} (torch {torch.__version__}) via test/oracle/check_ours_in_kronfluence.py",
        "factors": "factors (written by: influence-lens fit, see test/oracle/README.md)",
        "data": "../llama/data.json (3 queries x 24 train; conventions of make_kronfluence.py)",
        "model": "test/fixtures/models/llama, eager attention",
        "modules": modules,
        "file_dtypes": dtypes,
        "kronfluence_loaders": load_check,
        "kronfluence_eigendecomposition_of_our_covariances_max_err": eigen_errs,
        "dense_check_max_rel_error": dense_errs,
        "fp32_vs_fp64": fp32_vs_fp64,
        "scores": {
            prec: {
                tag: {"damping_factor": settings[prec][tag], "all": scores[prec][tag].tolist()}
                for tag in settings[prec]
            }
            for prec in ("fp64", "fp32")
        },
        "notes": {
            "fp64": "model.double() with the oracle's float64 patches; ScoreArguments per_sample_gradient, precondition and score dtypes float64",
            "fp32": "float32 model; kronfluence's default ScoreArguments dtypes (float32 per-sample gradients, preconditioning and scores)",
            "heuristic": "damping_factor=None: 0.1 * mean(lambda_matrix / num_lambda_processed) per module",
        },
    }
    (FIX / "golden.json").write_text(json.dumps(golden, indent=1) + "\n")
    print("OK")


if __name__ == "__main__":
    main()
