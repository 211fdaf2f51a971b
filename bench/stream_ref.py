"""A float64 reference for log-probs on checkpoints too large for memory, written plainly.

`stream_ref.py CHECKPOINT ROWS.json [float32]`: ROWS.json holds [{"ids": [...], "start": s}, ...];
prints one JSON line {"logps": [[log p(ids[t] | ids[:t]) for t >= max(s, 1)] per row], "seconds",
"peak_rss": bytes, "blas"}. In float64 (the default) it is the parity reference of the 7B-shaped
checks; in float32 it is PyTorch's side of the 7B log-probs bench (a float32 7B model, 31 GB, does
not fit the machine, so PyTorch streams it too).

The model runs one decoder layer at a time: each layer's tensors are read from the safetensors
shards (bf16, f16 or f32), widened to float64, used for every row, and dropped before the next
layer is read. So a 7B model's reference needs one layer in float64 (~1.6 GB) and the hidden
states, not the model. Covers the architectures prefopt's decoder does without rope scaling or
sliding windows: llama, qwen2, qwen3 (q/k norms) and 360Zhinao (fused, grouped qkv_proj)."""
import json, os, resource, struct, sys, time
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from blas import blas_in_use

T0 = time.perf_counter()

torch.set_num_threads(os.cpu_count() or 1)
DIR, ROWS = sys.argv[1], json.load(open(sys.argv[2]))
DT = torch.float32 if sys.argv[3:4] == ["float32"] else torch.float64
cfg = json.load(open(os.path.join(DIR, "config.json")))
D, H, L, V = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_hidden_layers"], cfg["vocab_size"]
KV = cfg.get("num_key_value_heads", H)
HD = cfg.get("head_dim") or D // H
EPS, THETA = cfg.get("rms_norm_eps", 1e-6), cfg.get("rope_theta", 10000.0)
ZHINAO = cfg["model_type"] == "zhinao"
TIED = cfg.get("tie_word_embeddings", False)
assert not cfg.get("rope_scaling") and not cfg.get("sliding_window"), "rope scaling and sliding windows are not covered"

# Where each tensor is: (file, dtype, shape, begin, end).
index = os.path.join(DIR, "model.safetensors.index.json")
files = sorted(set(json.load(open(index))["weight_map"].values())) if os.path.exists(index) else ["model.safetensors"]
where = {}
for f in files:
    path = os.path.join(DIR, f)
    with open(path, "rb") as fh:
        n = struct.unpack("<Q", fh.read(8))[0]
        header = json.loads(fh.read(n))
    for name, t in header.items():
        if name != "__metadata__":
            where[name] = (path, t["dtype"], t["shape"], 8 + n + t["data_offsets"][0], 8 + n + t["data_offsets"][1])


def get(name):
    path, dt, shape, b, e = where[name]
    raw = np.fromfile(path, dtype=np.uint8, count=e - b, offset=b)
    if dt == "BF16":
        x = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    elif dt == "F16":
        x = raw.view(np.float16)
    else:
        x = raw.view(np.float32)
    return torch.from_numpy(x.astype(np.float64 if DT == torch.float64 else np.float32)).reshape(shape)


def has(name):
    return name in where


def rms(x, w):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + EPS) * w


def rope(x):  # x [T, heads, HD]
    T = x.shape[0]
    inv = THETA ** (-torch.arange(0, HD, 2, dtype=torch.float64) / HD)
    ang = (torch.arange(T, dtype=torch.float64)[:, None] * inv[None]).to(DT)
    cos, sin = torch.cat([ang.cos()] * 2, -1)[:, None], torch.cat([ang.sin()] * 2, -1)[:, None]
    half = HD // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos + rot * sin


def linear(x, p, name):
    y = x @ get(f"{p}.{name}.weight").t()
    return y + get(f"{p}.{name}.bias") if has(f"{p}.{name}.bias") else y


def layer(l, x):
    p = f"model.layers.{l}"
    T = x.shape[0]
    h = rms(x, get(f"{p}.input_layernorm.weight"))
    a = f"{p}.self_attn"
    if ZHINAO:
        G = H // KV
        qkv = linear(h, a, "qkv_proj").reshape(T, KV, G + 2, HD)
        q, k, v = qkv[:, :, :G].reshape(T, H, HD), qkv[:, :, G], qkv[:, :, G + 1]
    else:
        q, k, v = linear(h, a, "q_proj").reshape(T, H, HD), linear(h, a, "k_proj").reshape(T, KV, HD), linear(h, a, "v_proj").reshape(T, KV, HD)
    if has(f"{a}.q_norm.weight"):
        q, k = rms(q, get(f"{a}.q_norm.weight")), rms(k, get(f"{a}.k_norm.weight"))
    q, k = rope(q), rope(k)
    k, v = k.repeat_interleave(H // KV, 1), v.repeat_interleave(H // KV, 1)
    s = torch.einsum("thd,shd->hts", q, k) / HD**0.5
    s = s.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
    o = torch.einsum("hts,shd->thd", torch.softmax(s, -1), v).reshape(T, H * HD)
    x = x + linear(o, a, "o_proj")
    h = rms(x, get(f"{p}.post_attention_layernorm.weight"))
    m = f"{p}.mlp"
    g = linear(h, m, "gate_proj")
    return x + linear(g * torch.sigmoid(g) * linear(h, m, "up_proj"), m, "down_proj")


emb = get("model.embed_tokens.weight")
xs = [emb[torch.tensor(r["ids"])] for r in ROWS]
if not TIED:
    del emb
for l in range(L):
    xs = [layer(l, x) for x in xs]
head = emb if TIED else get("lm_head.weight")
norm = get("model.norm.weight")
out = []
for r, x in zip(ROWS, xs):
    lp = torch.log_softmax(rms(x, norm) @ head.t(), -1)
    ids = r["ids"]
    out.append([lp[t - 1, ids[t]].item() for t in range(max(r["start"], 1), len(ids))])
print(json.dumps({"logps": out, "seconds": round(time.perf_counter() - T0, 2), "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "blas": blas_in_use()}))
