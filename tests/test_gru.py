"""scan.gru: exactly nn.GRU over packed sequences (outputs and every gradient), and the text
encoder's ``model.gru_impl`` switch."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from scan.config import ModelConfig
from scan.gru import gru, supported
from scan.model import GRUTextEncoder, SCANModel


def _packed(rnn: nn.GRU, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
    out, _ = rnn(packed)
    return pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])[0]


def _max_diffs(rnn: nn.GRU, x: torch.Tensor, lengths: torch.Tensor, seed: int = 0):
    """Max |fused − packed| of the output and of the gradients (input and each parameter)."""
    x = x.detach().requires_grad_(True)
    ref, out = _packed(rnn, x, lengths), gru(rnn, x, lengths)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed), dtype=ref.dtype)
    inputs = [x, *rnn.parameters()]
    g_ref = torch.autograd.grad(ref, inputs, grad)
    g_out = torch.autograd.grad(out, inputs, grad)
    return ((out - ref).abs().max().item(),
            max((a - b).abs().max().item() for a, b in zip(g_out, g_ref)), out)


LENGTHS = {
    "mixed, with 1": [3, 1, 7, 5, 5, 2],
    "all equal": [7, 7, 7, 7],
    "max < n": [2, 4, 1, 3, 4],  # every caption shorter than the padded width
    "one sequence": [5],
}


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("case", sorted(LENGTHS))
def test_float64_equals_packed_nn_gru(bidirectional, num_layers, case):
    torch.manual_seed(0)
    lengths = torch.tensor(LENGTHS[case])
    rnn = nn.GRU(5, 4, num_layers, batch_first=True, bidirectional=bidirectional).double()
    x = torch.randn(len(lengths), 7, 5, dtype=torch.float64)
    out_diff, grad_diff, out = _max_diffs(rnn, x, lengths)
    assert out_diff < 1e-10 and grad_diff < 1e-10, (out_diff, grad_diff)
    for b, n in enumerate(lengths.tolist()):  # padded positions are exactly zero
        assert torch.equal(out[b, n:], torch.zeros_like(out[b, n:]))


def test_random_lengths_float64():
    g = torch.Generator().manual_seed(1)
    for trial in range(4):
        batch, n = 9, 11
        lengths = torch.randint(1, n + 1, (batch,), generator=g)
        rnn = nn.GRU(6, 5, 2, batch_first=True, bidirectional=True).double()
        x = torch.randn(batch, n, 6, generator=g, dtype=torch.float64)
        out_diff, grad_diff, _ = _max_diffs(rnn, x, lengths, seed=trial)
        assert out_diff < 1e-10 and grad_diff < 1e-10, (trial, out_diff, grad_diff)


def test_no_bias_and_lengths_on_another_dtype():
    torch.manual_seed(2)
    rnn = nn.GRU(3, 4, batch_first=True, bidirectional=True, bias=False).double()
    x = torch.randn(3, 5, 3, dtype=torch.float64)
    out_diff, grad_diff, _ = _max_diffs(rnn, x, torch.tensor([5, 2, 4], dtype=torch.int32))
    assert out_diff < 1e-10 and grad_diff < 1e-10


def test_gradcheck_tiny():
    torch.manual_seed(3)
    rnn = nn.GRU(3, 2, 2, batch_first=True, bidirectional=True).double()
    names = [n for n, _ in rnn.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in rnn.parameters()]
    x = torch.randn(3, 4, 3, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([2, 4, 1])

    def f(x, *ps):
        module = nn.GRU(3, 2, 2, batch_first=True, bidirectional=True).double()
        for name, p in zip(names, ps):  # the module reads its parameters as plain tensors
            delattr(module, name)
            setattr(module, name, p)
        return gru(module, x, lengths)

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-8)


def test_float32_close_to_packed():
    torch.manual_seed(4)
    lengths = torch.tensor([12, 3, 20, 1, 17, 20, 8])
    rnn = nn.GRU(30, 24, batch_first=True, bidirectional=True)
    x = torch.randn(7, 20, 30)
    out_diff, grad_diff, _ = _max_diffs(rnn, x, lengths)
    assert out_diff < 1e-5 and grad_diff < 1e-4, (out_diff, grad_diff)


def test_bfloat16_runs_close():
    torch.manual_seed(5)
    lengths = torch.tensor([6, 2, 4])
    rnn = nn.GRU(8, 8, batch_first=True, bidirectional=True)
    x = torch.randn(3, 6, 8)
    ref = _packed(rnn, x, lengths)
    out = gru(rnn.bfloat16(), x.bfloat16().requires_grad_(True), lengths)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    torch.testing.assert_close(out.float(), ref, atol=5e-2, rtol=0)


def test_rejects_bad_input():
    rnn = nn.GRU(3, 2, batch_first=True)
    with pytest.raises(ValueError, match=r"lengths must lie in \[1, 4\]"):
        gru(rnn, torch.zeros(2, 4, 3), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match=r"lengths must lie in \[1, 4\]"):
        gru(rnn, torch.zeros(2, 4, 3), torch.tensor([5, 2]))
    with pytest.raises(ValueError, match=r"x: expected \(B, n, 3\)"):
        gru(rnn, torch.zeros(2, 4, 5), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="parameters are torch.float32"):
        gru(rnn, torch.zeros(2, 4, 3, dtype=torch.float64), torch.tensor([1, 2]))
    assert supported(nn.GRU(3, 2)) == "batch_first is False"
    assert supported(nn.GRU(3, 2, 2, batch_first=True, dropout=0.5).train()) is not None
    assert supported(nn.GRU(3, 2, 2, batch_first=True, dropout=0.5).eval()) is None


# ---------------------------------------------------------------- the text encoder's switch


def _encoders(**kwargs):
    torch.manual_seed(6)
    fused = GRUTextEncoder(40, 12, 10, gru_impl="fused", **kwargs).double()
    plain = GRUTextEncoder(40, 12, 10, gru_impl="torch", **kwargs).double()
    plain.load_state_dict(fused.state_dict())
    return fused, plain


@pytest.mark.parametrize("bidirectional,num_layers", [(True, 1), (False, 1), (True, 2)])
def test_encoder_fused_equals_torch(bidirectional, num_layers):
    fused, plain = _encoders(bidirectional=bidirectional, num_layers=num_layers)
    assert list(fused.state_dict()) == list(plain.state_dict())
    cap_lens = torch.tensor([3, 9, 1, 5, 9])
    tokens = torch.randint(1, 40, (5, 9))
    outs, grads = [], []
    for enc in (fused, plain):
        out = enc(tokens, cap_lens)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        outs.append(out.detach())
        grads.append({n: p.grad for n, p in enc.named_parameters()})
    assert (outs[0] - outs[1]).abs().max() < 1e-10
    for name in grads[1]:
        assert (grads[0][name] - grads[1][name]).abs().max() < 1e-10, name
    for b, n in enumerate(cap_lens.tolist()):
        assert torch.equal(outs[0][b, n:], torch.zeros_like(outs[0][b, n:]))


def test_encoder_auto_uses_the_fused_path_on_cpu(monkeypatch):
    import scan.model

    calls = []
    real = scan.model.fused_gru
    monkeypatch.setattr(scan.model, "fused_gru", lambda *a: calls.append(1) or real(*a))
    enc = GRUTextEncoder(20, 8, 6)  # gru_impl defaults to auto
    enc(torch.randint(0, 20, (2, 5)), torch.tensor([5, 2]))
    assert calls == [1]
    GRUTextEncoder(20, 8, 6, gru_impl="torch")(torch.randint(0, 20, (2, 5)), torch.tensor([5, 2]))
    assert calls == [1]


def test_config_switch_reaches_the_encoder():
    cfg = ModelConfig(img_dim=8, embed_size=6, word_dim=5, gru_impl="torch")
    assert SCANModel(cfg, vocab_size=20).txt_enc.gru_impl == "torch"
    assert ModelConfig().gru_impl == "auto"
    with pytest.raises(ValueError, match="model.gru_impl"):
        GRUTextEncoder(20, 8, 6, gru_impl="cudnn")


def test_config_file_rejects_unknown_gru_impl():
    from scan.config import load_experiment
    from scan.configfile import ConfigError

    assert load_experiment(None, ["model.gru_impl=fused"]).model.gru_impl == "fused"
    with pytest.raises(ConfigError, match="gru_impl"):
        load_experiment(None, ["model.gru_impl=cudnn"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scan.gru against cuDNN)")
def test_fused_on_cuda_equals_cudnn():
    torch.manual_seed(7)
    lengths = torch.tensor([12, 3, 20, 1, 17, 20, 8], device="cuda")
    rnn = nn.GRU(30, 24, 2, batch_first=True, bidirectional=True).cuda()
    x = torch.randn(7, 20, 30, device="cuda", requires_grad=True)
    ref, out = _packed(rnn, x, lengths), gru(rnn, x, lengths)
    grad = torch.randn_like(ref)
    g_ref = torch.autograd.grad(ref, [x, *rnn.parameters()], grad)
    g_out = torch.autograd.grad(out, [x, *rnn.parameters()], grad)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    for a, b in zip(g_out, g_ref):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)
    enc = GRUTextEncoder(40, 12, 10).cuda()  # auto: cuDNN on CUDA
    enc(torch.randint(0, 40, (3, 6), device="cuda"), torch.tensor([6, 2, 4], device="cuda"))
