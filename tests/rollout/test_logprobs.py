"""trainer.logprobs: chunked log-probabilities and entropy from hidden states, against plain log_softmax."""

import math

import pytest
import torch

from trainer.logprobs import chunk_rows, linear_logprobs

LN3 = math.log(3.0)


def reference(hidden, weight, targets):
    logits = (hidden @ weight.T).double()
    logp = torch.log_softmax(logits, -1)
    picked = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return picked, -(logp.exp() * logp).sum(-1)


def test_hand_computed_values():
    # identity weight: the hidden rows are the logits. Uniform over 4 -> ln4; logits (0, ln3, -9, -9) ~ p (1/4, 3/4)
    weight = torch.eye(4)
    hidden = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, LN3, -60.0, -60.0]])
    logp, ent = linear_logprobs(hidden, weight, torch.tensor([2, 1]))
    assert logp.tolist() == pytest.approx([-math.log(4), math.log(0.75)], abs=1e-6)
    assert ent.tolist() == pytest.approx([math.log(4), 0.25 * math.log(4) + 0.75 * math.log(4 / 3)], abs=1e-6)


@pytest.mark.parametrize("rows", [1, 5, 64])
def test_values_and_gradients_match_log_softmax_for_any_chunking(rows):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 7, 16, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (3, 7), generator=g)
    coef = torch.randn(3, 7, generator=g, dtype=torch.float64)
    logp, ent = linear_logprobs(hidden, weight, targets, dtype=torch.float64, rows=rows)
    ref_logp, ref_ent = reference(hidden, weight, targets)
    assert logp.shape == ent.shape == (3, 7)
    assert torch.allclose(logp.double(), ref_logp, atol=1e-5) and torch.allclose(ent.double(), ref_ent, atol=1e-5)
    (logp * coef).sum().backward()
    got = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    (ref_logp * coef).sum().backward()
    assert torch.allclose(got[0], hidden.grad, atol=1e-5) and torch.allclose(got[1], weight.grad, atol=1e-5)
    assert not ent.requires_grad  # a metric, never part of the loss graph


def test_gradcheck_in_float64():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(9, 4, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 9, (6,), generator=g)

    def fn(h, w):
        return linear_logprobs(h, w, targets, dtype=torch.float64, rows=4)[0]

    assert torch.autograd.gradcheck(fn, (hidden, weight))


def test_low_precision_compute_keeps_input_dtypes_and_stays_close():
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(10, 32, generator=g, requires_grad=True)
    weight = torch.randn(100, 32, generator=g, requires_grad=True)
    targets = torch.randint(0, 100, (10,), generator=g)
    logp, _ = linear_logprobs(hidden, weight, targets, dtype=torch.bfloat16)
    assert logp.dtype == torch.float32
    assert torch.allclose(logp.double(), reference(hidden, weight, targets)[0], atol=0.5)
    logp.sum().backward()
    assert hidden.grad.dtype == weight.grad.dtype == torch.float32


def test_chunk_rows_bounds_one_chunk_of_fp32_logits():
    assert chunk_rows(49152) * 49152 <= 1 << 28 < (chunk_rows(49152) + 1) * 49152
    assert chunk_rows(10**9) == 1


@pytest.mark.gpu
def test_cuda_compiled_chunks_match_log_softmax():
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(300, 64, generator=g).cuda().requires_grad_()
    weight = (0.1 * torch.randn(5000, 64, generator=g)).cuda().requires_grad_()
    targets = torch.randint(0, 5000, (300,), generator=g).cuda()
    logp, ent = linear_logprobs(hidden, weight, targets, dtype=torch.bfloat16, rows=128)
    ref_logp, ref_ent = reference(hidden.detach().bfloat16().float(), weight.detach().bfloat16().float(), targets)
    # bf16 logits carry ~3 significant digits: compare to that, and the gradients by relative norm
    assert torch.allclose(logp.double(), ref_logp, atol=5e-2) and torch.allclose(ent.double(), ref_ent, atol=5e-2)
    logp.sum().backward()
    h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    reference(h, w, targets)[0].sum().backward()
    for got, want in ((hidden.grad, h.grad), (weight.grad, w.grad)):
        assert ((got - want).norm() / want.norm()).item() < 2e-2
