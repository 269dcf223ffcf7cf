"""Hand-written forward/backward kernels behind ``ConditionalGlowFlow(fused=True)``.

Two ``torch.autograd.Function``s, both first-order only (``once_differentiable``):

* ``FusedFlow``: the whole ``x -> (z, log_det)`` pass. The forward records no autograd graph;
  every intermediate goes into a workspace reused across steps (``WorkspacePool``; held until
  the graph is freed, so ``retain_graph`` works) whose per-subnet views are made once, as are
  the views of the parameters, and the backward is the chain rule written out layer by layer
  (the weight gradients of a subnet's hidden layers as one batched matmul). Only z, log_det
  and the gradients handed to autograd are fresh tensors.
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
    """Preallocated buffers of one fused forward/backward, with every per-subnet view made once
    (a view costs as much as a small kernel's dispatch, and a step would make ~400 of them)."""

    def __init__(self, plan: Plan, bsz: int, dim: int, dtype, device):
        nb = plan.num_blocks
        n_sub = 2 * nb
        nh = plan.depth - 2
        w = plan.width
        l1, l2 = plan.split
        opts = {"dtype": dtype, "device": device}
        self.key = (bsz, dtype, device)
        # acts[s, j]: output of layer j (after ReLU) = input of layer j + 1, j = 0 .. depth-2
        self.acts = torch.empty(n_sub, plan.depth - 1, bsz, w, **opts)
        # pre-activation gradients: hidden layers (S, nh, B, W); first layers (B, S, W), laid
        # out so that the condition-part gradient is a plain view in the dense mode
        self.g_hid = torch.empty(n_sub, nh, bsz, w, **opts)
        self.g_pre0 = torch.empty(bsz, n_sub, w, **opts)
        self.scales = torch.empty(bsz, nb * dim, **opts)  # clamped log-scales
        # per block: its permuted input h; its output y but the last's (z, a fresh output); the
        # gradients of h and of the previous block's output
        self.h = torch.empty(nb, bsz, dim, **opts)
        self.y = torch.empty(nb - 1, bsz, dim, **opts)
        self.g_h = torch.empty(nb, bsz, dim, **opts)
        self.g_y = torch.empty(nb - 1, bsz, dim, **opts)
        self.g_act = torch.empty(bsz, w, **opts)
        self.g_y1 = torch.empty(bsz, l1, **opts)

        self.acts_v = [list(a.unbind(0)) for a in self.acts.unbind(0)]  # [s][j]
        self.acts_hid = [self.acts[s, :nh] for s in range(n_sub)]  # inputs of hidden layers
        self.g_hid_v = [list(g.unbind(0)) for g in self.g_hid.unbind(0)]  # [s][j]
        self.g_hid_t = [g.transpose(1, 2) for g in self.g_hid.unbind(0)]
        self.g_pre0_v = list(self.g_pre0.unbind(1))
        self.g_pre0_t = [g.t() for g in self.g_pre0_v]
        # per subnet s (computation order; block k = s // 2, n = the size it transforms):
        # input, transformed half, output half, [raw, t] = subnet output, log-scale, exp(log_s),
        # exp(log_s) * active, the output gradient [g_s, g_t] (and its transpose), 1 + raw^2,
        # the input gradient
        self.inp, self.active, self.y_half = [], [], []
        self.out, self.raw, self.t, self.log_s, self.e, self.xe = [], [], [], [], [], []
        self.g_a, self.g_a_t, self.g_s, self.g_t, self.sq, self.g_inp = [], [], [], [], [], []
        self.g_h_half = []
        for s in range(n_sub):
            k = s // 2
            n, lo = (l1, 0) if s % 2 == 0 else (l2, l1)
            last = k == nb - 1
            h = self.h[k]
            if s % 2 == 0:  # coupling "a": x1 from x2
                self.inp.append(h[:, l1:])
                self.active.append(h[:, :l1])
            else:  # coupling "b": x2 from y1 (the last block's y1 is a view of z: per pass)
                self.inp.append(None if last else self.y[k][:, :l1])
                self.active.append(h[:, l1:])
            self.y_half.append(None if last else self.y[k][:, lo:lo + n])
            out = torch.empty(bsz, 2 * n, **opts)
            self.out.append(out)
            self.raw.append(out[:, :n])
            self.t.append(out[:, n:])
            self.log_s.append(self.scales[:, k * dim + lo:k * dim + lo + n])
            self.e.append(torch.empty(bsz, n, **opts))
            self.xe.append(torch.empty(bsz, n, **opts))
            g_a = torch.empty(bsz, 2 * n, **opts)
            self.g_a.append(g_a)
            self.g_a_t.append(g_a.t())
            self.g_s.append(g_a[:, :n])
            self.g_t.append(g_a[:, n:])
            self.sq.append(torch.empty(bsz, n, **opts))
            self.g_inp.append(torch.empty(bsz, l2 if s % 2 == 0 else l1, **opts))
            self.g_h_half.append(self.g_h[k][:, lo:lo + n])
        self.g_h_x2 = [g[:, l1:] for g in self.g_h.unbind(0)]
        self.g_y_halves = [(g[:, :l1], g[:, l1:]) for g in self.g_y.unbind(0)]


class _ParamViews:
    """Views of the flow's parameters that the fused kernels index per layer, made once and
    reused while the parameters keep their storage (``key``); in-place updates (the optimiser
    step, ``load_state_dict``) keep it, a new tensor (``.to``, ``.data = ...``) does not."""

    def __init__(self, key, plan: Plan, perms, inv_perms, in_bias, rest):
        n_sub = 2 * plan.num_blocks
        w_in, w_hid, b_hid, w_out, b_out = (rest[i * n_sub:(i + 1) * n_sub] for i in range(5))
        self.key = key
        self.perm = perms.unbind(0)
        self.inv_perm = inv_perms.unbind(0)
        self.in_b = in_bias.unbind(0)
        self.w_in = w_in
        self.w_in_t = [w.t() for w in w_in]
        self.hw = [w.unbind(0) for w in w_hid]  # [s][j]
        self.hw_t = [w.transpose(1, 2).unbind(0) for w in w_hid]
        self.hb = [b.unbind(0) for b in b_hid]
        self.w_out = w_out
        self.w_out_t = [w.t() for w in w_out]
        self.b_out = b_out


def _storage_key(tensors) -> tuple:
    return tuple((t.data_ptr(), t.shape, t.stride()) for t in tensors)


class WorkspacePool:
    """Reuses fused-pass workspaces between training steps (a fresh multi-MB buffer per step
    costs page faults). A workspace is checked out by a forward and returned after its
    backward (or at once when no backward will come); concurrent passes get separate ones.
    Also holds the parameter views of the last pass (:class:`_ParamViews`)."""

    def __init__(self, max_free: int = 2):
        self._free: list[_Workspace] = []
        self._lock = threading.Lock()
        self._views: _ParamViews | None = None
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

    def views(self, plan: Plan, perms, inv_perms, in_bias, rest) -> _ParamViews:
        key = _storage_key((perms, inv_perms, in_bias, *rest))
        views = self._views
        if views is None or views.key != key:
            views = self._views = _ParamViews(key, plan, perms, inv_perms, in_bias, rest)
        return views

    def clear(self) -> None:
        with self._lock:
            self._free.clear()
            self._views = None

    def __reduce__(self):  # copies and pickles start empty (a lock cannot be pickled)
        return (WorkspacePool, (self.max_free,))


class _Lease:
    """Gives a workspace back to its pool when the autograd node holding it is freed (after
    the last backward through the graph, or when the graph is dropped unused); ``pool=None``
    for a workspace that belongs to a captured CUDA graph."""

    __slots__ = ("pool", "ws")

    def __init__(self, pool: WorkspacePool, ws: _Workspace):
        self.pool, self.ws = pool, ws

    def __del__(self):
        if self.pool is None:  # a captured pass's workspace: the graph keeps it
            return
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
        l1 = plan.split[0]
        bsz, dim = x.shape
        # a pass captured into a CUDA graph (``nirdml.nir.graphs``) gets a workspace of its own
        # from the graph's memory pool, never shared: the graph's replays write to it
        captured = x.is_cuda and torch.cuda.is_current_stream_capturing()
        ws = (_Workspace(plan, bsz, dim, x.dtype, x.device) if captured
              else pool.take(plan, bsz, dim, x.dtype, x.device))
        pv = pool.views(plan, perms, inv_perms, in_bias, rest)
        cp = None if cpart is None else cpart.view(bsz, -1, width).unbind(1)
        # C * (0.636 * atan(u)) as one multiplication by C * 0.636: bitwise the same for a
        # power-of-two C (the default 2.0), within an ulp otherwise
        clamp_c = plan.clamp * ATAN_SCALE
        z = torch.empty(bsz, dim, dtype=x.dtype, device=x.device)
        z_halves = (z[:, :l1], z[:, l1:])
        h = x
        for k in range(nb):
            torch.index_select(h, 1, pv.perm[k], out=ws.h[k])
            # coupling "a" (s = 2k) transforms x1 from x2; coupling "b" (s = 2k+1) x2 from y1
            for s in (2 * k, 2 * k + 1):
                inp = ws.inp[s] if ws.inp[s] is not None else z_halves[0]
                y_half = ws.y_half[s] if ws.y_half[s] is not None else z_halves[s % 2]
                acts = ws.acts_v[s]
                slot = plan.cond_slot[s]
                a = acts[0]
                torch.addmm(pv.in_b[s] if slot < 0 else cp[slot], inp, pv.w_in_t[s], out=a)
                a.relu_()
                hw_t, hb = pv.hw_t[s], pv.hb[s]
                for j in range(nh):
                    nxt = acts[j + 1]
                    torch.addmm(hb[j], a, hw_t[j], out=nxt)
                    nxt.relu_()
                    a = nxt
                torch.addmm(pv.b_out[s], a, pv.w_out_t[s], out=ws.out[s])
                log_s = ws.log_s[s]
                torch.atan(ws.raw[s], out=log_s)
                log_s.mul_(clamp_c)
                torch.exp(log_s, out=ws.e[s])
                torch.mul(ws.e[s], ws.active[s], out=ws.xe[s])
                torch.add(ws.xe[s], ws.t[s], out=y_half)
            h = ws.y[k] if k < nb - 1 else z
        log_det = ws.scales.sum(1)

        if track:  # a backward will follow (grad mode on and something requires grad)
            ctx.plan, ctx.views, ctx.lease = plan, pv, _Lease(None if captured else pool, ws)
            # the weights and z for autograd's version check: an in-place change of either
            # before backward (the last block's y1 is a view of z) must raise, not corrupt it
            ctx.save_for_backward(*rest[:n_sub], *rest[n_sub:2 * n_sub],
                                  *rest[3 * n_sub:4 * n_sub], z)
            ctx.has_cpart = cpart is not None
        elif not captured:
            pool.give(ws)
        return z, log_det

    @staticmethod
    @once_differentiable
    def backward(ctx, g_z, g_ld):
        ws = ctx.lease.ws
        plan, pv = ctx.plan, ctx.views
        nb, width = plan.num_blocks, plan.width
        n_sub = 2 * nb
        nh = plan.depth - 2
        l1 = plan.split[0]
        *_, z = ctx.saved_tensors  # unpacking runs the version check
        bsz, dim = g_z.shape
        opts = {"dtype": g_z.dtype, "device": g_z.device}
        g_ld = g_ld.reshape(bsz, 1)
        clamp_c = plan.clamp * ATAN_SCALE
        g_w_in: list[Tensor] = [None] * n_sub  # type: ignore[list-item]
        g_w_hid: list[Tensor] = [None] * n_sub  # type: ignore[list-item]
        g_b_hid: list[Tensor] = [None] * n_sub  # type: ignore[list-item]
        g_w_out: list[Tensor] = [None] * n_sub  # type: ignore[list-item]
        g_b_out: list[Tensor] = [None] * n_sub  # type: ignore[list-item]
        g_act = ws.g_act

        g_halves = (g_z[:, :l1], g_z[:, l1:])
        g = None
        for k in range(nb - 1, -1, -1):
            # coupling b (y2 from x2, conditioned on y1), then coupling a (y1 from x1 | x2)
            for s in (2 * k + 1, 2 * k):
                inp = ws.inp[s] if ws.inp[s] is not None else z[:, :l1]
                g_y = g_halves[1] if s % 2 else ws.g_y1
                # y = exp(s) * active + t,  s = C * 0.636 * atan(raw),  log_det += sum(s)
                torch.mul(ws.e[s], g_y, out=ws.g_h_half[s])  # gradient of the transformed half
                g_s, sq = ws.g_s[s], ws.sq[s]
                torch.addcmul(g_ld, g_y, ws.xe[s], out=g_s)
                torch.mul(ws.raw[s], ws.raw[s], out=sq)
                g_s.mul_(clamp_c).div_(sq.add_(1.0))
                ws.g_t[s].copy_(g_y)
                g_a = ws.g_a[s]
                # subnet backward, from the output layer down
                acts = ws.acts_v[s]
                g_hid = ws.g_hid_v[s]
                g_w_out[s] = ws.g_a_t[s] @ acts[nh]
                g_b_out[s] = g_a.sum(0)
                torch.mm(g_a, pv.w_out[s], out=g_act)
                hw = pv.hw[s]
                for j in range(nh - 1, -1, -1):  # hidden layer j + 1: acts[j] -> acts[j + 1]
                    g_pre = g_hid[j]
                    _threshold_bw(g_act, acts[j + 1], 0, grad_input=g_pre)
                    torch.mm(g_pre, hw[j], out=g_act)
                # all hidden-layer weight gradients of this subnet: one batched G^T @ A
                g_w_hid[s] = torch.bmm(ws.g_hid_t[s], ws.acts_hid[s])
                g_b_hid[s] = ws.g_hid[s].sum(1)
                g0 = ws.g_pre0_v[s]
                _threshold_bw(g_act, acts[0], 0, grad_input=g0)
                g_w_in[s] = ws.g_pre0_t[s] @ inp
                g_inp = torch.mm(g0, pv.w_in[s], out=ws.g_inp[s])
                if s % 2:  # coupling b's input is y1: add to y1's incoming gradient
                    torch.add(g_halves[0], g_inp, out=ws.g_y1)
                else:  # coupling a's input is x2
                    ws.g_h_x2[k].add_(g_inp)
            if k > 0:
                g = torch.index_select(ws.g_h[k], 1, pv.inv_perm[k], out=ws.g_y[k - 1])
                g_halves = ws.g_y_halves[k - 1]
            else:
                g = ws.g_h[0].index_select(1, pv.inv_perm[0])

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
