"""Which BLAS library a PyTorch process mapped (Debian's torch links the generic libblas.so.3,
which its alternatives point at OpenBLAS or the slow reference BLAS): the benches report it."""
import os


def blas_in_use():
    with open("/proc/self/maps") as f:
        libs = {os.path.basename(l.split()[-1]) for l in f if "blas" in l.lower() and "/" in l}
    return ", ".join(sorted(libs)) or "none mapped"
