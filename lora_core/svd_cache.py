"""Top-k singular triplets of frozen weights, computed once and cached.

The orthogonality regulariser, the overlap analysis and the projected merge all need the top-k
singular triplets (U_k, S_k, V_k) of each frozen base weight W (N, K). The weights never change, so
the decomposition is done once per weight and reused: in memory (keyed by module name, shape and a
cheap fingerprint of the values, so a changed weight is never served a stale basis) and optionally
on disk as safetensors.

Exact `torch.linalg.svd` is used for small matrices (it is fast and exact there: every projection of
SmolLM2-135M has min(N, K) <= 576); large ones use `torch.svd_lowrank` with oversampling and power
iterations. A randomised result carries a measured error: the largest relative residual
||W v_i - s_i u_i|| / s_i over the returned triplets (0 for an exact triplet; svd_lowrank makes
W^T u_i = s_i v_i hold by construction, so this side is the informative one).

Each weight has its own k, capped by min(N, K) by the caller; this module refuses k < 1 or
k > min(N, K) with a message naming the weight, so no global k is ever silently rewritten (the
authors' code overwrote k with the first small matrix it met).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from lora_core.common.files import atomic_write_via

_SVD_DTYPES = (torch.float32, torch.float64)


@dataclass
class SpectralBasis:
    """Top-k singular triplets of one weight: W ~ U diag(S) V^T restricted to the top k."""

    U: torch.Tensor  # (N, k) orthonormal columns, left singular vectors
    S: torch.Tensor  # (k,) descending singular values
    V: torch.Tensor  # (K, k) orthonormal columns, right singular vectors
    method: str  # "exact" | "randomized"
    rel_residual: float  # max_i ||W v_i - s_i u_i|| / s_i (0.0 for exact)

    @property
    def k(self) -> int:
        return int(self.S.shape[0])

    def top(self, k: int) -> "SpectralBasis":
        """The first k triplets (the top-k of a larger decomposition are the top-k)."""
        if k > self.k:
            raise ValueError(f"requested k={k} but only {self.k} triplets were computed")
        return SpectralBasis(self.U[:, :k], self.S[:k], self.V[:, :k], self.method, self.rel_residual)

    def to(self, device=None, dtype=None) -> "SpectralBasis":
        return SpectralBasis(
            self.U.to(device=device, dtype=dtype),
            self.S.to(device=device, dtype=dtype),
            self.V.to(device=device, dtype=dtype),
            self.method,
            self.rel_residual,
        )


def check_k(k, shape, name: str = "weight") -> int:
    """Validate an explicitly requested k against a (N, K) shape; returns it as int."""
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__} ({k!r}) for {name}")
    limit = min(int(shape[0]), int(shape[1]))
    if k < 1 or k > limit:
        raise ValueError(
            f"k={k} is out of range for {name} of shape {tuple(shape)}: need 1 <= k <= min(N, K) = {limit}"
        )
    return k


def check_svd_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, str):
        dtype = {"float32": torch.float32, "float64": torch.float64}.get(dtype, dtype)
    if dtype not in _SVD_DTYPES:
        raise ValueError(f"svd dtype must be float32 or float64, got {dtype!r}")
    return dtype


def top_k_svd(
    W: torch.Tensor,
    k: int,
    *,
    dtype=torch.float32,
    exact_max_dim: int = 2048,
    oversample: int = 16,
    niter: int = 6,
    seed: int = 0,
    name: str = "weight",
) -> SpectralBasis:
    """Top-k singular triplets of a 2-D tensor.

    Exact SVD when min(N, K) <= exact_max_dim or when k + oversample reaches half of min(N, K) (a
    randomised sketch that large saves nothing); otherwise `torch.svd_lowrank` with q = k + oversample
    and `niter` power iterations, seeded for reproducibility, with its relative residual measured.
    """
    if W.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D weight, got shape {tuple(W.shape)}")
    dtype = check_svd_dtype(dtype)
    k = check_k(k, W.shape, name)
    Wd = W.detach().to(dtype)
    small = min(Wd.shape)
    if small <= exact_max_dim or 2 * (k + oversample) >= small:
        U, S, Vh = torch.linalg.svd(Wd, full_matrices=False)
        return SpectralBasis(U[:, :k].contiguous(), S[:k].contiguous(), Vh[:k].T.contiguous(), "exact", 0.0)
    q = min(k + oversample, small)
    # svd_lowrank draws its sketch from the global generator: fork it so callers' RNG is untouched
    # and the result is reproducible.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        U, S, V = torch.svd_lowrank(Wd, q=q, niter=niter)
    U, S, V = U[:, :k].contiguous(), S[:k].contiguous(), V[:, :k].contiguous()
    residual = (Wd @ V - U * S).norm(dim=0) / S.clamp_min(torch.finfo(dtype).tiny)  # (k,)
    return SpectralBasis(U, S, V, "randomized", float(residual.max()))


def fingerprint(W: torch.Tensor) -> str:
    """A cheap content fingerprint: sha1 of a strided sample plus fp64 sum and sum of squares.

    Hashing a few thousand elements and two reductions costs far less than any SVD and catches any
    realistic change of the weight (training, a different checkpoint, PiSSA's residual).
    """
    flat = W.detach().reshape(-1)
    stride = max(1, flat.numel() // 4096)
    sample = flat[::stride].to(torch.float64).cpu()
    d = flat.to(torch.float64)
    h = hashlib.sha1(sample.numpy().tobytes())
    h.update(f"{float(d.sum())!r}|{float((d * d).sum())!r}|{tuple(W.shape)}|{W.dtype}".encode())
    return h.hexdigest()[:16]


class SVDCache:
    """In-memory (and optionally on-disk) cache of `SpectralBasis` per weight.

    Key: (name, shape, fingerprint, dtype). A request for k <= the cached k is served by slicing;
    a larger k recomputes and replaces the entry.
    """

    def __init__(self, *, exact_max_dim: int = 2048, oversample: int = 16, niter: int = 6, seed: int = 0):
        self.exact_max_dim = exact_max_dim
        self.oversample = oversample
        self.niter = niter
        self.seed = seed
        self._entries: dict[tuple, SpectralBasis] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, name: str, W: torch.Tensor, k: int, dtype=torch.float32) -> SpectralBasis:
        dtype = check_svd_dtype(dtype)
        k = check_k(k, W.shape, name)
        key = (name, tuple(W.shape), fingerprint(W), str(dtype))
        entry = self._entries.get(key)
        if entry is not None and entry.k >= k:
            self.hits += 1
            return entry.top(k)
        self.misses += 1
        entry = top_k_svd(
            W,
            k,
            dtype=dtype,
            exact_max_dim=self.exact_max_dim,
            oversample=self.oversample,
            niter=self.niter,
            seed=self.seed,
            name=name,
        )
        self._entries[key] = entry
        return entry

    def save(self, path) -> Path:
        """Write every entry to one safetensors file (atomic: temp file + rename)."""
        from safetensors.torch import save_file

        path = Path(path)
        tensors: dict[str, torch.Tensor] = {}
        index = []
        for i, (key, entry) in enumerate(self._entries.items()):
            name, shape, fp, dtype = key
            tensors[f"{i}.U"] = entry.U.contiguous().cpu()
            tensors[f"{i}.S"] = entry.S.contiguous().cpu()
            tensors[f"{i}.V"] = entry.V.contiguous().cpu()
            index.append(
                {"id": i, "name": name, "shape": list(shape), "fingerprint": fp, "dtype": dtype,
                 "method": entry.method, "rel_residual": entry.rel_residual}
            )
        metadata = {"lora_core_svd_cache": json.dumps(index)}
        return atomic_write_via(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))

    def load(self, path) -> int:
        """Merge the entries of a file written by `save`; returns how many were read.

        The file is user-supplied (`--svd-cache`), so everything in it is checked before any entry
        is merged: a damaged, truncated or foreign file is a ValueError naming it, and nothing of
        it is kept.
        """
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"SVD cache file not found: {path}")
        fix = "delete it (it is rebuilt on the next run) or pass another --svd-cache file"
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = (f.metadata() or {}).get("lora_core_svd_cache")
                if meta is None:
                    raise ValueError(f"{path} is not an SVD cache written by lora_core (no index metadata)")
                index = _parse_index(meta, path, fix)
                names = set(f.keys())
                entries = {}
                for item in index:
                    i = item["id"]
                    for part in ("U", "S", "V"):
                        if f"{i}.{part}" not in names:
                            raise ValueError(f"SVD cache {path} is damaged (missing tensor '{i}.{part}'): {fix}")
                    entry = SpectralBasis(f.get_tensor(f"{i}.U"), f.get_tensor(f"{i}.S"), f.get_tensor(f"{i}.V"),
                                          item["method"], float(item["rel_residual"]))
                    _check_entry(entry, item, path, fix)
                    entries[(item["name"], tuple(item["shape"]), item["fingerprint"], item["dtype"])] = entry
        except SafetensorError as error:
            raise ValueError(f"SVD cache {path} is not a readable safetensors file ({error}): {fix}") from None
        self._entries.update(entries)
        return len(index)


_INDEX_FIELDS = {"id": int, "name": str, "shape": list, "fingerprint": str, "dtype": str, "method": str,
                 "rel_residual": (int, float)}


def _parse_index(meta: str, path: Path, fix: str) -> list[dict]:
    try:
        index = json.loads(meta)
    except json.JSONDecodeError as error:
        raise ValueError(f"SVD cache {path}: its index is not valid JSON ({error}): {fix}") from None
    ok = isinstance(index, list) and all(
        isinstance(item, dict) and all(isinstance(item.get(k), t) and not isinstance(item.get(k), bool)
                                       for k, t in _INDEX_FIELDS.items())
        and len(item["shape"]) == 2 and all(isinstance(d, int) and d > 0 for d in item["shape"])
        for item in index)
    if not ok:
        raise ValueError(f"SVD cache {path}: its index is not valid (a list of entries with fields "
                         f"{', '.join(_INDEX_FIELDS)}): {fix}")
    return index


def _check_entry(entry: SpectralBasis, item: dict, path: Path, fix: str) -> None:
    # A basis of the wrong shape would fail far from here (or silently broadcast); a NaN would
    # turn every overlap figure and regulariser term into NaN.
    n, k_in = item["shape"]
    k = entry.S.shape[0] if entry.S.dim() == 1 else -1
    if (entry.S.dim() != 1 or tuple(entry.U.shape) != (n, k) or tuple(entry.V.shape) != (k_in, k)
            or not 1 <= k <= min(n, k_in)):
        raise ValueError(f"SVD cache {path}: entry {item['id']} ({item['name']}) has shapes U "
                         f"{tuple(entry.U.shape)}, S {tuple(entry.S.shape)}, V {tuple(entry.V.shape)} that do "
                         f"not fit a {n}x{k_in} weight: {fix}")
    for part in ("U", "S", "V"):
        tensor = getattr(entry, part)
        if not tensor.is_floating_point() or not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"SVD cache {path}: entry {item['id']} ({item['name']}) {part} holds NaN or inf "
                             f"(or is not floating point): {fix}")


# One process-wide cache, so the regulariser, the overlap analysis and a merge in the same run
# decompose each weight once.
DEFAULT_CACHE = SVDCache()
