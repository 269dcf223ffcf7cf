"""Hand-written forward/backward kernels behind ``ConditionalGlowFlow(fused=True)``.

Two ``torch.autograd.Function``s, both first-order only (``once_differentiable``):

* ``FusedFlow``: the whole ``x -> (z, log_det)`` pass. The forward records no autograd graph;
  activations go into a workspace reused across steps (``WorkspacePool``; held until the graph
  is freed, so ``retain_graph`` works) instead of ~100 fresh tensors per step, and the backward
  is the chain rule written out layer by layer (the weight gradients of a subnet's hidden
  layers as one batched matmul).
* ``DedupLinear``: the condition part of every conditioned subnet's first layer, ``c @ W_c^T +
  b`` for all subnets at once, computed on the *distinct* rows of ``c`` only (a DML batch has
  several samples per class, hence repeated proxies) and gathered back. The input gradient is
  still computed per row, so gradients are exact for every row.

The maths is that of ``flow.py``'s plain implementation; tests compare both with FrEIA.

Why it is kept (``benchmarks/bench_objective.py --plain --compile --threads 1 --clock cpu``,
2-core CPU, NIR objective step at batch 90): 1.42x faster than plain autograd at D=128 and
1.22x at D=512; ``torch.compile`` of the plain path measured 0.96x / 0.89x of the fused time,
after a compiling first step.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

#: FrEIA's "ATAN" soft clamp is ``clamp * (0.636 * atan(u))``.
ATAN_SCALE = 0.636

_threshold_bw = torch.ops.aten.threshold_backward.grad_input


@dataclass(frozen=True)
class Plan:
    """Static description of a flow for the fused kernels."""

    num_blocks: int
    split: tuple[int, int]  # (l1, l2): x1 = x[:, :l1], x2 = x[:, l1:]
    depth: int  # Linear layers per subnet (>= 2)
    width: int
    clamp: float
    # per subnet (computation order): slot in the condition part, or -1 if unconditional
    # (``Conditioning.cond_slot``; the kernels never look at the conditioning mode)
    cond_slot: tuple[int, ...]


class _Workspace:
    """Preallocated buffers of one fused forward/backward, with their per-layer views."""

    def __init__(self, plan: Plan, bsz: int, dim: int, dtype, device):
        n_sub = 2 * plan.num_blocks
        nh = plan.depth - 2
        w = plan.width
        opts = {"dtype": dtype, "device": device}
        self.key = (bsz, dtype, device)
        # acts[s, j]: output of layer j (after ReLU) = input of layer j + 1, j = 0 .. depth-2
        self.acts = torch.empty(n_sub, plan.depth - 1, bsz, w, **opts)
        # pre-activation gradients: hidden layers (S, nh, B, W); first layers (B, S, W), laid
        # out so that the condition-part gradient is a plain view in the dense mode
        self.g_hid = torch.empty(n_sub, nh, bsz, w, **opts)
        self.g_pre0 = torch.empty(bsz, n_sub, w, **opts)
        self.scales = torch.empty(bsz, plan.num_blocks * dim, **opts)  # clamped log-scales
        self.acts_v = [list(a.unbind(0)) for a in self.acts.unbind(0)]  # [s][j]
        self.g_hid_v = [list(g.unbind(0)) for g in self.g_hid.unbind(0)]  # [s][j]
        self.g_pre0_v = list(self.g_pre0.unbind(1))


class WorkspacePool:
    """Reuses fused-pass workspaces between training steps (a fresh multi-MB buffer per step
    costs page faults). A workspace is checked out by a forward and returned after its
    backward (or at once when no backward will come); concurrent passes get separate ones."""

    def __init__(self, max_free: int = 2):
        self._free: list[_Workspace] = []
        self._lock = threading.Lock()
        self.max_free = max_free

    def take(self, plan: Plan, bsz: int, dim: int, dtype, device) -> _Workspace:
        key = (bsz, dtype, device)
        with self._lock:
            for i, ws in enumerate(self._free):
                if ws.key == key:
                    return self._free.pop(i)
        return _Workspace(plan, bsz, dim, dtype, device)

    def give(self, ws: _Workspace) -> None:
        with self._lock:
            self._free.insert(0, ws)
            del self._free[self.max_free:]

    def clear(self) -> None:
        with self._lock:
            self._free.clear()

    def __reduce__(self):  # copies and pickles start empty (a lock cannot be pickled)
        return (WorkspacePool, (self.max_free,))


class _Lease:
    """Gives a workspace back to its pool when the autograd node holding it is freed (after
    the last backward through the graph, or when the graph is dropped unused)."""

    __slots__ = ("pool", "ws")

    def __init__(self, pool: WorkspacePool, ws: _Workspace):
        self.pool, self.ws = pool, ws

    def __del__(self):
        try:
            self.pool.give(self.ws)
        except Exception:  # interpreter shutdown: nothing left to reuse it
            pass


class FusedFlow(torch.autograd.Function):
    """``(x, cpart, weights) -> (z, log_det)`` with a hand-written backward.

    Arguments after ``plan``, ``pool`` and ``track`` (whether a backward will follow, so the
    workspace must be kept): ``x (B, D)``; ``cpart (B, S_c * W)`` (condition part +
    bias of the first layer of each conditioned subnet) or ``None``; ``perms``, ``inv_perms``
    ``(num_blocks, D)``; ``in_bias (S, W)``; then for every subnet (S = 2 * num_blocks, in
    computation order) ``w_in (W, n_in)``, then ``w_hidden (depth-2, W, W)``, then ``b_hidden
    (depth-2, W)``, then ``w_out (2 n_out, W)``, then ``b_out (2 n_out)``.
    """

    @staticmethod
    def forward(ctx, plan: Plan, pool: WorkspacePool, track: bool, x, cpart, perms, inv_perms,
                in_bias, *rest):
        nb, width = plan.num_blocks, plan.width
        n_sub = 2 * nb
        nh = plan.depth - 2
        l1, l2 = plan.split
        bsz, dim = x.shape
        w_in, w_hid, b_hid, w_out, b_out = (rest[i * n_sub:(i + 1) * n_sub] for i in range(5))
        ws = pool.take(plan, bsz, dim, x.dtype, x.device)
        hw_t = [w.transpose(1, 2).unbind(0) for w in w_hid]  # [s][j]
        hb = [b.unbind(0) for b in b_hid]
        in_b = in_bias.unbind(0)
        cp = None if cpart is None else cpart.view(bsz, -1, width).unbind(1)
        scales = ws.scales
        # C * (0.636 * atan(u)) as one multiplication by C * 0.636: bitwise the same for a
        # power-of-two C (the default 2.0), within an ulp otherwise
        clamp_c = plan.clamp * ATAN_SCALE
        saved = []
        h = x
        for k in range(nb):
            h = h.index_select(1, perms[k])
            y = torch.empty(bsz, dim, dtype=x.dtype, device=x.device)
            # coupling "a" (s = 2k) transforms x1 from x2; coupling "b" (s = 2k+1) x2 from y1
            for s, inp, active, n, lo in ((2 * k, h[:, l1:], h[:, :l1], l1, 0),
                                          (2 * k + 1, y[:, :l1], h[:, l1:], l2, l1)):
                acts = ws.acts_v[s]
                slot = plan.cond_slot[s]
                a = acts[0]
                torch.addmm(in_b[s] if slot < 0 else cp[slot], inp, w_in[s].t(), out=a)
                a.relu_()
                for j in range(nh):
                    nxt = acts[j + 1]
                    torch.addmm(hb[s][j], a, hw_t[s][j], out=nxt)
                    nxt.relu_()
                    a = nxt
                out = torch.addmm(b_out[s], a, w_out[s].t())
                raw = out[:, :n]
                log_s = scales[:, k * dim + lo:k * dim + lo + n]
                torch.atan(raw, out=log_s)
                log_s.mul_(clamp_c)
                e = torch.exp(log_s)
                xe = e * active
                torch.add(xe, out[:, n:], out=y[:, lo:lo + n])
                # the last coupling's input is a view of z, an output: keeping it here would tie
                # ctx -> view -> z -> grad_fn (= ctx) into a cycle that is never freed; backward
                # takes it from the saved z instead
                saved.append((None if s == n_sub - 1 else inp, raw, e, xe))
            h = y
        log_det = scales.sum(1)

        if track:  # a backward will follow (grad mode on and something requires grad)
            ctx.plan, ctx.saved, ctx.lease = plan, saved, _Lease(pool, ws)
            # z too: saved inputs of the last block are views of it, so an in-place change of
            # z before backward must raise (autograd's version check) instead of corrupting it
            ctx.save_for_backward(inv_perms, *w_in, *w_hid, *w_out, h)
            ctx.has_cpart = cpart is not None
        else:
            pool.give(ws)
        return h, log_det

    @staticmethod
    @once_differentiable
    def backward(ctx, g_z, g_ld):
        ws = ctx.lease.ws
        plan = ctx.plan
        nb, width = plan.num_blocks, plan.width
        n_sub = 2 * nb
        nh = plan.depth - 2
        l1, l2 = plan.split
        inv_perms, *wts, z = ctx.saved_tensors
        w_in, w_hid, w_out = (wts[i * n_sub:(i + 1) * n_sub] for i in range(3))
        bsz, dim = g_z.shape
        opts = {"dtype": g_z.dtype, "device": g_z.device}
        g_ld = g_ld.reshape(bsz, 1)
        clamp_c = plan.clamp * ATAN_SCALE
        hw = [w.unbind(0) for w in w_hid]  # [s][j]
        g_w_in: list[Tensor] = [None] * n_sub  # type: ignore[list-item]
        g_w_hid: list[Tensor] = [None] * n_sub  # type: ignore[list-item]
        g_b_hid: list[Tensor] = [None] * n_sub  # type: ignore[list-item]
        g_w_out: list[Tensor] = [None] * n_sub  # type: ignore[list-item]
        g_b_out: list[Tensor] = [None] * n_sub  # type: ignore[list-item]
        saved = ctx.saved

        g = g_z
        for k in range(nb - 1, -1, -1):
            g_h = torch.empty(bsz, dim, **opts)
            g_y1 = None
            # coupling b (y2 from x2, conditioned on y1), then coupling a (y1 from x1 | x2)
            for s, n, lo in ((2 * k + 1, l2, l1), (2 * k, l1, 0)):
                inp, raw, e, xe = saved[s]
                if inp is None:
                    inp = z[:, :l1]
                g_y = g[:, lo:lo + n] if g_y1 is None else g_y1
                # y = exp(s) * active + t,  s = C * 0.636 * atan(raw),  log_det += sum(s)
                torch.mul(e, g_y, out=g_h[:, lo:lo + n])  # gradient of the transformed half
                g_a = torch.empty(bsz, 2 * n, **opts)
                g_s = g_a[:, :n]
                torch.addcmul(g_ld, g_y, xe, out=g_s)
                g_s.mul_(clamp_c).div_(torch.square(raw).add_(1.0))
                g_a[:, n:].copy_(g_y)
                # subnet backward, from the output layer down
                acts = ws.acts_v[s]
                g_hid = ws.g_hid_v[s]
                last = acts[nh]
                g_w_out[s] = g_a.t() @ last
                g_b_out[s] = g_a.sum(0)
                g_act = g_a @ w_out[s]
                for j in range(nh - 1, -1, -1):  # hidden layer j + 1: acts[j] -> acts[j + 1]
                    g_pre = g_hid[j]
                    _threshold_bw(g_act, acts[j + 1], 0, grad_input=g_pre)
                    g_act = g_pre @ hw[s][j]
                # all hidden-layer weight gradients of this subnet: one batched G^T @ A
                g_w_hid[s] = torch.bmm(ws.g_hid[s].transpose(1, 2), ws.acts[s, :nh])
                g_b_hid[s] = ws.g_hid[s].sum(1)
                g0 = ws.g_pre0_v[s]
                _threshold_bw(g_act, acts[0], 0, grad_input=g0)
                g_w_in[s] = g0.t() @ inp
                g_inp = g0 @ w_in[s]
                if g_y1 is None:  # coupling b's input is y1: add to y1's incoming gradient
                    g_y1 = g[:, :l1] + g_inp
                else:  # coupling a's input is x2
                    g_h[:, l1:].add_(g_inp)
            g = g_h.index_select(1, inv_perms[k])

        g_cpart = g_in_bias = None
        slots = [s for s in range(n_sub) if plan.cond_slot[s] >= 0]
        if ctx.has_cpart and ctx.needs_input_grad[4]:
            if len(slots) == n_sub:
                # a view of the workspace is safe: only DedupLinear/linear's backward reads it,
                # within this backward pass, and the workspace stays leased until the graph dies
                g_cpart = ws.g_pre0.view(bsz, n_sub * width)
            else:
                g_cpart = ws.g_pre0[:, slots].reshape(bsz, len(slots) * width)
        if ctx.needs_input_grad[7] and len(slots) < n_sub:
            g_in_bias = torch.zeros(n_sub, width, **opts)
            for s in range(n_sub):
                if plan.cond_slot[s] < 0:
                    g_in_bias[s] = ws.g_pre0_v[s].sum(0)
        return (None, None, None, g, g_cpart, None, None, g_in_bias,
                *g_w_in, *g_w_hid, *g_b_hid, *g_w_out, *g_b_out)


class DedupLinear(torch.autograd.Function):
    """``feat @ weight^T + bias`` computed on the distinct rows ``feat[idx]`` and gathered back
    with ``inv`` (``feat == feat[idx][inv]`` exactly). Gradients are exact for every row."""

    @staticmethod
    def forward(ctx, feat, weight, bias, idx, inv):
        feat_u = feat.index_select(0, idx)
        out = torch.addmm(bias, feat_u, weight.t()).index_select(0, inv)
        ctx.save_for_backward(feat_u, weight, inv)
        ctx.n_unique = idx.shape[0]
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        feat_u, weight, inv = ctx.saved_tensors
        g_feat = g_w = g_b = None
        if ctx.needs_input_grad[0]:
            g_feat = g @ weight
        if ctx.needs_input_grad[1]:
            g_u = torch.zeros(ctx.n_unique, g.shape[1], dtype=g.dtype, device=g.device)
            g_u.index_add_(0, inv, g)
            g_w = g_u.t() @ feat_u
        if ctx.needs_input_grad[2]:
            g_b = g.sum(0)
        return g_feat, g_w, g_b, None, None


def distinct_rows(feat: Tensor) -> tuple[Tensor, Tensor] | None:
    """``(idx, inv)`` with ``feat[idx]`` the distinct rows (first occurrences) and
    ``feat[idx][inv] == feat``; ``None`` when all rows are distinct."""
    uniq, inv = torch.unique(feat.detach(), dim=0, return_inverse=True)
    n_u = uniq.shape[0]
    if n_u == feat.shape[0]:
        return None
    rows = torch.arange(feat.shape[0], device=feat.device)
    idx = torch.full((n_u,), feat.shape[0], dtype=torch.long, device=feat.device)
    idx.scatter_reduce_(0, inv, rows, reduce="amin")
    return idx, inv
