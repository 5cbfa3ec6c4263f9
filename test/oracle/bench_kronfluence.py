#!/usr/bin/env python3
"""Developer-run benchmark: the kronfluence (1.0.1) side of `npm run bench -- ekfac`.

It fits EK-FAC factors with kronfluence and scores every query against every training
example (`compute_pairwise_scores`). It uses the same conventions as our engine and as
make_kronfluence.py (see KRONFLUENCE.md):
  * SUM cross-entropy. Training examples use every target (t < len-1). Queries mask the prompt:
    labels -100 for positions j < prompt_length, so target t+1 counts only when t+1 >= prompt_length.
  * batches are right-padded (pad id = config.pad_token_id, else 0; labels -100).
    The attention mask goes to the model and is returned by Task.get_attention_mask, so
    the covariances count only attention-mask tokens.
  * empirical Fisher (data labels) by default, or --labels sampled (labels drawn from the model).
  * absolute damping (--damping, default 1e-3) added to the mean lambda. No heuristic.
  * tracked modules: the decoder Linear layers (--modules mlp|all). lm_head is never tracked.

Timing (time.perf_counter, CPU, torch.set_num_threads(--threads)):
  * fit: fit_covariance_matrices + perform_eigendecomposition + fit_lambda_matrices on the
    whole train set. These three calls are exactly the body of Analyzer.fit_all_factors;
    we make them one by one only to get a per-phase split. A warm-up fit on the first
    --batch-size train examples runs BEFORE it, and is timed and reported separately
    (warmup.fit_seconds) but is NOT in fit_seconds.
  * score: compute_pairwise_scores for all queries (one query batch) × all train examples.
    This includes the query gradients, their preconditioning, per-example train gradients,
    the dot products, and loading/saving kronfluence's files. A warm-up scoring run
    (all queries × the first --batch-size train examples) runs BEFORE it and is excluded.
  * candidates_per_second = n_train / score_seconds: training examples scored per second
    for the whole query batch (each candidate is scored against every query).
  * fit_tokens_per_second = tokens_train / fit_seconds (tokens_train = Σ len(train sequence),
    padding excluded). Both passes over the data (covariance and lambda) are in fit_seconds.

Writes <out>/kronfluence_bench.json and <out>/kronfluence_scores.json ([n_queries][n_train]).
kronfluence's own files go to <out>/kronfluence_tmp/, which is deleted at the end unless you pass
--keep-factors. No network access: the model is loaded with local_files_only.

Usage (from the repo root):
    test/oracle/.venv/bin/python test/oracle/bench_kronfluence.py --model <hf-dir> \
        --data <data.json> --out <dir> [--threads N] [--labels empirical|sampled] \
        [--modules mlp|all] [--damping 1e-3] [--batch-size 8]
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# Module suffixes per architecture (HF module names), split as the engine splits them
# (src/server/model/architectures/*.ts: kind 'attention' vs 'mlp').
ARCH_SUFFIXES = {
    "llama": (["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"],
              ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]),
    "gpt_neox": (["attention.query_key_value", "attention.dense"],
                 ["mlp.dense_h_to_4h", "mlp.dense_4h_to_h"]),
    "gpt2": (["attn.c_attn", "attn.c_proj"], ["mlp.c_fc", "mlp.c_proj"]),
    "phi3": (["self_attn.qkv_proj", "self_attn.o_proj"], ["mlp.gate_up_proj", "mlp.down_proj"]),
}
ARCH_OF = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama", "gemma3_text": "llama",
           "gpt_neox": "gpt_neox", "gpt2": "gpt2", "phi3": "phi3"}


# --------------------------------------------------------------------------- #
# data
# --------------------------------------------------------------------------- #
class SeqDataset(torch.utils.data.Dataset):
    """Items are (ids, labels). labels[j] = ids[j] or -100, in the HF convention where label j
    is the target predicted at position j-1."""

    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def train_items(train):
    return [(ids, [-100] + ids[1:]) for ids in train]


def query_items(queries):
    out = []
    for q in queries:
        ids, p = q["ids"], q["prompt_length"]
        out.append((ids, [-100 if j < p else ids[j] for j in range(len(ids))]))
    return out


def make_collate(pad_id):
    def collate(items):
        """Right-pads to the longest sequence in the batch."""
        L = max(len(ids) for ids, _ in items)
        input_ids = torch.full((len(items), L), pad_id, dtype=torch.long)
        labels = torch.full((len(items), L), -100, dtype=torch.long)
        mask = torch.zeros((len(items), L), dtype=torch.long)
        for i, (ids, lab) in enumerate(items):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, : len(ids)] = torch.tensor(lab)
            mask[i, : len(ids)] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}

    return collate


# --------------------------------------------------------------------------- #
# task
# --------------------------------------------------------------------------- #
def make_task(tracked, labels_mode):
    from kronfluence.task import Task

    def logits_of(model, batch):
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    def summed_ce(logits, labels):
        shift_logits = logits[:, :-1, :].reshape(-1, logits.size(-1))
        shift_labels = labels[:, 1:].reshape(-1)
        return F.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum")

    class LMTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            logits = logits_of(model, batch)
            labels = batch["labels"]
            if sample:
                # true Fisher: labels drawn from the model's own predictive distribution at the
                # same target positions (one draw per position; the torch RNG is seeded by --seed)
                with torch.no_grad():
                    probs = torch.softmax(logits[:, :-1, :].detach().double(), dim=-1)
                    drawn = torch.multinomial(probs.reshape(-1, probs.size(-1)), 1).reshape(probs.shape[:2])
                    shifted = labels[:, 1:]
                    labels = labels.clone()
                    labels[:, 1:] = torch.where(shifted != -100, drawn, shifted)
            return summed_ce(logits, labels)

        def compute_measurement(self, batch, model):
            return summed_ce(logits_of(model, batch), batch["labels"])

        def get_influence_tracked_modules(self):
            return tracked

        def get_attention_mask(self, batch):
            return batch["attention_mask"]

    if labels_mode not in ("empirical", "sampled"):
        raise SystemExit(f"--labels must be empirical or sampled, got {labels_mode!r}")
    return LMTask()


# --------------------------------------------------------------------------- #
# model
# --------------------------------------------------------------------------- #
def conv1d_to_linear(model):
    """GPT-2's HF `Conv1D` (y = x W + b, W [in, out]) is not an nn.Linear, and kronfluence
    only tracks nn.Linear / nn.Conv2d. Swap each one for an equivalent nn.Linear with weight Wᵀ,
    at the same module name. The function and the gradients are the same, and the layout is
    [out, in], like every other architecture."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        return 0
    swaps = [(n, m) for n, m in model.named_modules() if isinstance(m, Conv1D)]
    for name, m in swaps:
        d_in, d_out = m.weight.shape
        lin = torch.nn.Linear(d_in, d_out, bias=m.bias is not None, dtype=m.weight.dtype)
        with torch.no_grad():
            lin.weight.copy_(m.weight.t())
            if m.bias is not None:
                lin.bias.copy_(m.bias)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, lin)
    return len(swaps)


def tracked_names(model, modules):
    mt = model.config.model_type
    if mt not in ARCH_OF:
        raise SystemExit(f"unsupported model_type {mt!r} (known: {', '.join(sorted(ARCH_OF))})")
    attn, mlp = ARCH_SUFFIXES[ARCH_OF[mt]]
    suffixes = mlp if modules == "mlp" else attn + mlp
    # the decoder blocks: the ModuleList whose children are numbered 0..n_layers-1
    n_layers = model.config.num_hidden_layers
    mods = dict(model.named_modules())
    prefixes = [n for n, m in mods.items() if isinstance(m, torch.nn.ModuleList) and len(m) == n_layers
                and n.endswith((".layers", ".h"))]
    if len(prefixes) != 1:
        raise SystemExit(f"cannot find the decoder layer list (candidates: {prefixes})")
    names = []
    for i in range(n_layers):
        for s in suffixes:
            n = f"{prefixes[0]}.{i}.{s}"
            if not isinstance(mods.get(n), torch.nn.Linear):
                raise SystemExit(f"expected an nn.Linear at {n}, got {type(mods.get(n)).__name__}")
            names.append(n)
    return names


def load_model(path, precision, attn):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation=attn, local_files_only=True)
    if precision == "float64":
        # the oracle's float64 patches (softmax, RMSNorm, rotary kept in float64: transformers
        # computes rotary in float32 even in a double model), as make_kronfluence.py uses
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from make_fixtures import install_float64_patches
        from make_variants import install_gemma3_float64_patches

        install_float64_patches()
        install_gemma3_float64_patches()
        model = model.double()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    return model


# --------------------------------------------------------------------------- #
# main
# --------------------------------------------------------------------------- #
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="HF model directory (config.json + model.safetensors)")
    ap.add_argument("--data", required=True, help='data.json: {"train": [[ids]...], "queries": [{"ids", "prompt_length"}...]}')
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads (default: os.cpu_count())")
    ap.add_argument("--labels", choices=["empirical", "sampled"], default="empirical")
    ap.add_argument("--modules", choices=["mlp", "all"], default="all",
                    help="with --adapter, ignored: the adapter's LoRA A and B layers are tracked")
    ap.add_argument("--adapter", help="a PEFT LoRA adapter folder over --model (PeftModel.from_pretrained)")
    ap.add_argument("--damping", type=float, default=1e-3, help="absolute damping added to the mean lambda")
    ap.add_argument("--batch-size", type=int, default=8, help="train batch size (fitting and scoring)")
    ap.add_argument("--query-batch-size", type=int, default=0, help="query batch size (default 0 = all queries in one batch)")
    ap.add_argument("--precision", choices=["default", "float64"], default="default",
                    help="default: fp32 model and kronfluence's default dtypes; float64: model.double() and every kronfluence dtype float64 (for agreement checks, not for speed)")
    ap.add_argument("--attn-implementation", default="sdpa", help="transformers attention implementation (default sdpa)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eigendecomposition-dtype", choices=["float64", "float32"], default="float64",
                    help="FactorArguments.eigendecomposition_dtype (kronfluence's default float64)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="timed fit+score runs after the warm-up; the reported times are the medians (default 1)")
    ap.add_argument("--no-warmup", action="store_true", help="skip the warm-up fit and scoring runs")
    ap.add_argument("--gc-freeze", action="store_true",
                    help="gc.freeze() before the timed runs: kronfluence calls gc.collect() in release_memory() at every "
                         "phase boundary, which costs ~0.2 s per call with torch+transformers loaded; freezing the heap "
                         "makes those calls cheap (NOT kronfluence's default behaviour; off by default)")
    ap.add_argument("--keep-factors", action="store_true", help="keep kronfluence's files in <out>/kronfluence_tmp")
    return ap.parse_args(argv)


class ReleaseMemoryTimer:
    """Times kronfluence.utils.state.release_memory (gc.collect + torch.compiler.reset, plus cuda
    cache emptying on GPU), which kronfluence calls at the start and end of every phase. It is part
    of kronfluence's normal pipeline, so it stays inside the timings. We only measure it, so it can
    be reported apart. We wrap every kronfluence module's reference to the function."""

    def __init__(self):
        from kronfluence.utils import state

        self.seconds, self.calls = 0.0, 0
        orig = state.release_memory

        def timed():
            t0 = time.perf_counter()
            try:
                return orig()
            finally:
                self.seconds += time.perf_counter() - t0
                self.calls += 1

        for name, mod in list(sys.modules.items()):
            if (name == "kronfluence" or name.startswith("kronfluence.")) and getattr(mod, "release_memory", None) is orig:
                setattr(mod, "release_memory", timed)

    def snapshot(self):
        return self.seconds, self.calls


def main(argv=None):
    args = parse_args(argv)
    if args.threads < 1:
        raise SystemExit("--threads must be >= 1")
    if args.repeats < 1 or args.batch_size < 1 or args.query_batch_size < 0:
        raise SystemExit("--repeats and --batch-size must be >= 1, --query-batch-size >= 0")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    import kronfluence
    import transformers
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.utils.dataset import DataLoaderKwargs

    # kronfluence 1.0.1 builds torch.cuda.amp.GradScaler (deprecated) even on CPU: one FutureWarning per phase
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*GradScaler.*")
    # the library logs through `logging`; keep it quiet (warnings still show)
    logging.getLogger("kronfluence").setLevel(logging.WARNING)
    try:
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except AttributeError:  # pragma: no cover
        pass

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = out / "kronfluence_tmp"
    if work.exists():
        shutil.rmtree(work)

    data = json.loads(Path(args.data).read_text())
    train, queries = data["train"], data["queries"]
    if not train or not queries:
        raise SystemExit("data.json needs a non-empty 'train' and 'queries'")
    n_train, n_query = len(train), len(queries)
    tokens_train = sum(len(x) for x in train)

    model = load_model(args.model, args.precision, args.attn_implementation)
    if args.adapter:
        # PEFT's forward (dropout off in eval mode); the tracked modules are the LoRA A and B
        # Linear layers, as influence-lens tracks for an adapter
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter, is_trainable=True).eval()
        for p in model.parameters():
            p.requires_grad_(True)
        tracked = [n for n, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and n.endswith((".lora_A.default", ".lora_B.default"))]
        if not tracked:
            raise SystemExit(f"{args.adapter}: no LoRA A/B Linear layers found")
        n_conv = 0
    else:
        n_conv = conv1d_to_linear(model)
        tracked = tracked_names(model, args.modules)
    pad_id = model.config.pad_token_id if getattr(model.config, "pad_token_id", None) is not None else 0
    task = make_task(tracked, args.labels)
    model = prepare_model(model, task)

    f64 = torch.float64
    if args.precision == "float64":
        fdt = dict(activation_covariance_dtype=f64, gradient_covariance_dtype=f64, eigendecomposition_dtype=f64,
                   per_sample_gradient_dtype=f64, lambda_dtype=f64)
        sdt = dict(query_gradient_svd_dtype=f64, per_sample_gradient_dtype=f64, precondition_dtype=f64, score_dtype=f64)
    else:
        fdt, sdt = {}, {}  # kronfluence defaults
    if args.eigendecomposition_dtype == "float32":
        fdt["eigendecomposition_dtype"] = torch.float32
    factor_args = FactorArguments(
        strategy="ekfac",
        use_empirical_fisher=args.labels == "empirical",
        covariance_max_examples=None,  # all examples
        lambda_max_examples=None,
        covariance_data_partitions=1,
        covariance_module_partitions=1,
        lambda_data_partitions=1,
        lambda_module_partitions=1,
        **fdt,
    )
    score_args = ScoreArguments(
        damping_factor=args.damping,
        query_gradient_low_rank=None,
        compute_per_module_scores=False,
        compute_per_token_scores=False,
        data_partitions=1,
        module_partitions=1,
        **sdt,
    )

    train_ds = SeqDataset(train_items(train))
    query_ds = SeqDataset(query_items(queries))
    dl = DataLoaderKwargs(collate_fn=make_collate(pad_id))
    qbs = args.query_batch_size or n_query
    bs = args.batch_size

    analyzer = Analyzer(analysis_name="bench", model=model, task=task, cpu=True, disable_tqdm=True,
                        output_dir=str(work), log_level=logging.WARNING)

    rm = ReleaseMemoryTimer()
    if args.gc_freeze:
        gc.collect()
        gc.freeze()

    def fit(name, ds):
        t = {}
        rm0 = rm.snapshot()
        t0 = time.perf_counter()
        analyzer.fit_covariance_matrices(factors_name=name, dataset=ds, per_device_batch_size=bs,
                                         dataloader_kwargs=dl, factor_args=factor_args, overwrite_output_dir=True)
        t1 = time.perf_counter()
        analyzer.perform_eigendecomposition(factors_name=name, factor_args=factor_args, overwrite_output_dir=True)
        t2 = time.perf_counter()
        analyzer.fit_lambda_matrices(factors_name=name, dataset=ds, per_device_batch_size=bs,
                                     dataloader_kwargs=dl, factor_args=factor_args, overwrite_output_dir=True)
        t3 = time.perf_counter()
        t["covariance_seconds"], t["eigendecomposition_seconds"], t["lambda_seconds"] = t1 - t0, t2 - t1, t3 - t2
        rm1 = rm.snapshot()
        t["release_memory_seconds"], t["release_memory_calls"] = rm1[0] - rm0[0], rm1[1] - rm0[1]
        return t3 - t0, t

    def score(name, factors_name, ds):
        rm0 = rm.snapshot()
        t0 = time.perf_counter()
        analyzer.compute_pairwise_scores(scores_name=name, factors_name=factors_name, query_dataset=query_ds,
                                         train_dataset=ds, per_device_query_batch_size=qbs,
                                         per_device_train_batch_size=bs, dataloader_kwargs=dl,
                                         score_args=score_args, overwrite_output_dir=True)
        t1 = time.perf_counter()
        rm1 = rm.snapshot()
        return t1 - t0, {"release_memory_seconds": rm1[0] - rm0[0], "release_memory_calls": rm1[1] - rm0[1]}

    try:
        warmup = None
        if not args.no_warmup:
            # same code paths on a small slice: first-call costs (allocator, oneDNN/MKL kernel
            # selection, lazy imports) happen here, not in the timed runs
            sub = torch.utils.data.Subset(train_ds, list(range(min(bs, n_train))))
            wf, wphases = fit("warmup", sub)
            ws, wsphases = score("warmup", "warmup", sub)
            warmup = {"n_train": len(sub), "fit_seconds": wf, "fit_phases": wphases, "score_seconds": ws,
                      "score_phases": wsphases}

        runs = []
        for _ in range(args.repeats):
            f_s, f_ph = fit("ekfac", train_ds)
            s_s, s_ph = score("pairwise", "ekfac", train_ds)
            runs.append({"fit_seconds": f_s, "fit_phases": f_ph, "score_seconds": s_s, "score_phases": s_ph})
        mid = (len(runs) - 1) // 2  # lower median: an actual run, no averaging
        fit_run = sorted(runs, key=lambda r: r["fit_seconds"])[mid]
        score_run = sorted(runs, key=lambda r: r["score_seconds"])[mid]
        fit_seconds, phases = fit_run["fit_seconds"], fit_run["fit_phases"]
        score_seconds, score_phases = score_run["score_seconds"], score_run["score_phases"]

        scores = analyzer.load_pairwise_scores("pairwise")["all_modules"]
        assert tuple(scores.shape) == (n_query, n_train), scores.shape
        scores = scores.double().tolist()
        bad = sum(1 for row in scores for x in row if not math.isfinite(x))
        if bad:
            raise SystemExit(f"kronfluence produced {bad} non-finite scores")
    finally:
        if args.gc_freeze:
            gc.unfreeze()
        if not args.keep_factors:
            shutil.rmtree(work, ignore_errors=True)

    def dtype_name(d):
        return str(d).replace("torch.", "")

    report = {
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "kronfluence": getattr(kronfluence, "__version__", None) or _dist_version("kronfluence"),
            "python": platform.python_version(),
        },
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "n_train": n_train,
        "n_queries": n_query,
        "tokens_train": tokens_train,
        "fit_seconds": fit_seconds,
        "fit_phases": phases,
        "score_seconds": score_seconds,
        "score_phases": score_phases,
        "candidates_per_second": n_train / score_seconds,
        "pairs_per_second": n_train * n_query / score_seconds,
        "fit_tokens_per_second": tokens_train / fit_seconds,
        # this Python process's peak resident memory (torch, the model, the fits and the scoring)
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        # kronfluence's release_memory() (mostly gc.collect over the whole Python heap) is a fixed
        # cost per phase that dominates on tiny models; these are the same runs with it subtracted
        "without_release_memory": {
            "fit_seconds": fit_seconds - phases["release_memory_seconds"],
            "score_seconds": score_seconds - score_phases["release_memory_seconds"],
            "candidates_per_second": n_train / (score_seconds - score_phases["release_memory_seconds"]),
            "fit_tokens_per_second": tokens_train / (fit_seconds - phases["release_memory_seconds"]),
        },
        "warmup": warmup,
        "runs": runs,
        "modules": tracked,
        "settings": {
            "model": str(Path(args.model).resolve()),
            "model_type": model.config.model_type,
            "data": str(Path(args.data).resolve()),
            "device": "cpu",
            "precision": args.precision,
            "model_dtype": dtype_name(next(model.parameters()).dtype),
            "attn_implementation": args.attn_implementation,
            "strategy": "ekfac",
            "labels": args.labels,
            "use_empirical_fisher": factor_args.use_empirical_fisher,
            "modules": "lora" if args.adapter else args.modules,
            "adapter": args.adapter,
            "conv1d_swapped_for_linear": n_conv,
            "damping_factor": args.damping,
            "damping": "absolute, added to lambda_matrix / num_lambda_processed (kronfluence Ekfac.prepare)",
            "batch_size": bs,
            "query_batch_size": qbs,
            "pad_id": pad_id,
            "padding": "right; labels -100 and attention_mask 0 on padding; attention_mask passed to the model and to kronfluence",
            "train_loss": "SUM over target positions t < len-1 of CE(logits[t], ids[t+1])",
            "measurement": "SUM over query positions t with t+1 >= prompt_length of CE(logits[t], ids[t+1])",
            "factor_dtypes": {k: dtype_name(getattr(factor_args, k)) for k in (
                "activation_covariance_dtype", "gradient_covariance_dtype", "eigendecomposition_dtype",
                "per_sample_gradient_dtype", "lambda_dtype")},
            "score_dtypes": {k: dtype_name(getattr(score_args, k)) for k in (
                "query_gradient_svd_dtype", "per_sample_gradient_dtype", "precondition_dtype", "score_dtype")},
            "seed": args.seed,
            "gc_freeze": args.gc_freeze,
            "repeats": args.repeats,
            "fit_timing": "(lower median over --repeats runs of) fit_covariance_matrices + perform_eigendecomposition + fit_lambda_matrices (= Analyzer.fit_all_factors) on all train examples, warm-up excluded",
            "score_timing": "(lower median over --repeats runs of) compute_pairwise_scores, all queries x all train examples, includes query gradients and preconditioning, warm-up excluded",
            "candidates_per_second": "n_train / score_seconds (each candidate is scored against every query)",
            "scores_file": "kronfluence_scores.json: [n_queries][n_train], positive = the training example lowers the query loss",
        },
    }
    (out / "kronfluence_scores.json").write_text(json.dumps(scores) + "\n")
    (out / "kronfluence_bench.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"kronfluence {report['versions']['kronfluence']}, {report['threads']} threads, "
          f"{n_train} train ({tokens_train} tokens) x {n_query} queries, {len(tracked)} modules: "
          f"fit {fit_seconds:.3f} s ({report['fit_tokens_per_second']:.0f} tokens/s), "
          f"score {score_seconds:.3f} s ({report['candidates_per_second']:.1f} candidates/s)"
          + f" [without release_memory: fit {report['without_release_memory']['fit_seconds']:.3f} s, "
            f"score {report['without_release_memory']['score_seconds']:.3f} s]"
          + (f"; warm-up fit {warmup['fit_seconds']:.3f} s, score {warmup['score_seconds']:.3f} s" if warmup else ""))
    return 0


def _dist_version(name):
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # pragma: no cover
        return None


if __name__ == "__main__":
    sys.exit(main())
