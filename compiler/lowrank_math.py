"""Low-rank factorization math (numpy, float64): SVD, ASVD, SVD-LLM whitening, EoRA, rank allocation.

Convention: a linear layer computes `y = x @ W` with `W` of shape [K, N] (in, out). A factorization is
`W ≈ A @ B` with `A` [K, r] and `B` [r, N]; the singular values are split evenly (`A = ... U √Σ`,
`B = √Σ Vᵀ`) so both factors have similar ranges.

Every method factors a *scaled* weight `M W` and undoes the scaling in `A`:

- `svd`:    M = I (plain truncated SVD; optimal in the Frobenius norm of the weight),
- `asvd`:   M = diag(s^α), s = mean |x| per input channel (ASVD, Yuan et al. 2023),
- `svdllm`: M = Lᵀ with L L^T = XᵀX + damping (SVD-LLM, Wang et al. 2024). Then ‖X(W − A B)‖_F² equals the
  sum of the squared dropped singular values of `M W` exactly: truncation is optimal for the calibration
  activations, and the singular values *are* the error.

Measured cost of dropping component i (any method): with C = XᵀX (the calibration covariance, unscaled),
W = M⁻¹ U Σ Vᵀ and Vᵀ V = I, the output error of the truncated layer is

    ‖X(W − W_r)‖_F² = Σ_{i>r} σ_i² · g_i,   g_i = (M⁻¹ u_i)ᵀ C (M⁻¹ u_i),

so the per-component costs `c_i = σ_i² g_i` are additive; their total is ‖X W‖_F². `allocate_ranks` uses
these relative costs as each layer's sensitivity when it spreads a global parameter budget over layers.

EoRA (Liu et al. 2024): the quantization error ΔW = W − W_q is projected into the eigenspace of the input
covariance (M = Λ^{1/2} Qᵀ, C = Q Λ Qᵀ), truncated there, and added back as a parallel rank-R path
`x @ A @ B`; it minimizes ‖X(ΔW − A B)‖_F like SVD-LLM does.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator, Sequence

import numpy as np

RANK_MULTIPLE = 8
METHODS = ("svd", "asvd", "svdllm")


@contextlib.contextmanager
def blas_threads(n: int = 1) -> Iterator[None]:
    """Run numpy's OpenBLAS with `n` threads inside the block (restored after).

    Many mid-sized SVDs/eighs in a row are much faster single-threaded, and several times faster still
    when other processes load the cores (OpenBLAS threads then spin against each other: a 576x1536 SVD took
    13 s with 2 threads and 0.4 s with 1 on our shared 2-core machine). Does nothing when numpy's BLAS is
    not a recognizable OpenBLAS.
    """
    setter, getter = _openblas_thread_functions()
    if setter is None:
        yield
        return
    before = getter()
    setter(n)
    try:
        yield
    finally:
        setter(before)


_OPENBLAS: list = []


def _openblas_thread_functions():
    if not _OPENBLAS:
        _OPENBLAS.append((None, None))
        try:
            import ctypes
            import glob
            import os

            libs = os.path.join(os.path.dirname(os.path.dirname(np.__file__)), "numpy.libs")
            for path in sorted(glob.glob(os.path.join(libs, "*openblas*.so*"))):
                lib = ctypes.CDLL(path)
                for prefix in ("scipy_openblas", "openblas"):
                    for suffix in ("64_", "_64_", ""):
                        set_name, get_name = f"{prefix}_set_num_threads{suffix}", f"{prefix}_get_num_threads{suffix}"
                        if hasattr(lib, set_name) and hasattr(lib, get_name):
                            setter, getter = getattr(lib, set_name), getattr(lib, get_name)
                            setter.argtypes, getter.restype = [ctypes.c_int], ctypes.c_int
                            _OPENBLAS[0] = (setter, getter)
                            return _OPENBLAS[0]
        except Exception:  # pragma: no cover - exotic builds
            pass
    return _OPENBLAS[0]


def break_even_rank(k: int, n: int) -> int:
    """The largest rank r whose factors hold fewer parameters (and cost fewer MACs) than W: r (k + n) < k n."""
    return max(0, (k * n - 1) // (k + n))


def max_useful_rank(k: int, n: int, multiple: int = RANK_MULTIPLE) -> int:
    """The largest multiple of `multiple` that still saves parameters (0 if none does)."""
    return (min(break_even_rank(k, n), min(k, n)) // multiple) * multiple


def factor_params(k: int, n: int, r: int) -> int:
    return r * (k + n)


@dataclasses.dataclass
class Spectrum:
    """A layer's scaled SVD: W = M⁻¹ U diag(s) Vᵀ, with per-component output-error costs on calibration data."""

    u_unscaled: np.ndarray      # M⁻¹ U, [K, k]
    s: np.ndarray               # singular values of M W, descending, [k]
    vt: np.ndarray              # Vᵀ, [k, N]
    cost: np.ndarray            # c_i = s_i² g_i: output error (squared, summed over calibration rows) of dropping i

    @property
    def total(self) -> float:
        return float(self.cost.sum())

    def relative_error(self, rank: int) -> float:
        """Squared relative output error ‖X(W − W_r)‖² / ‖X W‖² when keeping the first `rank` components."""
        tot = self.total
        return float(self.cost[rank:].sum() / tot) if tot > 0 else 0.0

    def rank_for_energy(self, energy: float, multiple: int = RANK_MULTIPLE) -> int:
        """Smallest multiple of `multiple` keeping at least `energy` of the output energy (capped at full rank)."""
        tot = self.total
        full = len(self.s)
        if tot <= 0:
            return min(multiple, full)
        kept = np.cumsum(self.cost) / tot
        need = int(np.searchsorted(kept, energy - 1e-12) + 1)
        r = -(-need // multiple) * multiple
        return min(r, full)

    def costs_only(self) -> "Spectrum":
        """The same spectrum without its singular vectors (enough for rank allocation, far smaller)."""
        return Spectrum(np.empty((0, 0)), self.s, np.empty((0, 0)), self.cost)

    @classmethod
    def from_scaled(cls, us_unscaled: np.ndarray, s: np.ndarray, vt: np.ndarray, cost: np.ndarray) -> "Spectrum":
        """From M⁻¹ U Σ (columns scaled by σ) instead of M⁻¹ U."""
        live = s > (s[0] * 1e-12 if s.size else 0.0)
        inv = np.where(live, 1.0 / np.where(live, s, 1.0), 0.0)
        return cls(us_unscaled * inv, s, vt, cost)

    def factors(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """A [K, r], B [r, N] with W_r = A @ B (singular values split evenly between the two)."""
        root = np.sqrt(self.s[:rank])
        return self.u_unscaled[:, :rank] * root, root[:, None] * self.vt[:rank]


def damped(cov: np.ndarray, damp: float) -> np.ndarray:
    """cov + damp · mean(diag) · I (keeps Cholesky / inverses well defined for rank-deficient activations)."""
    c = np.array(cov, dtype=np.float64)
    lam = damp * float(np.mean(np.diag(c))) if c.size else 0.0
    if lam <= 0:
        lam = 1e-12
    c[np.diag_indices_from(c)] += lam
    return c


def cholesky_whitener(cov: np.ndarray, damp: float = 1e-4) -> np.ndarray:
    """Lower-triangular L with L Lᵀ = cov (+ damping, increased until the factorization succeeds)."""
    d = damp
    for _ in range(8):
        try:
            return np.linalg.cholesky(damped(cov, d))
        except np.linalg.LinAlgError:
            d = max(d * 10, 1e-8)
    raise np.linalg.LinAlgError("covariance is not positive definite even with damping")


def thin_svd(m: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(U Σ, σ, Vᵀ) of m, descending, from the eigen-decomposition of the smaller Gram matrix.

    Three to four times faster than LAPACK's SVD on the shapes of transformer weights, and exact where it
    matters here: (UΣ)_r Vᵀ_r is the orthogonal projection of m on its top-r singular subspace, so full rank
    reproduces m to round-off and truncation drops exactly the energy Σ_{i>r} σ_i². Singular values below
    ~1e-8 σ_max are not resolved (their directions carry no energy, so nothing depends on them).
    """
    k, n = m.shape
    if k <= n:
        lam, u = np.linalg.eigh(m @ m.T)
        lam, u = lam[::-1], u[:, ::-1]
        s = np.sqrt(np.maximum(lam, 0.0))
        proj = u.T @ m                       # rows: σ_i v_iᵀ
        live = s > s[0] * 1e-12 if s.size and s[0] > 0 else np.zeros_like(s, bool)
        vt = np.zeros_like(proj)
        vt[live] = proj[live] / s[live, None]
        return u * s, s, vt
    lam, v = np.linalg.eigh(m.T @ m)
    lam, v = lam[::-1], v[:, ::-1]
    s = np.sqrt(np.maximum(lam, 0.0))
    return m @ v, s, v.T                     # columns of m v: σ_i u_i


def _spectrum(w: np.ndarray, scale_fwd, scale_inv, cov: np.ndarray | None) -> Spectrum:
    """SVD of scale_fwd(W); costs measured with `cov` (identity when None)."""
    us, s, vt = thin_svd(scale_fwd(w))
    us_un = scale_inv(us)                    # M⁻¹ U Σ: column i is what dropping component i removes (per unit vᵢ)
    if cov is None:
        cost = np.einsum("ki,ki->i", us_un, us_un)
    else:
        cost = np.einsum("ki,ki->i", us_un, cov @ us_un)
    return Spectrum.from_scaled(us_un, s, vt, np.maximum(cost, 0.0))


def svd_spectrum(w: np.ndarray, cov: np.ndarray | None = None) -> Spectrum:
    """Plain SVD of W; costs measured on `cov` when given (else Frobenius)."""
    w = np.asarray(w, np.float64)
    return _spectrum(w, lambda m: m, lambda u: u, cov)


def asvd_spectrum(w: np.ndarray, act_scale: np.ndarray, cov: np.ndarray | None = None, alpha: float = 0.5) -> Spectrum:
    """ASVD: SVD of diag(s^α) W with s the mean absolute activation of each input channel."""
    w = np.asarray(w, np.float64)
    s = np.asarray(act_scale, np.float64).reshape(-1) ** alpha
    s = np.maximum(s, max(float(s.max()) * 1e-6, 1e-12)) if s.size else s
    return _spectrum(w, lambda m: s[:, None] * m, lambda u: u / s[:, None], cov)


def svdllm_spectrum(w: np.ndarray, cov: np.ndarray, damp: float = 1e-4, chol: np.ndarray | None = None) -> Spectrum:
    """SVD-LLM: SVD of Lᵀ W with L L^T = cov (damped). Dropping component i costs exactly s_i² on that cov.

    `chol`: the factor L from `cholesky_whitener(cov, damp)`, when already computed (layers sharing an input)."""
    import scipy.linalg

    w = np.asarray(w, np.float64)
    lt = (chol if chol is not None else cholesky_whitener(cov, damp)).T
    us, s, vt = thin_svd(lt @ w)
    us_un = scipy.linalg.solve_triangular(lt, us, lower=False)
    return Spectrum.from_scaled(us_un, s, vt, s ** 2)


def spectrum(method: str, w: np.ndarray, cov: np.ndarray | None = None, act_scale: np.ndarray | None = None,
             damp: float = 1e-4, alpha: float = 0.5, chol: np.ndarray | None = None) -> Spectrum:
    if method == "svd":
        return svd_spectrum(w, cov)
    if method == "asvd":
        if act_scale is None:
            raise ValueError("asvd needs activation magnitudes")
        return asvd_spectrum(w, act_scale, cov, alpha)
    if method == "svdllm":
        if cov is None:
            raise ValueError("svdllm needs the input covariance")
        return svdllm_spectrum(w, cov, damp, chol)
    raise ValueError(f"unknown low-rank method {method!r}; valid: {', '.join(METHODS)}")


@dataclasses.dataclass
class EigenWhitener:
    """C = Q Λ Qᵀ (damped): maps a weight error into the input eigenspace, M = Λ^{1/2} Qᵀ."""

    q: np.ndarray
    root: np.ndarray  # Λ^{1/2}

    @classmethod
    def from_cov(cls, cov: np.ndarray, damp: float = 1e-4) -> "EigenWhitener":
        lam, q = np.linalg.eigh(damped(cov, damp))
        lam = np.maximum(lam, lam.max() * 1e-12 if lam.size else 1.0)
        return cls(q, np.sqrt(lam))


def eora_correction(w: np.ndarray, w_quant: np.ndarray, cov: np.ndarray | None, rank: int,
                    damp: float = 1e-4, whitener: EigenWhitener | None = None) -> tuple[np.ndarray, np.ndarray]:
    """EoRA: A [K, r], B [r, N] minimizing ‖X (W − W_q − A B)‖_F with C = XᵀX, computed in C's eigenspace.

    Add `x @ A @ B` to the quantized layer's output. rank is capped at min(K, N). Pass `whitener` (from
    `EigenWhitener.from_cov(cov, damp)`) to reuse C's eigen-decomposition across calls.
    """
    delta = np.asarray(w, np.float64) - np.asarray(w_quant, np.float64)
    wh = whitener or EigenWhitener.from_cov(cov, damp)
    q, root = wh.q, wh.root
    us, s, vt = thin_svd((root[:, None] * q.T) @ delta)
    r = min(rank, len(s))
    live = s[:r] > (s[0] * 1e-12 if s.size else 0.0)
    inv_sq = np.where(live, 1.0 / np.sqrt(np.where(live, s[:r], 1.0)), 0.0)
    a = q @ ((us[:, :r] * inv_sq) / root[:, None])   # Q Λ^{-1/2} U √Σ
    b = np.sqrt(s[:r])[:, None] * vt[:r]
    return a, b


@dataclasses.dataclass
class LayerBudget:
    """What the allocator knows about one layer: its shape and its measured spectrum."""

    name: str
    k: int
    n: int
    spectrum: Spectrum

    @property
    def params(self) -> int:
        return self.k * self.n

    def candidates(self, multiple: int = RANK_MULTIPLE) -> list[int]:
        """Ranks that save parameters: multiples of `multiple` below the break-even rank (0 = keep dense)."""
        top = max_useful_rank(self.k, self.n, multiple)
        return list(range(multiple, top + 1, multiple))

    def saving(self, rank: int) -> int:
        return 0 if rank == 0 else self.params - factor_params(self.k, self.n, rank)


def allocate_ranks(layers: Sequence[LayerBudget], ratio: float, mode: str = "error",
                   multiple: int = RANK_MULTIPLE) -> dict[str, int]:
    """Ranks (0 = keep dense) removing at least `ratio` of the layers' parameters, where possible.

    mode="error": minimize the sum of the layers' relative output errors (their measured sensitivity)
    under the budget, by a Lagrangian search over each layer's candidate ranks (multiples of `multiple`).
    mode="uniform": remove the same fraction from every layer (rank r = (1 − ratio) k n / (k + n)).
    When the budget cannot be met (every layer factored at its smallest rank saves less), the smallest
    ranks are returned.
    """
    total = sum(layer.params for layer in layers)
    target = ratio * total
    if not layers or target <= 0:
        return {layer.name: 0 for layer in layers}
    if mode == "uniform":
        out = {}
        for layer in layers:
            cands = layer.candidates(multiple)
            want = (1 - ratio) * layer.params / (layer.k + layer.n)
            r = int(want // multiple) * multiple
            out[layer.name] = min(max(r, multiple), cands[-1]) if cands else 0
        return out
    if mode != "error":
        raise ValueError(f"unknown allocation mode {mode!r}")

    options = []  # per layer: (ranks, errors, savings) with rank 0 (dense) first
    for layer in layers:
        ranks = [0] + layer.candidates(multiple)
        errs = np.array([0.0] + [layer.spectrum.relative_error(r) for r in ranks[1:]])
        savs = np.array([0.0] + [layer.saving(r) / total for r in ranks[1:]])
        options.append((ranks, errs, savs))

    def choose(lam: float) -> tuple[list[int], float]:
        picks, saved = [], 0.0
        for ranks, errs, savs in options:
            i = int(np.argmin(errs - lam * savs))
            picks.append(ranks[i])
            saved += savs[i]
        return picks, saved

    lo, hi = 0.0, 1.0
    while choose(hi)[1] < ratio - 1e-12 and hi < 1e12:
        hi *= 4
    best = choose(hi)[0]
    for _ in range(100):
        mid = (lo + hi) / 2
        picks, saved = choose(mid)
        if saved >= ratio - 1e-12:
            hi, best = mid, picks
        else:
            lo = mid
    return {layer.name: r for layer, r in zip(layers, best)}
