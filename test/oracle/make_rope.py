# RoPE inverse frequencies as transformers computes them (float32 tensors), for
# test/unit/rope-frequencies.test.ts. Run: test/oracle/.venv/bin/python test/oracle/make_rope.py
import json, os, torch, transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers import LlamaConfig
cases = [
  ("default", 128, 10000.0, {}),
  ("default", 64, 500000.0, {}),
  ("default", 16, 10000.0, {}),
  ("default", 128, 1000000.0, {}),
  ("linear", 128, 10000.0, {"factor": 4.0}),
  ("llama3", 128, 500000.0, {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
  ("llama3", 64, 500000.0, {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
]
out = []
for t, dim, theta, extra in cases:
    rp = {"rope_type": t, "rope_theta": theta, **extra}
    cfg = LlamaConfig(hidden_size=dim*4, num_attention_heads=4, head_dim=dim, rope_parameters=rp)
    fn = ROPE_INIT_FUNCTIONS[t] if t != "default" else None
    if t == "default":
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
        inv, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(cfg)
    else:
        inv, _ = fn(cfg)
    out.append({"type": t, "dim": dim, "theta": theta, "params": extra, "inv": [float(x) for x in inv.float().tolist()]})
json.dump({"transformers": transformers.__version__, "cases": out}, open(os.path.join(os.path.dirname(__file__), "..", "fixtures", "golden", "rope-inverse-frequencies.json"), "w"), indent=1)
print(transformers.__version__, len(out))
