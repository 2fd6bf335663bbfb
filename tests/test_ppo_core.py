"""PPO arithmetic (chatstack/rlhf/ppo_core.py) against hand computations and independent references."""

import math

import torch

from chatstack.rlhf import ppo_core as pc


def _gae_reference(rewards, values, gamma, lam):
    """Textbook GAE on one un-padded episode, in plain Python floats."""
    T = len(rewards)
    adv = [0.0] * T
    last = 0.0
    for t in reversed(range(T)):
        next_v = values[t + 1] if t + 1 < T else 0.0
        delta = rewards[t] + gamma * next_v - values[t]
        last = delta + gamma * lam * last
        adv[t] = last
    return adv, [a + v for a, v in zip(adv, values)]


def test_gae_matches_reference_on_ragged_rows():
    g = torch.Generator().manual_seed(0)
    lengths = [5, 3, 1, 0]
    R = 5
    rewards = torch.randn(4, R, generator=g, dtype=torch.float64)
    values = torch.randn(4, R, generator=g, dtype=torch.float64)
    mask = torch.zeros(4, R)
    for b, L in enumerate(lengths):
        mask[b, :L] = 1
    # garbage in the padding must not leak into real tokens
    rewards = torch.where(mask.bool(), rewards, torch.full_like(rewards, 100.0))
    values = torch.where(mask.bool(), values, torch.full_like(values, -50.0))
    for gamma, lam in [(1.0, 0.95), (0.9, 0.5), (1.0, 1.0)]:
        adv, ret = pc.gae(rewards, values, mask, gamma, lam)
        for b, L in enumerate(lengths):
            ra, rr = _gae_reference(rewards[b, :L].tolist(), values[b, :L].tolist(), gamma, lam)
            assert torch.allclose(adv[b, :L], torch.tensor(ra, dtype=torch.float64))
            assert torch.allclose(ret[b, :L], torch.tensor(rr, dtype=torch.float64))
            assert (adv[b, L:] == 0).all()


def test_gae_hand_computed():
    # 3 tokens, gamma=1, lam=1: advantages = sum of future rewards - V_t
    r = torch.tensor([[0.0, -0.1, 1.0]])
    v = torch.tensor([[0.5, 0.2, 0.3]])
    adv, ret = pc.gae(r, v, torch.ones(1, 3), gamma=1.0, lam=1.0)
    assert torch.allclose(adv, torch.tensor([[0.4, 0.7, 0.7]]))
    assert torch.allclose(ret, torch.tensor([[0.9, 0.9, 1.0]]))


def test_token_rewards_puts_score_on_last_token():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, 0.0]])
    ref = torch.tensor([[-1.5, -2.0, -2.0], [-0.5, -1.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    score = torch.tensor([2.0, -1.0])
    rewards, kl = pc.token_rewards(score, logp, ref, mask, kl_coef=0.1)
    assert torch.allclose(kl, torch.tensor([[0.5, 0.0, -1.0], [-0.5, 0.0, 0.0]]))
    expect = torch.tensor([[-0.05, 0.0, 0.1 + 2.0], [0.05, -1.0, 0.0]])
    assert torch.allclose(rewards, expect)


def test_kl_estimators_are_unbiased_and_k3_nonnegative():
    g = torch.Generator().manual_seed(1)
    p = torch.softmax(torch.randn(6, generator=g), 0)
    q = torch.softmax(torch.randn(6, generator=g), 0)
    true_kl = (p * (p / q).log()).sum().item()
    x = torch.multinomial(p, 200_000, replacement=True, generator=g)
    lp, lq = p.log()[x], q.log()[x]
    k1 = pc.kl_estimate(lp, lq, "k1")
    k3 = pc.kl_estimate(lp, lq, "k3")
    assert (k3 >= 0).all()
    assert abs(k1.mean().item() - true_kl) < 0.02
    assert abs(k3.mean().item() - true_kl) < 0.02
    assert k3.var() < k1.var() or true_kl > 1.0  # k3's selling point when p ~ q


def test_padding_with_extreme_logprobs_gives_finite_losses_and_gradients():
    """Under a sharp policy a padding position's log-prob can sit ~100 nats from the reference's: e^100 is inf
    in float32, and inf * 0 (the mask) is NaN. The k3 KL and the PPO ratio must ignore padding entirely."""
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    logp = torch.tensor([[-0.1, -0.2, -150.0, -3.0]], requires_grad=True)
    ref = torch.tensor([[-0.3, -0.1, -20.0, -3.0]])
    old = torch.tensor([[-0.1, -0.2, 0.0, 0.0]])
    kl = pc.reduce_loss(pc.kl_estimate(logp, ref, "k3", mask), mask, "token")
    pg, _ = pc.policy_loss(logp, old, torch.ones(1, 4) * mask, mask)
    (kl + pg).backward()
    assert torch.isfinite(kl) and torch.isfinite(pg) and torch.isfinite(logp.grad).all()
    assert logp.grad[0, 2:].abs().max() == 0
    expect = pc.kl_estimate(logp[:, :2], ref[:, :2], "k3").mean()
    assert torch.allclose(kl, expect)
    rewards, k = pc.token_rewards(torch.tensor([1.0]), logp.detach(), ref, mask, 0.1, "k3")
    assert torch.isfinite(rewards).all() and (k[0, 2:] == 0).all()


def test_whiten():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 99.0, 99.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    w = pc.whiten(x, mask)
    vals = w[mask.bool()]
    assert abs(vals.mean().item()) < 1e-6
    assert abs(vals.std().item() - 1.0) < 1e-5  # torch.std is unbiased, as masked_var
    assert (w[~mask.bool()] == 0).all()
    w2 = pc.whiten(x, mask, shift_mean=False)
    assert abs(w2[mask.bool()].mean().item() - 2.5) < 1e-5


def test_policy_loss_clipping_by_hand():
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    old = torch.zeros(1, 4)
    # ratios 1.5, 1.5, 0.5, 0.5
    logp = torch.log(torch.tensor([[1.5, 1.5, 0.5, 0.5]]))
    mask = torch.ones(1, 4)
    loss, stats = pc.policy_loss(logp, old, adv, mask, clip=0.2)
    # per token: max(-A r, -A clip(r)) = [-1.2, 1.5, -0.5, 0.8]
    assert math.isclose(loss.item(), (-1.2 + 1.5 - 0.5 + 0.8) / 4, rel_tol=1e-6)
    assert math.isclose(stats["clipfrac"], 0.5)  # tokens 0 and 3 are clipped
    # gradient flows only through unclipped tokens
    logp.requires_grad_(True)
    loss, _ = pc.policy_loss(logp, old, adv, mask, clip=0.2)
    loss.backward()
    assert logp.grad[0, 0] == 0 and logp.grad[0, 3] == 0
    assert logp.grad[0, 1] != 0 and logp.grad[0, 2] != 0


def test_value_loss_clipping_by_hand():
    old = torch.tensor([[0.0, 0.0]])
    v = torch.tensor([[1.0, 0.1]])
    ret = torch.tensor([[2.0, 0.0]])
    loss, _ = pc.value_loss(v, old, ret, torch.ones(1, 2), clip=0.2)
    # token 0: max((1-2)^2, (0.2-2)^2) = 3.24; token 1: max(0.01, 0.01) = 0.01
    assert math.isclose(loss.item(), 0.5 * (3.24 + 0.01) / 2, rel_tol=1e-6)


def test_entropy_and_logprobs():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [10.0, -10.0, -10.0, -10.0]]])
    ent = pc.entropy_from_logits(logits)
    assert math.isclose(ent[0, 0].item(), math.log(4), rel_tol=1e-6)
    assert ent[0, 1].item() < 1e-6
    lp = pc.logprobs_of(logits, torch.tensor([[2, 0]]))
    assert math.isclose(lp[0, 0].item(), -math.log(4), rel_tol=1e-6)


def test_adaptive_kl_controller():
    c = pc.make_kl_controller(0.1, target_kl=6.0, horizon=10000)
    c.update(current_kl=12.0, n_steps=1000)  # error clipped to +0.2
    assert math.isclose(c.value, 0.1 * (1 + 0.2 * 0.1))
    c.update(current_kl=3.0, n_steps=1000)  # error -0.5 -> clipped -0.2
    assert math.isclose(c.value, 0.1 * 1.02 * 0.98)
    f = pc.make_kl_controller(0.1, target_kl=None)
    f.update(100.0, 1000)
    assert f.value == 0.1
