"""DMD2's GAN term (engine/gan.py, training/closures.make_gan_features): the losses by hand, the head, the hook,
where each loss's gradient goes, that the head learns, and the critic's features on a tiny Qwen-Image model."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from apexctl.engine import gan
from apexctl.engine.cond import Cond
from apexctl.engine.gan import GanHead, gan_losses, gan_term, tapped


def _softplus(a: float) -> float:
    return math.log1p(math.exp(a))


def test_gan_losses_by_hand():
    real, fake_d, fake_g = torch.tensor([2.0, -1.0]), torch.tensor([0.5, -3.0]), torch.tensor([1.0, 0.0, -2.0])
    loss_d, loss_g = gan_losses(real, fake_d, fake_g)
    want_d = (_softplus(-2.0) + _softplus(1.0)) / 2 + (_softplus(0.5) + _softplus(-3.0)) / 2
    want_g = (_softplus(-1.0) + _softplus(0.0) + _softplus(2.0)) / 3
    assert loss_d.item() == pytest.approx(want_d, rel=1e-6)
    assert loss_g.item() == pytest.approx(want_g, rel=1e-6)
    # a perfect discriminator: L_D → 0 and the generator's loss is large
    loss_d, loss_g = gan_losses(torch.full((3,), 20.0), torch.full((3,), -20.0), torch.full((3,), -20.0))
    assert loss_d.item() < 1e-8 and loss_g.item() == pytest.approx(20.0, rel=1e-6)


def test_head_shape_dtype_and_token_order_invariance():
    torch.manual_seed(0)
    head = GanHead(12, hidden=8)
    h = torch.randn(3, 7, 12)
    logits = head(h)
    assert logits.shape == (3,) and logits.dtype == torch.float32
    assert head(h.to(torch.bfloat16)).dtype == torch.float32  # fp32 whatever the features' dtype
    torch.testing.assert_close(head(h[:, torch.randperm(7)]), logits)
    assert not torch.allclose(head(h.flip(0)), logits)  # but it does tell rows apart


def test_tapped_captures_and_always_removes_its_hook():
    site = nn.Linear(3, 2)
    x = torch.randn(4, 3)
    with tapped(site, lambda out: 2 * out) as seen:
        y = site(x)
        site(x)
    assert len(seen) == 2 and torch.equal(seen[0], 2 * y)
    assert len(site._forward_hooks) == 0
    torch.testing.assert_close(y, nn.functional.linear(x, site.weight, site.bias))  # output unchanged
    with pytest.raises(ValueError, match="boom"), tapped(site, lambda out: out) as seen:
        site(x)
        raise ValueError("boom")
    assert len(site._forward_hooks) == 0
    site(x)
    assert len(seen) == 1  # nothing captured after the block


# ---- gan_term on a toy critic ---------------------------------------------------------------------------------------

C, H, W, D, B = 2, 2, 3, 5, 4


class ToyCritic(nn.Module):
    """features(u) = per-token Linear(C → D) of u's pixels; ``detach_weights`` uses the weights detached."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(C, D)
        self.calls: list[tuple[int, bool]] = []

    def features(self, u: torch.Tensor, s: torch.Tensor, cond: Cond, detach_weights: bool = False) -> torch.Tensor:
        assert len(cond) == u.shape[0] == s.shape[0]
        self.calls.append((u.shape[0], detach_weights))
        params = [p.detach() if detach_weights else p for p in (self.proj.weight, self.proj.bias)]
        tokens = u.flatten(2).transpose(1, 2)  # [B, h·w, C]
        return nn.functional.linear(tokens, *params) * (1 + s[:, None, None])


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    critic, head = ToyCritic(), GanHead(D, hidden=6)
    g = nn.Parameter(torch.tensor(0.7))  # the generator: x̂ depends on it
    z_gen = torch.randn(B, C, H, W)
    x_real = torch.randn(B, C, H, W) + 1.0
    x_fake = g * z_gen
    cond = Cond(torch.randn(B, 3, 4), torch.ones(B, 3, dtype=torch.long))
    s = torch.rand(B)
    z_real, z_fake = torch.randn(B, C, H, W), torch.randn(B, C, H, W)
    return critic, head, g, (x_real, x_fake, cond, s, z_real, z_fake)


def _grad_norms(critic, head, g):
    grads = [p.grad for p in critic.parameters()] + [p.grad for p in head.parameters()]
    crit = sum(0.0 if q is None else q.abs().sum().item() for q in grads[:2])
    hd = sum(0.0 if q is None else q.abs().sum().item() for q in grads[2:])
    return crit, hd, 0.0 if g.grad is None else abs(g.grad.item())


def test_gan_term_values_and_one_batched_d_side_forward():
    critic, head, g, (x_real, x_fake, cond, s, z_real, z_fake) = _setup()
    loss, terms = gan_term(critic.features, head, x_real, x_fake, cond, s, z_real, z_fake)
    assert critic.calls == [(2 * B, False), (B, True)]  # real and fake D-side rows in one forward

    sb = s.reshape(-1, 1, 1, 1)
    u_real, u_fake = sb * z_real + (1 - sb) * x_real, sb * z_fake + (1 - sb) * x_fake
    with torch.no_grad():
        d_real, d_fake = head(critic.features(u_real, s, cond)), head(critic.features(u_fake, s, cond))
    want_d = nn.functional.softplus(-d_real).mean() + nn.functional.softplus(d_fake).mean()
    want_g = nn.functional.softplus(-d_fake).mean()
    torch.testing.assert_close(terms["gan_d"], want_d)
    torch.testing.assert_close(terms["gan_g"], want_g)
    torch.testing.assert_close(loss.detach(), want_d + want_g)
    assert terms["gan_real_acc"].item() == pytest.approx((d_real > 0).float().mean().item())
    assert terms["gan_fake_acc"].item() == pytest.approx((d_fake < 0).float().mean().item())
    assert all(not v.requires_grad for v in terms.values())


@pytest.mark.parametrize("side", ["g", "d"])
def test_each_loss_reaches_only_its_own_side(monkeypatch, side):
    """L_G alone: the generator only (critic and head untouched); L_D alone: the head and critic only."""
    losses = gan.gan_losses

    def one_side(*logits):
        loss_d, loss_g = losses(*logits)
        return (0.0 * loss_d, loss_g) if side == "g" else (loss_d, 0.0 * loss_g)

    monkeypatch.setattr(gan, "gan_losses", one_side)
    critic, head, g, inputs = _setup()
    loss, _ = gan_term(critic.features, head, *inputs)
    loss.backward()
    crit, hd, gen = _grad_norms(critic, head, g)
    if side == "g":
        assert crit == 0.0 and hd == 0.0 and gen > 1e-6
    else:
        assert crit > 1e-6 and hd > 1e-6 and gen == 0.0


def test_head_alone_learns_to_separate_real_from_fake():
    torch.manual_seed(1)
    direction = torch.randn(D)  # not a constant vector: LayerNorm would remove that
    head = GanHead(D, hidden=16)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    start = None
    for _ in range(300):
        real = torch.randn(16, 6, D) + direction
        fake = torch.randn(16, 6, D) - direction
        loss_d, _ = gan_losses(head(real), head(fake), head(fake))
        start = loss_d.item() if start is None else start
        opt.zero_grad()
        loss_d.backward()
        opt.step()
    assert start == pytest.approx(2 * math.log(2), abs=0.3)  # chance level at the start
    assert loss_d.item() < 0.1 * start


# ---- the critic's features on a tiny Qwen-Image model ---------------------------------------------------------------


def _tiny_qwen():
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel

    from apexctl.models.qwen_image import QwenImageBackbone
    from apexctl.models.tiny import rope_axes

    torch.manual_seed(0)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=4,
        out_channels=1,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        axes_dims_rope=rope_axes(8),
    )
    return QwenImageBackbone(
        transformer, FlowMatchEulerDiscreteScheduler(), codec_config={"type": "pixel", "channels": 1}
    )


def test_make_gan_features_on_tiny_qwen_image():
    from apexctl.engine.objectives import Net
    from apexctl.engine.shift import ConditionShift
    from apexctl.training.closures import make_critic, make_gan_features

    bb = _tiny_qwen()
    tr = bb.transformer
    net = Net(bb, ConditionShift())
    before = bb.denoiser
    features = make_gan_features(bb, tr, tr, net)
    g = torch.Generator().manual_seed(3)
    u = torch.randn(2, 1, 8, 8, generator=g)
    s = torch.tensor([0.3, 0.8])
    cond = Cond(torch.randn(2, 5, 16, generator=g), torch.ones(2, 5, dtype=torch.long))
    n_tokens, dim = 16, bb.feature_dim()  # 8×8 latents packed 2×2

    live = features(u, s, cond, detach_weights=False)
    assert live.shape == (2, n_tokens, dim) and bb.denoiser is before
    live.square().mean().backward()
    assert sum(p.grad.abs().sum().item() for p in tr.parameters() if p.grad is not None) > 0
    tr.zero_grad(set_to_none=True)

    u_in = u.clone().requires_grad_()
    frozen = features(u_in, s, cond, detach_weights=True)
    torch.testing.assert_close(frozen, live.detach())  # the same weights, only cut off
    frozen.square().mean().backward()
    assert all(p.grad is None for p in tr.parameters())
    assert u_in.grad is not None and u_in.grad.abs().sum() > 0
    assert bb.denoiser is before

    # the self-critic reads the shifted condition: a separate critic (real condition) sees other features
    critic = make_critic(tr)
    sep = make_gan_features(bb, tr, tr, net, critic=critic)(u, s, cond, detach_weights=False)
    assert sep.shape == live.shape and not torch.allclose(sep, live, atol=1e-4)
    sep.square().mean().backward()
    assert all(p.grad is None for p in tr.parameters())  # the critic copy is trained, not the model
    assert sum(p.grad.abs().sum().item() for p in critic.parameters() if p.grad is not None) > 0
    assert bb.denoiser is before

    site, _ = bb.feature_site()
    with pytest.raises(Exception):  # noqa: B017 - any failure inside the forward
        features(u, s, cond[:1], detach_weights=True)
    assert bb.denoiser is before and len(site._forward_hooks) == 0

    # the whole term runs on it: x̂ = z − F(z, 1, c) with its graph
    z = torch.randn(2, 1, 8, 8, generator=g)
    x_fake = z - net(z, torch.ones(2), cond)
    head = GanHead(dim, hidden=8)
    loss, terms = gan_term(features, head, u, x_fake, cond, s, torch.randn_like(u), torch.randn_like(u))
    loss.backward()
    assert torch.isfinite(loss) and set(terms) == {"gan_d", "gan_g", "gan_real_acc", "gan_fake_acc"}
    assert all(p.grad is not None for p in head.parameters())
