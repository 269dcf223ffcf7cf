"""ProxyAnchor loss (Kim et al., "Proxy Anchor Loss for Deep Metric Learning", CVPR 2020).

With s(x, p) the cosine similarity, P+ the classes present in the batch, P all classes,
X_p+ the batch samples of class p and X_p- the others:

    L = 1/|P+| sum_{p in P+} log(1 + sum_{x in X_p+} exp(-alpha (s(x, p) - delta)))
      + 1/|P|  sum_{p in P}  log(1 + sum_{x in X_p-} exp( alpha (s(x, p) + delta)))

The positive term is averaged over the classes present in the batch (the paper's form; the NIR
release averages over samples instead, which differs when classes have unequal counts).

Speed (SOP has 11,318 classes): the positive term needs only each sample's own proxy (B dot
products); the negative term is one ``(C, B)`` matmul, one exp pass with the positives zeroed
and row sums, and a one-pass hand-written backward (``benchmarks/bench_proxy_loss.py``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from nirdml.losses.base import ProxyLoss


def _log1p_sum_exp(logits: Tensor, mask: Tensor) -> Tensor:
    """Per column: log(1 + sum over masked rows of exp(logits)); 0 for an empty column."""
    masked = logits.masked_fill(~mask, float("-inf"))
    zeros = torch.zeros(1, logits.shape[1], dtype=logits.dtype, device=logits.device)
    return torch.logsumexp(torch.cat([masked, zeros], dim=0), dim=0)


#: the fused negative term runs without max-shifting while alpha * (1 + |delta|) stays below
#: this (exp(80) * batch size is far from float32's 3e38); larger scales take the shifted path
_UNSHIFTED_LIMIT = 80.0


class _NegativeTerm(torch.autograd.Function):
    """``sum_c log(1 + k sum_{i: y_i != c} exp(a[c, i]))`` of the ``(C, B)`` logits
    ``a = alpha cos`` with ``k = exp(alpha delta)``, in one pass over them (exp in place, the
    positives ``(rows, cols)`` zeroed, row sums) and a one-pass backward ``k E / (1 + S)``; no
    ``(B + 1, C)`` concatenation or masked copies. ``a`` must be a fresh tensor nobody else
    reads (it is overwritten by ``exp(a)``)."""

    @staticmethod
    def forward(ctx, logits: Tensor, rows: Tensor, cols: Tensor, k: float) -> Tensor:
        e = logits.detach().exp_()
        e[rows, cols] = 0.0
        s = e.sum(dim=1).mul_(k)
        ctx.save_for_backward(e, s)
        ctx.k = k
        return torch.log1p(s).sum()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        e, s = ctx.saved_tensors
        return e * (grad * ctx.k / (1.0 + s))[:, None], None, None, None


class ProxyAnchorLoss(ProxyLoss):
    """ProxyAnchor with one proxy per class.

    Args:
        num_classes, embedding_dim: proxies are ``(num_classes, embedding_dim)``, N(0, 1) / 8.
        alpha: scale (32 in the paper and the NIR release).
        delta: margin (0.1).
        proxy_lr_multiplier: defaults to 2000 (NIR release baseline at base lr 1e-5; the
            release uses 4000 for PA + NIR, Kim et al. used 100 at base lr 1e-4).

    ``last_terms``: ``proxy`` = ``pos`` + ``neg``.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        alpha: float = 32.0,
        delta: float = 0.1,
        proxy_lr_multiplier: float | None = None,
        shard=None,
        sample_rate: float = 1.0,
        seed: int = 0,
    ):
        super().__init__(num_classes, embedding_dim, proxy_lr_multiplier, shard=shard,
                         sample_rate=sample_rate, seed=seed)
        self.alpha = float(alpha)
        self.delta = float(delta)

    def _compute(self, embeddings: Tensor, labels: Tensor):
        """Per owned class on this shard, combined by ``shard.sum`` (``nirdml.losses.shard``);
        ``|P+|`` is counted from the (global) labels, ``C`` is the shard's class total. Under
        sampling (``sample_rate < 1``) the negative term is normalised by the number of kept
        classes of all ranks instead of C; the positive term is unchanged (every batch class
        is kept)."""
        shard, proxies_raw, labels = self._classes(labels)
        if self.alpha * (1.0 + abs(self.delta)) > _UNSHIFTED_LIMIT:
            return self._compute_shifted(embeddings, labels, shard, proxies_raw)
        x = F.normalize(embeddings, dim=1)
        proxies = F.normalize(proxies_raw.to(x.dtype), dim=1)
        num_present = torch.unique(labels).shape[0]
        mine = shard.owned(labels)
        # positives: each sample against its own proxy only (B dot products), grouped by class
        local = labels[mine] - shard.lo
        own = (x[mine] * proxies[local]).sum(dim=1)
        present, group = torch.unique(local, return_inverse=True)
        per_class = torch.zeros(present.shape[0], dtype=x.dtype, device=x.device).index_add_(
            0, group, torch.exp(-self.alpha * (own - self.delta)))
        pos = shard.sum(torch.log1p(per_class).sum()) / num_present
        # negatives: every class against the samples of the other classes, (C, B) contiguous;
        # alpha folded into the (B, D) side of the GEMM, exp(alpha delta) into the row sums
        logits = proxies @ (self.alpha * x).t()
        cols = torch.arange(labels.shape[0], device=labels.device)[mine]
        neg = _NegativeTerm.apply(logits, local, cols, math.exp(self.alpha * self.delta))
        neg = shard.sum(neg) / shard.num_classes
        return pos + neg, {"pos": pos, "neg": neg}

    def _compute_shifted(self, embeddings: Tensor, labels: Tensor, shard=None,
                         proxies_raw=None):
        """The max-shifted (log-sum-exp) form, for scales whose exp() would overflow (the
        classes of this step from ``_classes`` unless given)."""
        if shard is None:
            shard, proxies_raw, labels = self._classes(labels)
        x = F.normalize(embeddings, dim=1)
        cos = x @ F.normalize(proxies_raw.to(x.dtype), dim=1).t()  # (B, shard classes)
        classes = torch.arange(shard.lo, shard.hi, device=labels.device)
        pos_mask = labels[:, None] == classes[None, :]
        pos_lse = _log1p_sum_exp(-self.alpha * (cos - self.delta), pos_mask)
        neg_lse = _log1p_sum_exp(self.alpha * (cos + self.delta), ~pos_mask)
        num_present = torch.unique(labels).shape[0]
        pos = shard.sum(pos_lse.sum()) / num_present  # absent classes contribute log(1) = 0
        neg = shard.sum(neg_lse.sum()) / shard.num_classes
        return pos + neg, {"pos": pos, "neg": neg}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, alpha={self.alpha:g}, delta={self.delta:g}"
