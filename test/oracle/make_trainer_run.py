"""A real transformers Trainer run with checkpoints, for the checkpoint-discovery tests.

Fine-tunes the tiny test/fixtures/models/llama for 6 steps with save_steps=3 and
logging_steps=2 (so checkpoint-3 falls between two log entries: its learning rate is the
entry at step 2), then saves the final model into the output_dir as users do
(trainer.save_model()). Writes test/fixtures/trainer_run/:
  config.json, model.safetensors, tokenizer files      the final model
  checkpoint-3/, checkpoint-6/                           Trainer checkpoints (trainer_state.json
                                                         exactly as this transformers writes it)
  train.jsonl                                            the training data, as JSONL
save_only_model=True leaves out optimizer.pt/scheduler.pt/rng_state.pth (size); the
checkpoint folders are otherwise as the Trainer writes them.

Run: test/oracle/.venv/bin/python test/oracle/make_trainer_run.py
"""
import json
import os
import shutil
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments, set_seed

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
BASE = os.path.join(ROOT, "test/fixtures/models/llama")
OUT = os.path.join(ROOT, "test/fixtures/trainer_run")

TEXTS = [
    ("The capital of France is", " Paris."),
    ("The capital of Spain is", " Madrid."),
    ("The capital of Italy is", " Rome."),
    ("The capital of Peru is", " Lima."),
    ("The sky is", " blue."),
    ("Grass is", " green."),
    ("Snow is", " white."),
    ("Coal is", " black."),
]


class Data(torch.utils.data.Dataset):
    def __init__(self, tok):
        self.rows = []
        for p, c in TEXTS:
            ids_p = tok(p)["input_ids"]
            ids = tok(p + c)["input_ids"]
            labels = [-100] * len(ids_p) + ids[len(ids_p):]
            self.rows.append({"input_ids": ids, "labels": labels})

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def collate(batch):
    n = max(len(b["input_ids"]) for b in batch)
    pad = lambda xs, v: xs + [v] * (n - len(xs))
    return {
        "input_ids": torch.tensor([pad(b["input_ids"], 0) for b in batch]),
        "labels": torch.tensor([pad(b["labels"], -100) for b in batch]),
        "attention_mask": torch.tensor([pad([1] * len(b["input_ids"]), 0) for b in batch]),
    }


def main():
    set_seed(0)
    torch.use_deterministic_algorithms(True)
    tok = AutoTokenizer.from_pretrained(BASE)
    model = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32)
    if os.path.exists(OUT):
        shutil.rmtree(OUT)
    args = TrainingArguments(
        output_dir=OUT,
        max_steps=6,
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        lr_scheduler_type="linear",
        logging_steps=2,
        save_steps=3,
        save_only_model=True,
        report_to=[],
        seed=0,
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Data(tok), data_collator=collate, processing_class=tok)
    trainer.train()
    trainer.save_model(OUT)
    # runs leave training_args.bin (a pickle we never read): keep the folder free of pickles
    for root, _, files in os.walk(OUT):
        for f in files:
            if f.endswith(".bin") or f.endswith(".pth") or f.endswith(".pt"):
                os.remove(os.path.join(root, f))
    with open(os.path.join(OUT, "train.jsonl"), "w") as f:
        for p, c in TEXTS:
            f.write(json.dumps({"prompt": p, "completion": c}) + "\n")
    for c in sorted(os.listdir(OUT)):
        print(c)
    print(open(os.path.join(OUT, "checkpoint-3", "trainer_state.json")).read(), file=sys.stderr)


if __name__ == "__main__":
    main()
