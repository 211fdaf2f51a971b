#!/bin/sh
# The device check for a session that draws a GPU (docs/REFERENCE.md §11): one run, about eight
# minutes on an H100, nothing downloaded. Here first: npm install && npm run build &&
# sh scripts/gpu-bundle.sh (the machine has no Node.js: .gpu/ brings it); then, as one device
# run carrying .gpu, from the repository root:
#   sh bench/gpu-check.sh | tee $OUT/gpu-check.jsonl
# 1. native/cuda/check.cu: prefopt's device kernels against float64 (and the CPU kernels' bits
#    where the formula allows), one JSON line each;
# 2. where the CUDA libraries are (what engine/cuda.ts's probe will find): the driver, and the
#    nvidia-* wheels' cuBLASLt and NVRTC beside PyTorch;
# 3. the cuda backend (bench/cuda-check.ts): cuBLASLt's products case by case against float64
#    (transposes, broadcast batches, bf16, misaligned operands), a 0.5B LoRA DPO step's loss and gradients against
#    the CPU path with exact float32 products and with the defaults (bf16 × bf16 for the bf16
#    weights, TF32 for the rest), then its speed both ways (and on rows of 2,048 tokens, and
#    sampling with Qwen's top-k/top-p), then a profile of the step (each
#    kernel, product shape, copy and host kernel timed alone), the host floor (the same step
#    with its kernels issued but not run: PREFOPT_CUDA_DEVICE=dry), and the step with attention
#    by the flash kernels rather than products;
# 4. the PyTorch bf16 eager baseline of the real-size jobs (bench/torch_ref.py), the figures the
#    cuda backend is measured against — LoRA DPO's (256- and 2,048-token rows) right after the
#    cuda timing, the rest last.
set -u
say() { printf '%s\n' "$1"; }
NVCC=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
if "$NVCC" -O2 --fmad=false -arch=native -Xcompiler -ffp-contract=off -o /tmp/prefopt-cuda-check native/cuda/check.cu 2>/tmp/prefopt-nvcc.log; then
  /tmp/prefopt-cuda-check
else
  say "{\"step\":\"nvcc\",\"error\":$(python3 -c 'import json,sys; print(json.dumps(open("/tmp/prefopt-nvcc.log").read()[-2000:]))')}"
fi
python3 - <<'PY'
import glob, json, os, site
dirs = site.getsitepackages() + [site.getusersitepackages()]
libs = sorted({p for d in dirs for p in glob.glob(os.path.join(d, "nvidia", "*", "lib", "lib*.so*"))})
want = [p for p in libs if any(k in os.path.basename(p) for k in ("cublasLt", "nvrtc"))]
driver = open("/proc/driver/nvidia/version").read().split("\n")[0] if os.path.exists("/proc/driver/nvidia/version") else None
print(json.dumps({"step": "libraries", "driver": driver, "wheel_libs": want, "toolkit": sorted(glob.glob("/usr/local/cuda*/lib64/libcublasLt*") + glob.glob("/usr/local/cuda*/lib64/libnvrtc*"))}))
PY
if [ -d .gpu/app ]; then
  xz -dc .gpu/node.xz > /tmp/prefopt-node && chmod +x /tmp/prefopt-node
  LIBS=$(python3 -c 'import glob, os, site; print(":".join(sorted({os.path.dirname(p) for d in site.getsitepackages() for p in glob.glob(os.path.join(d, "nvidia", "*", "lib", "lib*.so*"))})))')
  # Each step on its own: one that fails (its error is a JSON line too) does not stop the next.
  node_step() {
    (cd .gpu/app && PREFOPT_CUDA_LIBS="$LIBS" PREFOPT_CUDA_TF32="${3:-}" PREFOPT_CUDA_BF16="${3:-}" timeout "$1" /tmp/prefopt-node dist/bench/cuda-check.js "$2" 2>/tmp/prefopt-node.err)
    rc=$?
    [ $rc -eq 0 ] || say "{\"step\":\"cuda_$2\",\"exit\":$rc,\"stderr\":$(python3 -c 'import json; print(json.dumps(open("/tmp/prefopt-node.err").read()[-1500:]))')}"
  }
fi
torch_job() { TORCH_DEVICE=cuda python3 bench/torch_ref.py real "$1" | sed "s/^{/{\"step\":\"torch_bf16\",\"job\":\"$1\",/"; }
# What the issue's acceptance needs first (compare, the default step's speed and PyTorch's), then
# what guides the next change (the profile, exact-f32 speed, the other jobs' baselines): a run cut
# short keeps the essentials.
if [ -d .gpu/app ]; then
  node_step 60 report
  node_step 60 gemm         # the products case by case against float64 (the wrapper's mapping, alignments)
  node_step 200 compare 0   # exact float32 products: float32 tolerance
  node_step 200 compare     # the defaults (bf16 weights' products in bf16, TF32): bf16 tolerance
  node_step 150 time
  torch_job lora_dpo
  torch_job lora_dpo_2k
  node_step 120 profile     # where the default step's time goes, operation by operation
  # The host floor: the same steps on the dry device (kernels issued, not run) on this machine's
  # CPU — how close the GPU step is to what the host alone takes to issue it.
  (export PREFOPT_CUDA_DEVICE=dry; node_step 120 time)
  # Attention by the flash kernels instead of products (engine/cuda-fused: attentionPath).
  (export PREFOPT_CUDA_ATTENTION=flash; node_step 120 time)
  node_step 120 time 0
else
  say '{"step":"cuda_backend","error":".gpu/ is missing: run sh scripts/gpu-bundle.sh here and carry .gpu"}'
  torch_job lora_dpo
  torch_job lora_dpo_2k
fi
for job in logprobs sft generate; do torch_job "$job"; done
