"""A GRU over padded batches with lengths, fast on CPU: exactly ``nn.GRU`` over packed sequences.

``gru(rnn, x, lengths)`` gives what ``nn.GRU`` (``batch_first``) gives for
``pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)`` followed by
``pad_packed_sequence(..., total_length=n)``: (B, n, dirs · H), the reverse direction of each
sequence starting at its own last element from a zero state, padded positions exactly zero, and for
several layers each layer reading the previous one's [forward, reverse] output. It uses the
module's own parameters (``weight_ih_l{k}[_reverse]`` ...), so state dicts do not change.

Why: PyTorch's CPU ``nn.GRU`` has no fused training kernel; autograd records every gate of every
time step (concatenations of the steps' outputs and gradients, per-step gradient accumulation into
the recurrent weights), which is most of the SCAN training step on CPU. Here:

- the sequences are sorted by length (longest first) and each reverse sequence is reversed within
  its length, so both directions run forward in an "aligned" time where step t holds the first
  ``batch_sizes[t]`` sequences, exactly the packed layout (no work on padding, no masks);
- the input projections of all steps and both directions are ONE batched product;
- the recurrence is one ``autograd.Function`` (both directions stacked as a batch dimension,
  ``baddbmm`` for the recurrent product, preallocated buffers written in place); its backward is
  hand-written BPTT with, per step, the gates' elementwise gradients and one ``dh @ W_hh``; the
  recurrent weight and bias gradients are one product / sum over all steps after the loop.

Gates as PyTorch (aten's GRU cell): r = σ(W_ir x + b_ir + W_hr h + b_hr), z likewise,
n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn)), h' = (h − n) ⊙ z + n.
"""
from __future__ import annotations

import torch
from torch import nn


class _RowGather(torch.autograd.Function):
    """``src.index_select(0, index)`` where ``index`` (G · R,) is G permutations of src's R rows;
    backward: the G inverse permutations ``inverse`` (G, R) gather the gradient back (and sum)."""

    @staticmethod
    def forward(ctx, src: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return src.index_select(0, index)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        groups, rows = inverse.shape
        grad = grad.reshape(groups, rows, *grad.shape[1:])
        out = grad[0].index_select(0, inverse[0])
        for g in range(1, groups):
            out.add_(grad[g].index_select(0, inverse[g]))
        return out, None, None


def _zero_inactive(buf: torch.Tensor, batch_sizes: list[int]) -> None:
    """Zeroes the entries (D, t, s ≥ batch_sizes[t]) of a (D, n, B, ...) buffer: the steps
    where a sequence has ended (and every step past the longest)."""
    b = buf.shape[2]
    for t, bs in enumerate(batch_sizes):
        if bs < b:
            buf[:, t, bs:].zero_()
    buf[:, len(batch_sizes):].zero_()


class _Recurrence(torch.autograd.Function):
    """The GRU recurrence over precomputed input gates, both directions at once.

    gi (D, n, B, 3H): W_ih x + b_ih in aligned time; w_hh (D, 3H, H); b_hh (D, 3H); batch_sizes:
    active sequences per step (non-increasing, python ints). Returns the states (D, n, B, H),
    zero where a sequence has ended.
    """

    @staticmethod
    def forward(ctx, gi: torch.Tensor, w_hh: torch.Tensor, b_hh: torch.Tensor,
                batch_sizes: list[int]) -> torch.Tensor:
        d, n, b, h3 = gi.shape
        h = h3 // 3
        opts = dict(dtype=gi.dtype, device=gi.device)
        y = torch.empty(d, n, b, h, **opts)
        _zero_inactive(y, batch_sizes)
        rz = torch.empty(d, n, b, 2 * h, **opts)  # σ of the r and z gates
        new = torch.empty(d, n, b, h, **opts)  # the candidate n
        ghn = torch.empty(d, n, b, h, **opts)  # W_hn h + b_hn
        w_t, bias = w_hh.transpose(1, 2), b_hh.unsqueeze(1)
        zero = torch.zeros(d, b, h, **opts)
        for t, bs in enumerate(batch_sizes):
            prev = y[:, t - 1, :bs] if t else zero[:, :bs]
            gh = torch.baddbmm(bias, prev, w_t)  # (D, bs, 3H)
            g = gi[:, t, :bs]
            rz_t, n_t = rz[:, t, :bs], new[:, t, :bs]
            torch.add(gh[..., : 2 * h], g[..., : 2 * h], out=rz_t).sigmoid_()
            ghn[:, t, :bs] = gh[..., 2 * h:]
            torch.addcmul(g[..., 2 * h:], gh[..., 2 * h:], rz_t[..., :h], out=n_t).tanh_()
            torch.sub(prev, n_t, out=y[:, t, :bs]).mul_(rz_t[..., h:]).add_(n_t)
        ctx.batch_sizes = batch_sizes
        ctx.save_for_backward(w_hh, y, rz, new, ghn)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy: torch.Tensor):
        w_hh, y, rz, new, ghn = ctx.saved_tensors
        batch_sizes = ctx.batch_sizes
        d, n, b, h = y.shape
        dgh = torch.empty(d, n, b, 3 * h, dtype=y.dtype, device=y.device)  # d(W_hh h + b_hh)
        dan = torch.empty(d, n, b, h, dtype=y.dtype, device=y.device)  # d(pre-tanh of n)
        _zero_inactive(dgh, batch_sizes)
        _zero_inactive(dan, batch_sizes)
        carry = torch.zeros(d, b, h, dtype=y.dtype, device=y.device)  # dL/dh from step t + 1
        for t in range(len(batch_sizes) - 1, -1, -1):
            bs = batch_sizes[t]
            dh = dy[:, t, :bs] + carry[:, :bs]
            r, z = rz[:, t, :bs, :h], rz[:, t, :bs, h:]
            n_t = new[:, t, :bs]
            one_minus_z = torch.rsub(z, 1)
            # d pre-tanh: dh (1 - z) (1 - n²)
            da_n = torch.mul(dh, one_minus_z, out=dan[:, t, :bs]).mul_(n_t.square().neg_().add_(1))
            g = dgh[:, t, :bs]
            torch.mul(da_n, r, out=g[..., 2 * h:])  # d(W_hn h + b_hn)
            # r: da_n (W_hn h + b_hn) r (1 - r);  z: dh (h_prev - n) z (1 - z)
            torch.mul(da_n, ghn[:, t, :bs], out=g[..., :h]).mul_(r).mul_(torch.rsub(r, 1))
            dz = g[..., h: 2 * h]
            if t:
                torch.sub(y[:, t - 1, :bs], n_t, out=dz)
            else:
                torch.neg(n_t, out=dz)
            dz.mul_(dh).mul_(z).mul_(one_minus_z)
            if t:
                carry[:, :bs] = torch.baddbmm(dh * z, g, w_hh)
        # The input gates' gradient: the r and z parts equal the recurrent ones.
        dgi = torch.cat([dgh[..., : 2 * h], dan], dim=-1)
        dw_hh = torch.bmm(dgh[:, 1:].reshape(d, (n - 1) * b, 3 * h).transpose(1, 2),
                          y[:, : n - 1].reshape(d, (n - 1) * b, h))  # h_prev = 0 at t = 0
        db_hh = dgh.sum(dim=(1, 2))
        return dgi, dw_hh, db_hh, None


def _layouts(lengths: torch.Tensor, n: int, dirs: int, device: torch.device):
    """Index maps between (B, n) positions and the aligned, length-sorted time of each direction.

    Returns batch_sizes, ``gather_in`` (dirs · n · B,) and its inverses ``inv_in`` (dirs, B · n),
    ``gather_out`` (B · n · dirs,) and ``inv_out`` (1, dirs · n · B).
    """
    lens = lengths.detach().to("cpu", torch.long)
    batch = lens.shape[0]
    order = torch.argsort(lens, descending=True, stable=True)
    sorted_lens = lens[order]
    t = torch.arange(n)
    batch_sizes = [int(v) for v in (sorted_lens[None, :] > t[:, None]).sum(1) if int(v)]
    steps = t[:, None].expand(n, batch)  # (n, B): aligned step of slot (t, s)
    positions = [steps]
    if dirs == 2:  # reversed within each length; past the length, the (zero) padding as is
        positions.append(torch.where(steps < sorted_lens, sorted_lens - 1 - steps, steps))
    gather_in = torch.stack([order[None, :] * n + p for p in positions]).reshape(dirs, n * batch)
    inv_in = torch.empty_like(gather_in)
    inv_in.scatter_(1, gather_in, torch.arange(n * batch).expand(dirs, -1).contiguous())
    offsets = torch.arange(dirs)[:, None] * (n * batch)
    gather_out = (inv_in + offsets).t().reshape(-1)  # row b·n+p, direction d ← Y[d, inv_in[d, ·]]
    inv_out = (gather_in * dirs + torch.arange(dirs)[:, None]).reshape(1, -1)
    return (batch_sizes, gather_in.reshape(-1).to(device), inv_in.to(device),
            gather_out.to(device), inv_out.to(device))


def _layer_params(rnn: nn.GRU, layer: int, dirs: int, like: torch.Tensor):
    """Stacked (dirs, ...) input weights, input biases, recurrent weights and biases of a layer."""
    suffixes = [""] + (["_reverse"] if dirs == 2 else [])
    w_ih = [getattr(rnn, f"weight_ih_l{layer}{s}") for s in suffixes]
    w_hh = [getattr(rnn, f"weight_hh_l{layer}{s}") for s in suffixes]
    if rnn.bias:
        b_ih = [getattr(rnn, f"bias_ih_l{layer}{s}") for s in suffixes]
        b_hh = [getattr(rnn, f"bias_hh_l{layer}{s}") for s in suffixes]
    else:
        b_ih = b_hh = [like.new_zeros(3 * rnn.hidden_size)] * dirs
    return (torch.stack(w_ih), torch.stack(b_ih), torch.stack(w_hh), torch.stack(b_hh))


def supported(rnn: nn.GRU) -> str | None:
    """Why ``gru`` cannot stand in for this module (``None`` when it can)."""
    if not isinstance(rnn, nn.GRU):
        return f"not an nn.GRU: {type(rnn).__name__}"
    if not rnn.batch_first:
        return "batch_first is False"
    if getattr(rnn, "proj_size", 0):
        return "proj_size is set"
    if rnn.dropout and rnn.training and rnn.num_layers > 1:
        return "dropout between layers in training"
    return None


def gru(rnn: nn.GRU, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B, n, input_size) padded sequences with lengths (B,) in [1, n] → (B, n, dirs · H), as
    ``nn.GRU`` over ``pack_padded_sequence(enforce_sorted=False)`` and back with
    ``pad_packed_sequence(total_length=n)`` (the final states are not returned)."""
    why = supported(rnn)
    if why is not None:
        raise ValueError(f"scan.gru.gru: this GRU is not supported ({why})")
    if x.dim() != 3 or x.shape[-1] != rnn.input_size:
        raise ValueError(f"x: expected (B, n, {rnn.input_size}), got {tuple(x.shape)}")
    batch, n, _ = x.shape
    if lengths.shape != (batch,):
        raise ValueError(f"lengths: expected shape ({batch},), got {tuple(lengths.shape)}")
    if batch == 0:
        return x.new_zeros(0, n, rnn.hidden_size * (2 if rnn.bidirectional else 1))
    lens = lengths.detach().cpu()
    if int(lens.min()) < 1 or int(lens.max()) > n:
        raise ValueError(f"lengths must lie in [1, {n}]; got min {int(lens.min())}, max {int(lens.max())}")
    dtype = rnn.weight_hh_l0.dtype
    if x.dtype != dtype:
        raise ValueError(f"x is {x.dtype} but the GRU's parameters are {dtype}")
    dirs, hidden = (2 if rnn.bidirectional else 1), rnn.hidden_size
    batch_sizes, gather_in, inv_in, gather_out, inv_out = _layouts(lens, n, dirs, x.device)
    out = x
    for layer in range(rnn.num_layers):
        w_ih, b_ih, w_hh, b_hh = _layer_params(rnn, layer, dirs, x)
        width = out.shape[-1]
        rows = _RowGather.apply(out.reshape(batch * n, width), gather_in, inv_in)
        # All steps' and both directions' input projections in one product: (D, n·B, 3H).
        gi = torch.baddbmm(b_ih.unsqueeze(1), rows.view(dirs, n * batch, width), w_ih.transpose(1, 2))
        y = _Recurrence.apply(gi.view(dirs, n, batch, 3 * hidden), w_hh, b_hh, batch_sizes)
        out = _RowGather.apply(y.reshape(dirs * n * batch, hidden), gather_out, inv_out)
        out = out.view(batch, n, dirs * hidden)
    return out
