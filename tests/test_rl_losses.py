import math

import pytest
import torch
import torch.nn.functional as F

from vlafast.rl.losses import PPOConfig, explained_variance, gae, group_advantages, ppo_loss


def _gae_loop(r, v, d, last, gamma, lam):
    """Direct per-environment recursion written from the GAE definition (delta sums)."""
    N, B = r.shape
    adv = torch.zeros(N, B, dtype=torch.float64)
    for b in range(B):
        for n in range(N):
            total, discount = 0.0, 1.0
            for k in range(n, N):
                nxt = last[b] if k == N - 1 else v[k + 1, b]
                delta = r[k, b] + gamma * nxt * (1 - d[k, b]) - v[k, b]
                total += discount * delta
                if d[k, b]:
                    break
                discount *= gamma * lam
            adv[n, b] = total
    return adv


def test_gae_hand_computed():
    # One env, 3 chunks, episode ends at chunk 1; gamma=0.5, lam=0.5 for round numbers.
    r = torch.tensor([[1.0], [2.0], [3.0]])
    v = torch.tensor([[0.5], [1.0], [2.0]])
    d = torch.tensor([[0.0], [1.0], [0.0]])
    last = torch.tensor([4.0])
    adv, ret = gae(r, v, d, last, gamma=0.5, lam=0.5)
    # chunk 2: delta = 3 + 0.5*4 - 2 = 3
    # chunk 1: terminal: delta = 2 - 1 = 1, no carry
    # chunk 0: delta = 1 + 0.5*1.0 - 0.5 = 1; adv = 1 + 0.25*1 = 1.25
    torch.testing.assert_close(adv, torch.tensor([[1.25], [1.0], [3.0]]))
    torch.testing.assert_close(ret, adv + v)


@pytest.mark.parametrize("N,B", [(1, 1), (7, 3), (13, 5)])
def test_gae_matches_definition(N, B):
    g = torch.Generator().manual_seed(N * 10 + B)
    r = torch.randn(N, B, generator=g, dtype=torch.float64)
    v = torch.randn(N, B, generator=g, dtype=torch.float64)
    d = (torch.rand(N, B, generator=g) < 0.3).double()
    last = torch.randn(B, generator=g, dtype=torch.float64)
    adv, _ = gae(r, v, d, last, gamma=0.99, lam=0.95)
    torch.testing.assert_close(adv.double(), _gae_loop(r, v, d, last, 0.99, 0.95), atol=1e-5, rtol=1e-5)  # fp32 accumulation: measured 4e-7


def test_gae_shape_errors():
    with pytest.raises(ValueError, match=r"must all be \[N, B\]"):
        gae(torch.zeros(3, 2), torch.zeros(3, 1), torch.zeros(3, 2), torch.zeros(2))
    with pytest.raises(ValueError, match=r"last_value must be \[B=2\]"):
        gae(torch.zeros(3, 2), torch.zeros(3, 2), torch.zeros(3, 2), torch.zeros(3))


def test_ppo_loss_terms_against_formula():
    g = torch.Generator().manual_seed(0)
    M = 17
    old = torch.randn(M, generator=g)
    new = old + 0.3 * torch.randn(M, generator=g)
    adv = torch.randn(M, generator=g)
    val, old_val, ret = torch.randn(M, generator=g), torch.randn(M, generator=g), torch.randn(M, generator=g)
    ent = torch.rand(M, generator=g)
    cfg = PPOConfig()
    total, t = ppo_loss(new, old, adv, cfg, values=val, old_values=old_val, returns=ret, entropy=ent)

    ratio = [math.exp(a - b) for a, b in zip(new.tolist(), old.tolist())]
    pol = -sum(min(r * a, max(min(r, 1.2), 0.8) * a) for r, a in zip(ratio, adv.tolist())) / M
    def huber(x, y, d=10.0):
        e = abs(x - y)
        return 0.5 * e * e if e <= d else d * (e - 0.5 * d)
    vl = sum(
        max(huber(v, R), huber(ov + max(-0.2, min(0.2, v - ov)), R))
        for v, ov, R in zip(val.tolist(), old_val.tolist(), ret.tolist())
    ) / M
    kl = sum((r - 1) - math.log(r) for r in ratio) / M
    cf = sum(abs(r - 1) > 0.2 for r in ratio) / M
    assert t["policy_loss"].item() == pytest.approx(pol, rel=1e-5)
    assert t["value_loss"].item() == pytest.approx(vl, rel=1e-5)
    assert t["approx_kl"].item() == pytest.approx(kl, rel=1e-4)
    assert t["clipfrac"].item() == pytest.approx(cf)
    assert total.item() == pytest.approx(pol + 0.5 * vl - 0.005 * ent.mean().item(), rel=1e-5)


def test_ppo_ratio_one_at_first_epoch_gives_plain_pg():
    adv = torch.tensor([1.0, -2.0, 0.5])
    logp = torch.tensor([-3.0, -1.0, -2.0], requires_grad=True)
    total, t = ppo_loss(logp, logp.detach(), adv, PPOConfig())
    assert t["approx_kl"].item() == 0 and t["clipfrac"].item() == 0
    total.backward()
    torch.testing.assert_close(logp.grad, -adv / 3)


def test_ppo_value_args_together():
    with pytest.raises(ValueError, match="values, old_values and returns together"):
        ppo_loss(torch.zeros(2), torch.zeros(2), torch.zeros(2), PPOConfig(), values=torch.zeros(2))


def test_group_advantages():
    # Sample std (RLinf): group [1, 0, 1, 0] has mean 0.5 and std sqrt(1/3); a group of equal
    # returns is degenerate: zero advantages, marked uninformative so the update drops it.
    r = torch.tensor([1.0, 0.0, 1.0, 0.0, 5.0, 5.0, 5.0, 5.0])
    a, informative = group_advantages(r, 4)
    s = 0.5 / math.sqrt(1 / 3)
    torch.testing.assert_close(a[:4], torch.tensor([s, -s, s, -s]), atol=1e-5, rtol=0)
    torch.testing.assert_close(a[4:], torch.zeros(4))
    assert informative.tolist() == [True] * 4 + [False] * 4
    with pytest.raises(ValueError, match="multiple of group_size=8"):
        group_advantages(torch.zeros(12), 8)
    with pytest.raises(ValueError, match=">= 2"):
        group_advantages(torch.zeros(4), 1)


def test_ppo_element_ratio_against_formula():
    # Per-element (token-level) ratio: each element is clipped on its own, the chunk's
    # advantage is broadcast, means run over the masked elements only.
    g = torch.Generator().manual_seed(3)
    M, N = 5, 7
    old = torch.randn(M, N, generator=g)
    new = old + 0.4 * torch.randn(M, N, generator=g)
    adv = torch.randn(M, generator=g)
    mask = (torch.rand(N, generator=g) > 0.4).float()
    _, t = ppo_loss(new, old, adv, PPOConfig(), element_mask=mask)
    num = kl = cf = 0.0
    new, old, adv, mask = new.tolist(), old.tolist(), adv.tolist(), mask.tolist()
    for m in range(M):
        for n in range(N):
            if mask[n]:
                r = math.exp(new[m][n] - old[m][n])
                num += min(r * adv[m], max(min(r, 1.2), 0.8) * adv[m])
                kl += (r - 1) - math.log(r)
                cf += abs(r - 1) > 0.2
    count = M * sum(mask)
    assert t["policy_loss"].item() == pytest.approx(-num / count, rel=1e-5)
    assert t["approx_kl"].item() == pytest.approx(kl / count, rel=1e-4)
    assert t["clipfrac"].item() == pytest.approx(cf / count)
    # Summing the elements into one chunk ratio is a different objective.
    new_t, old_t, mask_t = torch.tensor(new), torch.tensor(old), torch.tensor(mask)
    _, chunk = ppo_loss((new_t * mask_t).sum(1), (old_t * mask_t).sum(1), torch.tensor(adv), PPOConfig())
    assert chunk["policy_loss"].item() != pytest.approx(t["policy_loss"].item(), rel=1e-3)
    with pytest.raises(ValueError, match="both be"):
        ppo_loss(new_t, old_t[:, 0], torch.tensor(adv), PPOConfig())


def test_explained_variance():
    ret = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert explained_variance(ret, ret) == pytest.approx(1.0)
    assert explained_variance(torch.full((4,), 2.5), ret) == pytest.approx(0.0)
    assert math.isnan(explained_variance(ret, torch.ones(4)))


def test_config_validation():
    with pytest.raises(ValueError, match="clip must be > 0"):
        PPOConfig(clip=0)
    with pytest.raises(ValueError, match="gamma"):
        PPOConfig(gamma=1.5)
    with pytest.raises(ValueError, match="ratio must be"):
        PPOConfig(ratio="token")
    with pytest.raises(ValueError, match="target_kl"):
        PPOConfig(target_kl=0.0)
    with pytest.raises(ValueError, match="micro_batch"):
        PPOConfig(micro_batch=0)
