"""PyTorch reference for bench/sampling.ts: one row of logits turned into a token the way
transformers' logits warpers do it (temperature, TopK: the k-th value as a floor, TopP: the
vocabulary sorted and the softmax's cumulative sum cut at 1 − top_p), then torch.multinomial.

`sampling_ref.py FILE V`: FILE holds rows of V float32 logits; for each of the settings below,
prints one JSON line with the fastest call's milliseconds per row over every row."""
import json, os, sys, time
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from blas import blas_in_use

torch.set_num_threads(os.cpu_count() or 1)
path, V = sys.argv[1], int(sys.argv[2])
data = torch.from_file(path, size=os.path.getsize(path) // 4, dtype=torch.float32).view(-1, V)
gen = torch.Generator().manual_seed(0)


def sample(row, t, k, p):
    x = row / t
    if k > 0:
        x = x.masked_fill(x < torch.topk(x, k)[0][-1], -float("inf"))
    if p < 1:
        sorted_x, idx = torch.sort(x, descending=False)
        remove = sorted_x.softmax(-1).cumsum(-1) <= 1 - p
        remove[-1:] = False
        x = x.masked_fill(remove.scatter(0, idx, remove), -float("inf"))
    return torch.multinomial(x.softmax(-1), 1, generator=gen)


for name, t, k, p in json.loads(sys.argv[3]):
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for row in data:
            sample(row, t, k, p)
        best = min(best, (time.perf_counter() - t0) / len(data))
    print(json.dumps({"setting": name, "ms_per_row": best * 1000, "torch": torch.__version__, "blas": blas_in_use()}))
