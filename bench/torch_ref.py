"""PyTorch reference for `npm run bench`, written plainly.

`torch_ref.py`: the same ~5M-parameter Qwen2-shaped model and the same steps as bench/run.ts
(forward, SFT step with AdamW, LoRA DPO step with an adapter-off reference pass, KV-cached
sampling); prints one JSON line of tokens/s.

`torch_ref.py real JOB`: one job of bench/real-size.ts on Qwen2.5-0.5B's shape (random weights):
lora_dpo, sft, logprobs or generate, and lora_dpo_2k (2 pairs of 2,048 tokens: long rows); prints
one JSON line with its tokens/s and peak RSS. One job per process, so that each peak is its own.

`TORCH_DEVICE=cuda torch_ref.py real JOB`: the same job on the GPU in bfloat16 (PyTorch 2 eager,
attention by sdpa as transformers runs it there), the baseline a CUDA backend is measured against
(bench/gpu-check.sh); peak memory is the GPU's.

`TORCH_DEVICE=meta torch_ref.py real lora_dpo`: the same step on the meta device, where every op is
dispatched and shaped but nothing is computed: PyTorch's own host time for the step, the figure
bench/host-floor.ts sets beside prefopt's dry cuda device (PyTorch 1.13 has no meta kernels for
the foreach optimizer: AdamW updates tensor by tensor there).

Run when /usr/bin/python3 has torch (Debian: apt-get install python3-torch libopenblas0-pthread)."""
import json, math, os, resource, sys, time
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from blas import blas_in_use

torch.manual_seed(0)
torch.set_num_threads(os.cpu_count() or 1)
DEVICE = os.environ.get("TORCH_DEVICE", "cpu")
META = DEVICE == "meta"
GPU = DEVICE not in ("cpu", "meta")
if GPU:  # PyTorch >= 2: every tensor below is created there
    torch.set_default_device(DEVICE)
REAL = sys.argv[1:2] == ["real"]
# On a GPU, attention as transformers runs it by default there (sdpa: PyTorch's fused kernels,
# flash attention among them); elsewhere, and in PyTorch 1.13, which has no sdpa, written out.
SDPA = GPU and hasattr(F, "scaled_dot_product_attention")
if REAL:  # Qwen2.5-0.5B
    V, D, L, H, KV, FF, THETA = 151936, 896, 24, 14, 2, 4864, 1e6
else:
    V, D, L, H, KV, FF, THETA, B, T = 2048, 256, 6, 8, 4, 704, 1e4, 8, 128
HD = D // H


class Lora(torch.nn.Module):
    def __init__(self, lin, r=16, alpha=32, dropout=0.0):
        super().__init__()
        self.lin, self.s, self.on, self.p = lin, alpha / r, True, dropout
        self.A = torch.nn.Parameter(torch.randn(r, lin.in_features) / math.sqrt(lin.in_features))
        self.B = torch.nn.Parameter(torch.zeros(lin.out_features, r))

    def forward(self, x):
        y = self.lin(x)
        if not self.on:
            return y
        xd = F.dropout(x, self.p, True) if self.p else x
        return y + (xd @ self.A.t() @ self.B.t()) * self.s


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q = torch.nn.Linear(D, H * HD)
        self.k = torch.nn.Linear(D, KV * HD)
        self.v = torch.nn.Linear(D, KV * HD)
        self.o = torch.nn.Linear(H * HD, D, bias=False)
        self.g = torch.nn.Linear(D, FF, bias=False)
        self.u = torch.nn.Linear(D, FF, bias=False)
        self.d = torch.nn.Linear(FF, D, bias=False)
        self.n1 = torch.nn.Parameter(torch.ones(D))
        self.n2 = torch.nn.Parameter(torch.ones(D))


def rms(x, w):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w


def rope(x, pos):
    inv = THETA ** (-torch.arange(0, HD, 2, device=pos.device).float() / HD)
    ang = pos[:, None].float() * inv[None]
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    x1, x2 = x[..., : HD // 2], x[..., HD // 2 :]
    return (x * cos + torch.cat([-x2, x1], -1) * sin).to(x.dtype)


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(V, D)
        self.blocks = torch.nn.ModuleList([Block() for _ in range(L)])
        self.norm = torch.nn.Parameter(torch.ones(D))

    def forward(self, ids, cache=None, start=0):
        b, t = ids.shape
        x = self.emb(ids)
        pos = torch.arange(start, start + t, device=ids.device)
        new = []
        for i, blk in enumerate(self.blocks):
            h = rms(x, blk.n1)
            q = rope(blk.q(h).view(b, t, H, HD).transpose(1, 2), pos)
            k = rope(blk.k(h).view(b, t, KV, HD).transpose(1, 2), pos)
            v = blk.v(h).view(b, t, KV, HD).transpose(1, 2)
            if cache is not None and cache[i] is not None:
                k, v = torch.cat([cache[i][0], k], 2), torch.cat([cache[i][1], v], 2)
            new.append((k, v))
            k, v = k.repeat_interleave(H // KV, 1, output_size=H), v.repeat_interleave(H // KV, 1, output_size=H)
            if SDPA and (t == 1 or k.shape[2] == t):
                a = F.scaled_dot_product_attention(q, k, v, is_causal=t > 1)
            else:
                s = q @ k.transpose(-1, -2) / math.sqrt(HD)
                if t > 1:
                    s = s + torch.full((t, k.shape[2]), float("-inf"), dtype=s.dtype, device=s.device).triu(k.shape[2] - t + 1)
                a = torch.softmax(s, -1) @ v
            x = x + blk.o(a.transpose(1, 2).reshape(b, t, D))
            h = rms(x, blk.n2)
            x = x + blk.d(F.silu(blk.g(h)) * blk.u(h))
        return rms(x, self.norm) @ self.emb.weight.t(), new


def bench(f, reps=5):
    """Seconds per call: the fastest of `reps` timed calls after a warm-up, as bench/run.ts times
    prefopt (this VM's speed swings within a minute; the fastest call is the least disturbed)."""
    f()
    best = float("inf")
    for _ in range(reps):
        if GPU:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        f()
        if GPU:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def add_lora(m, dropout=0.0):
    for p in m.parameters():
        p.requires_grad_(False)
    loras = []
    for blk in m.blocks:
        for name in ["q", "k", "v", "o", "g", "u", "d"]:
            l = Lora(getattr(blk, name), dropout=dropout)
            setattr(blk, name, l)
            loras.append(l)
    return loras


def seq_logps(m, x, start):
    logits, _ = m(x)
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, x[:, 1:, None]).squeeze(-1)
    return lp[:, start - 1 :].sum(-1)


def reference_logps(m, loras, x, start):
    """The LoRA DPO reference: log-probs with every adapter switched off, without gradients."""
    with torch.no_grad():
        for l in loras:
            l.on = False
        ref = seq_logps(m, x, start)
        for l in loras:
            l.on = True
    return ref


def update(opt, loss):
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def lm_loss(m, x):
    """Next-token cross-entropy over every position (the SFT step)."""
    logits, _ = m(x)
    return F.cross_entropy(logits[:, :-1].reshape(-1, V), x[:, 1:].reshape(-1))


def dpo_loss(pol, ref):
    n = pol.shape[0] // 2
    return -F.logsigmoid(0.1 * ((pol[:n] - ref[:n]) - (pol[n:] - ref[n:]))).mean()


def sample(m, prompts, new):
    with torch.no_grad():
        logits, cache = m(prompts)
        pos = prompts.shape[1]
        for _ in range(new):
            nxt = torch.multinomial(torch.softmax(logits[:, -1], -1), 1)
            logits, cache = m(nxt, cache, pos)
            pos += 1


def real(job):
    """The shapes of bench/real-size.ts: DPO and SFT rows of 64 prompt + 192 completion tokens."""
    m = Model()
    if GPU:
        m = m.to(torch.bfloat16)
    P, C = (512, 1536) if job == "lora_dpo_2k" else (64, 192)
    ids = torch.randint(0, V, (4 if job == "lora_dpo_2k" else 8, P + C))
    if job in ("lora_dpo", "lora_dpo_2k"):  # 4 pairs (2 of 2,048 tokens), reference log-probs computed once (cached, as a DPO stage does)
        loras = add_lora(m, dropout=0.05)
        if GPU:
            m = m.to(torch.bfloat16)
        if META:
            m, ids = m.to(torch.bfloat16).to("meta"), ids.to("meta")
        opt = torch.optim.AdamW([p for l in loras for p in (l.A, l.B)], lr=1e-4, foreach=False if META else None)
        ref = reference_logps(m, loras, ids, P)
        tokens, f = ids.numel(), lambda: update(opt, dpo_loss(seq_logps(m, ids, P), ref))
    elif job == "sft":  # 4 rows, every weight trained
        rows = ids[:4]
        opt = torch.optim.AdamW(m.parameters(), lr=1e-5, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
        tokens, f = rows.numel(), lambda: update(opt, lm_loss(m, rows))
    elif job == "logprobs":  # 2 rows
        rows = ids[:2]

        def f():
            with torch.no_grad():
                seq_logps(m, rows, P)

        tokens = rows.numel()
    elif job == "generate":  # 4 samples of 64 new tokens after a 64-token prompt
        prompts = ids[:1, :P].repeat_interleave(4, 0)
        tokens, f = 4 * 64, lambda: sample(m, prompts, 64)
    else:
        raise SystemExit(f"unknown job {job}")
    if META and job != "lora_dpo":
        raise SystemExit("TORCH_DEVICE=meta times the lora_dpo job only")
    s = bench(f, 1 if not (GPU or META) else 10)  # on a GPU as bench/cuda-check.ts times the cuda backend
    out = {"tokens_per_s": round(tokens / s, 2), "seconds": round(s, 4), "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if GPU:
        out.update(device=torch.cuda.get_device_name(), dtype="bfloat16", attention="sdpa" if SDPA else "math", peak_gpu_bytes=torch.cuda.max_memory_allocated(), torch=torch.__version__)
    elif META:
        out.update(device="meta", torch=torch.__version__)
    else:
        out["blas"] = blas_in_use()
    print(json.dumps(out))


def small():
    m = Model()
    ids = torch.randint(0, V, (B, T))
    out = {}
    # The machine's GEMM rate as PyTorch sees it: one 1024^3 float32 product.
    ga, gb = torch.randn(1024, 1024), torch.randn(1024, 1024)
    out["gemm_gflops"] = 2 * 1024**3 / bench(lambda: ga @ gb, 10) / 1e9
    with torch.no_grad():
        out["forward"] = B * T / bench(lambda: m(ids))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)

    out["sft_step"] = B * T / bench(lambda: update(opt, lm_loss(m, ids)))
    loras = add_lora(m)
    lopt = torch.optim.AdamW([p for l in loras for p in (l.A, l.B)], lr=1e-4)
    pairs = torch.cat([ids[: B // 2], ids[B // 2 :]])

    # The reference pass is part of each step here, as in bench/run.ts's LoRA DPO step.
    out["dpo_step_lora"] = B * T / bench(lambda: update(lopt, dpo_loss(seq_logps(m, pairs, 64), reference_logps(m, loras, pairs, 64))))
    prompts = ids[:4, :32].repeat_interleave(4, 0)
    out["sampling"] = 16 * 64 / bench(lambda: sample(m, prompts, 64), 1)
    print(json.dumps({k: round(v, 1) for k, v in out.items()}))


if REAL:
    real(sys.argv[2])
else:
    small()
