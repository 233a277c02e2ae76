"""The learner's compute-dtype copy (trainer/precision.py): a bf16 forward over fp32 master weights, on the CPU."""

from __future__ import annotations

import torch

from tests.trainer.test_checkpoint import tiny_llama
from tests.trainer.test_distributed import synthetic_groups


def bf16_update(copy_weights: bool, trajectories, micro_batch: int = 2):
    """One Learner.update in bf16 compute (SGD lr 1: params move by the clipped gradient); (weights, delta, stats)."""
    from trainer.config import Config
    from trainer.dist import Dist
    from trainer.learner import Learner
    from trainer.precision import ComputeWeights

    cfg = Config.model_validate(
        {"train": {"micro_batch_size": micro_batch, "grad_clip": 1e6}, "rollout": {"max_new_tokens": 8}}
    )
    model = tiny_llama(seed=0)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    weights = ComputeWeights(model, torch.bfloat16, copy_weights)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    stats = Learner.for_config(cfg, weights, opt, sched, Dist(), torch.bfloat16, pad_id=0).update(trajectories)
    delta = {k: v.detach() - before[k] for k, v in model.state_dict().items()}
    return weights, delta, stats


def test_the_copy_holds_bf16_parameters_and_shares_the_buffers():
    from trainer.precision import ComputeWeights

    model = tiny_llama(seed=0)
    weights = ComputeWeights(model, torch.bfloat16, copy_weights=True)
    copy = weights.forward_model
    assert weights.copied and copy is not model
    assert {p.dtype for p in copy.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # the master is untouched
    for (name, b), (_, cb) in zip(model.named_buffers(), copy.named_buffers(), strict=True):
        assert cb is b and b.dtype == torch.float32, name  # RoPE's inv_freq keeps its precision
    assert copy.get_output_embeddings().weight is copy.get_input_embeddings().weight  # still tied
    assert len(list(copy.parameters())) == len(list(model.parameters()))


def test_an_update_steps_the_master_and_refreshes_the_copy():
    weights, delta, _ = bf16_update(True, synthetic_groups(num_groups=3, n=3, vocab=256))
    master, copy = weights.master, weights.forward_model
    assert min(d.abs().max().item() for d in delta.values()) > 0  # every tensor moved: gradients were folded in
    for (name, p), c in zip(master.named_parameters(), copy.parameters(), strict=True):
        assert p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32, name
        assert c.grad is None, name  # folded into the master and freed
        assert torch.equal(c, p.detach().to(torch.bfloat16)), name  # refreshed after the step


def test_the_copy_gives_autocasts_gradient_within_bf16_rounding():
    groups = synthetic_groups(num_groups=3, n=3, vocab=256)
    _, with_copy, stats = bf16_update(True, groups)
    _, autocast, ref_stats = bf16_update(False, groups)
    _, one_chunk, _ = bf16_update(True, groups, micro_batch=len(groups))
    for k in autocast:
        scale = autocast[k].norm().item()
        assert (with_copy[k] - autocast[k]).norm().item() < 0.05 * scale, k
        assert (with_copy[k] - one_chunk[k]).norm().item() < 0.05 * scale, k  # micro-batches accumulate in fp32
    assert abs(stats["loss"] - ref_stats["loss"]) < 0.02 * abs(ref_stats["loss"]) + 1e-3


def test_restore_refreshes_the_copy(scratch_dir, model_path):
    """build() on the real SmolLM2 in bf16 compute (CPU): a restored checkpoint reaches the forward's copy."""
    from tests.trainer.test_train_integration import make_workdir
    from trainer.config import load_config
    from trainer.dist import Dist
    from trainer.loop import build, restore, save, shutdown

    root = make_workdir(scratch_dir("precision"))
    cfg = load_config(root / "config.yaml", [f"model.path={model_path}", "model.dtype=bfloat16"])
    first = build(cfg, Dist())
    assert first.learner.weights.copied
    with torch.no_grad():
        for p in first.model.parameters():
            p.add_(0.01)  # a checkpoint that differs from the weights a fresh build starts with
    save(first)
    saved = {k: v.detach().clone() for k, v in first.model.state_dict().items()}
    shutdown(first)

    second = build(cfg, Dist())
    copy = second.learner.weights.forward_model
    stale = next(copy.parameters()).detach().clone()
    assert restore(second)
    for (name, p), c in zip(second.model.named_parameters(), copy.parameters(), strict=True):
        assert torch.equal(p.detach(), saved[name]), name
        assert torch.equal(c.detach(), p.detach().to(torch.bfloat16)), name
    assert not torch.equal(next(copy.parameters()).detach(), stale)
    shutdown(second)
