"""GRPO math against numbers worked out by hand (the arithmetic is in the comments)."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.grpo import aggregate, group_advantages, kl_k3, loss_norms, masked_mean, policy_loss

LN2, LN3 = math.log(2), math.log(3)


def test_advantages_scaled_by_population_std_interleaved_groups():
    # group 3: rewards 1,0,0,1 -> mean .5, pop std .5 -> +1,-1,-1,+1
    # group 7: rewards 2,4,6 -> mean 4, var (4+0+4)/3 = 8/3 -> 2/sqrt(8/3) = sqrt(1.5) = 1.2247449
    rewards = torch.tensor([1.0, 2.0, 0.0, 4.0, 0.0, 6.0, 1.0])
    ids = torch.tensor([3, 7, 3, 7, 3, 7, 3])
    adv = group_advantages(rewards, ids)
    expected = [1.0, -1.2247449, -1.0, 0.0, -1.0, 1.2247449, 1.0]
    assert adv.tolist() == pytest.approx(expected, abs=1e-5)


def test_advantages_unscaled_is_dr_grpo_centring():
    rewards = torch.tensor([1.0, 2.0, 0.0, 4.0, 0.0, 6.0, 1.0])
    ids = torch.tensor([3, 7, 3, 7, 3, 7, 3])
    adv = group_advantages(rewards, ids, scale=False)
    assert adv.tolist() == pytest.approx([0.5, -2.0, -0.5, 0.0, -0.5, 2.0, 0.5], abs=1e-6)


@pytest.mark.parametrize("scale", [True, False])
def test_all_equal_groups_are_exactly_zero(scale):
    # 0.1 * 3 / 3 is not exactly 0.1 in floating point; the result must still be exactly 0. A lone sample too.
    rewards = torch.tensor([0.1, 0.1, 0.1, 1.0, 1.0, 5.0, 1.0, 0.0])
    ids = torch.tensor([0, 0, 0, 1, 1, 2, 4, 4])
    adv = group_advantages(rewards, ids, scale=scale)
    assert not torch.isnan(adv).any()
    assert adv[:6].tolist() == [0.0] * 6
    assert adv[6:].tolist() == pytest.approx([1.0, -1.0] if scale else [0.5, -0.5], abs=1e-5)


def _one_token_each(ratios, requires_grad=True):
    logp = torch.tensor([[math.log(r)] for r in ratios], requires_grad=requires_grad)
    return logp, torch.zeros_like(logp), torch.ones_like(logp)


def test_clipping_both_sides_and_gradient_only_through_unclipped():
    # clip .2; per token max(-A r, -A clip(r, .8, 1.2)):
    # A=+1 r=1.5 -> max(-1.5, -1.2) = -1.2 clipped | A=+1 r=.5 -> max(-.5, -.8) = -.5 unclipped
    # A=-1 r=1.5 -> max(1.5, 1.2) = 1.5 unclipped   | A=-1 r=.5 -> max(.5, .8) = .8 clipped
    # token mean = (-1.2 - .5 + 1.5 + .8) / 4 = .15
    logp, old, mask = _one_token_each([1.5, 0.5, 1.5, 0.5])
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    loss, m = policy_loss(logp, old, adv, mask, clip_eps=0.2)
    assert loss.item() == pytest.approx(0.15, abs=1e-6)
    assert m["clip_frac"] == pytest.approx(0.5)
    assert m["ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    assert m["ratio_max"] == pytest.approx(1.5, abs=1e-6)
    # approx_kl = mean(r - 1 - ln r): (.5 - ln1.5) = .0945349, (-.5 + ln2) = .1931472 -> mean .1438410
    assert m["approx_kl"] == pytest.approx(0.1438410, abs=1e-6)
    loss.backward()
    # d(-A r)/d logp = -A r, / 4 tokens: token 2 -> -.5/4 = -.125, token 3 -> 1.5/4 = .375; clipped tokens: 0
    assert logp.grad.flatten().tolist() == pytest.approx([0.0, -0.125, 0.375, 0.0], abs=1e-6)


def test_clip_higher_widens_only_the_upper_side():
    # A=+1 r=1.25: clip .2 -> max(-1.25, -1.2) = -1.2 (clipped); clip_eps_high .28 -> clamp keeps 1.25 -> -1.25
    logp, old, mask = _one_token_each([1.25], requires_grad=False)
    adv = torch.tensor([1.0])
    assert policy_loss(logp, old, adv, mask, 0.2)[0].item() == pytest.approx(-1.2, abs=1e-6)
    assert policy_loss(logp, old, adv, mask, 0.2, clip_eps_high=0.28)[0].item() == pytest.approx(-1.25, abs=1e-6)
    # A=-1 r=.7: the lower side is still .2 with clip-higher -> max(.7, .8) = .8
    logp, old, mask = _one_token_each([0.7], requires_grad=False)
    assert policy_loss(logp, old, -adv, mask, 0.2, clip_eps_high=0.28)[0].item() == pytest.approx(0.8, abs=1e-6)


def _masked_batch():
    # ratio 1 everywhere on the mask, so each token loss is -A: row 0 -> -2 (2 tokens), row 1 -> +1 (1 token).
    # Masked positions hold garbage (-inf behaviour logprob, huge current logprob) that must not leak in.
    logp = torch.tensor([[0.0, 0.0, 100.0], [0.0, 50.0, 7.0]], requires_grad=True)
    old = torch.tensor([[0.0, 0.0, -math.inf], [0.0, -math.inf, 3.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    return logp, old, torch.tensor([2.0, -1.0]), mask


@pytest.mark.parametrize(
    "agg,norm,expected",
    [
        ("token_mean", {}, -1.0),  # (-2 - 2 + 1) / 3
        ("seq_mean_token_mean", {}, -0.5),  # (mean(-2,-2) + mean(1)) / 2
        ("token_sum_norm", {"norm_tokens": 8.0}, -0.375),  # (-3) / (2 seqs x 4 max_new_tokens)
    ],
)
def test_masks_and_aggregations(agg, norm, expected):
    logp, old, adv, mask = _masked_batch()
    loss, m = policy_loss(logp, old, adv, mask, 0.2, agg=agg, **norm)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert m["num_tokens"] == 3.0 and m["ratio_max"] == 1.0 and m["clip_frac"] == 0.0
    loss.backward()
    assert torch.isfinite(logp.grad).all()
    assert logp.grad[0, 2] == 0 and logp.grad[1, 1] == 0 and logp.grad[1, 2] == 0


def test_token_sum_norm_needs_a_normaliser_and_unknown_agg_fails():
    logp, old, adv, mask = _masked_batch()
    with pytest.raises(ValueError, match="norm_tokens"):
        policy_loss(logp, old, adv, mask, 0.2, agg="token_sum_norm")
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        policy_loss(logp, old, adv, mask, 0.2, agg="mean")


def test_kl_k3_values():
    # d = ref - logp: d = ln2 -> 2 - ln2 - 1 = .3068528; d = -ln2 -> .5 + ln2 - 1 = .1931472; d = 0 -> 0
    logp = torch.zeros(3)
    ref = torch.tensor([LN2, -LN2, 0.0])
    assert kl_k3(logp, ref).tolist() == pytest.approx([0.3068528, 0.1931472, 0.0], abs=1e-6)


def test_kl_penalty_in_policy_loss():
    # A = 0 removes the PG term; k3 of the two tokens: .3068528 + .1931472 = .5 exactly -> mean .25; beta .1 -> .025
    logp = torch.zeros(1, 2, requires_grad=True)
    ref = torch.tensor([[LN2, -LN2]])
    loss, m = policy_loss(logp, logp.detach(), torch.zeros(1), torch.ones(1, 2), 0.2, ref_logp=ref, beta=0.1)
    assert loss.item() == pytest.approx(0.025, abs=1e-7)
    assert m["kl_ref"] == pytest.approx(0.25, abs=1e-6)
    loss.backward()
    # d k3 / d logp = 1 - exp(d): 1 - 2 = -1 and 1 - .5 = .5; x beta .1 / 2 tokens -> -.05, .025
    assert logp.grad.flatten().tolist() == pytest.approx([-0.05, 0.025], abs=1e-6)


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean", "token_sum_norm"])
def test_micro_batch_losses_sum_to_the_full_batch(agg):
    g = torch.Generator().manual_seed(0)
    n, t = 6, 5
    logp = (torch.randn(n, t, generator=g) * 0.3 - 1).requires_grad_()
    old = logp.detach() + torch.randn(n, t, generator=g) * 0.3
    adv = torch.randn(n, generator=g)
    lengths = [5, 1, 3, 4, 2, 5]
    mask = (torch.arange(t)[None] < torch.tensor(lengths)[:, None]).long()
    norms = loss_norms(lengths, agg, max_new_tokens=t)
    full, _ = policy_loss(logp, old, adv, mask, 0.2, agg=agg, **norms)
    (full_grad,) = torch.autograd.grad(full, logp)
    parts = [
        policy_loss(logp[s], old[s], adv[s], mask[s], 0.2, agg=agg, **norms)[0] for s in (slice(0, 2), slice(2, 6))
    ]
    total = sum(parts)
    (micro_grad,) = torch.autograd.grad(total, logp)
    assert total.item() == pytest.approx(full.item(), rel=1e-6)
    assert torch.allclose(micro_grad, full_grad, atol=1e-7)
    # without the full-batch normaliser the micro losses would be per-part means, which do not add up
    if agg == "token_mean":
        no_norm = sum(policy_loss(logp[s], old[s], adv[s], mask[s], 0.2)[0] for s in (slice(0, 2), slice(2, 6)))
        assert no_norm.item() != pytest.approx(full.item(), rel=1e-3)


def test_loss_norms():
    assert loss_norms([3, 5, 0], "token_mean") == {"norm_tokens": 8.0}
    assert loss_norms([3, 5, 0], "seq_mean_token_mean") == {"norm_seqs": 3.0}
    assert loss_norms([3, 5, 0], "token_sum_norm", max_new_tokens=10) == {"norm_tokens": 30.0}
    with pytest.raises(ValueError):
        loss_norms([3], "token_sum_norm")


def test_masked_mean_and_aggregate_on_empty_mask_are_zero():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert masked_mean(x, torch.tensor([[1, 0], [0, 1]])).item() == 2.5
    assert masked_mean(x, torch.tensor([[1, 1], [0, 0]]), dim=-1).tolist() == [1.5, 0.0]
    assert masked_mean(x, torch.zeros(2, 2)).item() == 0.0
    assert aggregate(x, torch.zeros(2, 2), "token_mean").item() == 0.0


def test_groups_with_spread_marks_groups_that_teach():
    from trainer.grpo import groups_with_spread

    assert groups_with_spread([7, 7, 3, 3, 9], [1.0, 0.0, 0.5, 0.5, 1.0]) == [True, True, False, False, False]
    assert groups_with_spread([], []) == []
