"""The statistics math, as pure functions on tensors (no files, no global device).

Features are the OUTPUTS of a Linear, y = W x (+ b). Because y is linear in x, the output mean and
covariance follow exactly from the input moments:
    E[y]   = W E[x] + b
    Cov[y] = W (E[x x^T] - E[x] E[x]^T) W^T
so collection only hooks the inputs, and Linear layers that share an input (q/k/v, gate/up) share
one accumulator.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sfsd.errors import DataError, NumericalError
from sfsd.resources.needs import FLUSH_BAND_BYTES


@dataclass
class InputMoments:
    """Running sums over tokens of one Linear input: sum x x^T, sum x, sum |x| and the token count.

    Batches are multiplied in float32 on the compute device into a staging sum, which `flush`
    reduces into the float64 totals on the CPU: fast GEMMs, no precision lost over many batches,
    and no float64 matrices held on a GPU (a 7B model would need ~44 GB of them). With `release`,
    the staging buffers are freed after each flush instead of kept for the next batch (`choose_staging`)."""

    xxt: torch.Tensor  # (d, d) float64, CPU
    xsum: torch.Tensor  # (d,) float64, CPU
    count: int
    xabs: torch.Tensor | None = None  # (d,) float64, CPU; None in statistics collected without it
    _staged_xxt: torch.Tensor | None = None
    _staged_xsum: torch.Tensor | None = None
    _staged_xabs: torch.Tensor | None = None
    _staged_batches: int = 0

    @classmethod
    def zeros(cls, dim: int) -> "InputMoments":
        return cls(
            xxt=torch.zeros(dim, dim, dtype=torch.float64),
            xsum=torch.zeros(dim, dtype=torch.float64),
            count=0,
            xabs=torch.zeros(dim, dtype=torch.float64),
        )

    def update(self, x: torch.Tensor, flush_every: int = 1, release: bool = False) -> None:
        """Add a (tokens, d) batch of inputs; flush to float64 every `flush_every` batches (with
        `release`, the staging buffers are freed at each flush: `flush_every=1, release=True` holds them
        only while this batch is added)."""
        x = x.reshape(-1, x.shape[-1])
        if x.shape[0] == 0:
            return
        xf = x.float()
        if self._staged_xxt is None:
            d = xf.shape[1]
            self._staged_xxt = torch.zeros(d, d, dtype=torch.float32, device=xf.device)
            self._staged_xsum = torch.zeros(d, dtype=torch.float64, device=xf.device)
            self._staged_xabs = torch.zeros(d, dtype=torch.float64, device=xf.device)
        self._staged_xxt.addmm_(xf.T, xf)
        self._staged_xsum += xf.sum(dim=0, dtype=torch.float64)
        self._staged_xabs += xf.abs().sum(dim=0, dtype=torch.float64)
        self.count += x.shape[0]
        self._staged_batches += 1
        if self._staged_batches >= flush_every:
            self.flush(release)

    def flush(self, release: bool = False) -> None:
        """Reduce the staged sums into the float64 totals; `release` frees the staging buffers too."""
        if self._staged_batches == 0:
            if release:
                self._staged_xxt = self._staged_xsum = self._staged_xabs = None
            return
        # a float32 X^T X from gemm need not be exactly symmetric: add (S + S^T) / 2, exact in float64, through
        # one float64 temporary (d^2 x 8 bytes): S^T is added a band of rows at a time, since adding a float32
        # operand to a float64 tensor casts the whole operand first (a second d^2 x 8 bytes)
        staged = self._staged_xxt.to("cpu")  # the staging sum itself on a CPU run
        total = staged.to(torch.float64)
        rows = max(1, FLUSH_BAND_BYTES // (8 * total.shape[1]))
        for start in range(0, total.shape[0], rows):
            total[start:start + rows].add_(staged.T[start:start + rows])
        self.xxt += total.mul_(0.5)
        del staged, total
        self.xsum += self._staged_xsum.cpu()
        if self.xabs is not None:
            self.xabs += self._staged_xabs.cpu()
        self._staged_batches = 0
        if release:
            self._staged_xxt = self._staged_xsum = self._staged_xabs = None
            return
        self._staged_xxt.zero_()
        self._staged_xsum.zero_()
        self._staged_xabs.zero_()

    def mean(self) -> torch.Tensor:
        self.flush()
        return self.xsum / self.count

    def mean_abs(self) -> torch.Tensor:
        """E|x_j| per input channel (ASVD's activation scale)."""
        self.flush()
        if self.xabs is None:
            raise DataError("these input statistics lack sum |x| (collected by an older version); rerun collection")
        return self.xabs / self.count

    def second_moment(self) -> torch.Tensor:
        self.flush()
        return self.xxt / self.count

    def covariance(self) -> torch.Tensor:
        m = self.mean()
        return self.second_moment() - torch.outer(m, m)


STAGING_SHARE = 0.5  # of the free memory the staging buffers of every block may take (`choose_staging`)


def staging_bytes(widths: Sequence[int]) -> int:
    """Bytes of one block's staging buffers (`InputMoments`): per distinct Linear input of width d, the
    float32 sum of x x^T (4 d^2) and the float64 sums of x and |x| (16 d)."""
    return sum(4 * d * d + 16 * d for d in widths)


def choose_staging(n_blocks: int, widths: Sequence[int], free_bytes: float, share: float = STAGING_SHARE) -> str:
    """The staging of stage 1's whole-model pass, `collection.staging: auto` decided (the only place it is):

        "device"  when  n_blocks * sum_d (4 d^2 + 16 d)  <=  share * free_bytes,  else "host",

    `widths` being the input widths d of one block's distinct Linear inputs, `free_bytes` the memory free
    where the staging buffers live (the compute device, once the model is on it) and `share` 0.5 (the rest
    is left to the activations). "device": every block keeps its staging buffers for the whole pass (no
    allocation per batch); "host": each block's buffers live only while its batch is reduced into the
    float64 totals, so at most one input's are held at a time. Llama-3-8B (32 blocks, widths 4096 x 3 and
    14336) needs 32.76 GB to stage on the device: "device" with at least 65.53 GB free."""
    return "device" if n_blocks * staging_bytes(widths) <= share * free_bytes else "host"


def check_finite(tensors: dict[str, torch.Tensor], where: str) -> None:
    """Raise a NumericalError naming the first tensor that holds NaN or Inf."""
    for name, t in tensors.items():
        if not torch.isfinite(t).all():
            bad = (~torch.isfinite(t)).sum().item()
            raise NumericalError(
                f"{where}: {name} has {bad} NaN/Inf value(s); activations overflowed or the input is corrupt "
                "(collect in float32/bfloat16 instead of float16, or check the calibration text)"
            )


def output_mean(weight: torch.Tensor, bias: torch.Tensor | None, x_mean: torch.Tensor) -> torch.Tensor:
    """E[y] = W E[x] + b, in float64."""
    mu = weight.double() @ x_mean
    return mu if bias is None else mu + bias.double()


def output_covariance(weight: torch.Tensor, x_cov: torch.Tensor) -> torch.Tensor:
    """Cov[y] = W Cov[x] W^T, in float64. Symmetric up to round-off; eigh reads its lower triangle."""
    w = weight.double()
    return (w @ x_cov) @ w.T


def output_moments(
    weight: torch.Tensor, bias: torch.Tensor | None, x_mean: torch.Tensor, x_cov: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (out,) and covariance (out, out) of y = W x + b from the input mean and covariance
    (InputMoments.mean() / .covariance(), shared by the Linear layers that read one input)."""
    return output_mean(weight, bias, x_mean), output_covariance(weight, x_cov)


def covariance_factor(x_cov: torch.Tensor) -> torch.Tensor | None:
    """Lower Cholesky factor L of an input covariance (Cov[x] = L L^T), or None when it is not
    positive definite (then callers use the plain eigh path)."""
    factor, info = torch.linalg.cholesky_ex(x_cov.double())
    return factor if int(info) == 0 else None


@dataclass
class Eigen:
    values: torch.Tensor  # (k,) descending, clamped at 0 (k = n, or fewer: `output_eigen(complete=False)`)
    vectors: torch.Tensor  # (n, k), column i belongs to values[i]
    n_clamped: int  # negative round-off eigenvalues set to 0
    min_raw: float  # most negative eigenvalue before clamping (0 if none)


def eigh_descending(cov: torch.Tensor) -> Eigen:
    """Eigendecomposition of a symmetric PSD matrix in float64, eigenvalues in descending order.

    Negative eigenvalues are round-off of a PSD matrix: they are counted and clamped to zero."""
    values, vectors = torch.linalg.eigh(cov.double())
    values = values.flip(0)
    vectors = vectors.flip(1)
    negative = values < 0
    min_raw = float(values.min()) if bool(negative.any()) else 0.0
    return Eigen(values.clamp_min(0.0), vectors, int(negative.sum()), min_raw)


def output_eigen(weight: torch.Tensor, x_cov: torch.Tensor, x_factor: torch.Tensor | None = None,
                 complete: bool = True) -> Eigen:
    """Eigendecomposition (float64, descending) of the output covariance C = W Cov[x] W^T.

    A Linear that widens (out > in, e.g. gate/up projections) has C = A A^T with A = W L of rank
    <= in (L = `covariance_factor`): the SVD A = U S Q^T gives the nonzero eigenpairs (S^2, U)
    without forming C, more accurately (no squaring) and faster than an out x out eigh; the other
    out - in eigenvalues are exactly 0, with an orthonormal completion of U as their eigenvectors
    (`complete=False`: left out, and the out x out QR that makes them skipped: the in pairs are all).
    Otherwise (or without a factor) C is formed and passed to eigh."""
    out_features, in_features = weight.shape
    if x_factor is None or out_features <= in_features:
        return eigh_descending(output_covariance(weight, x_cov))
    a = weight.double() @ x_factor
    u, s, _ = torch.linalg.svd(a, full_matrices=False)
    if not complete:
        return Eigen(s.square(), u, 0, 0.0)
    q, _ = torch.linalg.qr(u, mode="complete")
    vectors = torch.cat([u, q[:, in_features:]], dim=1)
    values = torch.cat([s.square(), s.new_zeros(out_features - in_features)])
    return Eigen(values, vectors, 0, 0.0)


def energy_kept(values: torch.Tensor) -> torch.Tensor:
    """Fraction of the feature variance captured by the top-r directions, for r = 1..n."""
    total = values.sum()
    return values.cumsum(0) / total if total > 0 else torch.ones_like(values)
