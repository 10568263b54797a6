"""The DiffEnc paper's claims, checked by numbers, plus the invariants of every component.


Each test's name states a claim and its docstring says where it comes from and why its
tolerance is what it is. Every test calls the functions of diffenc.py; none compares the code
with a copy of the same formula.


Run: pytest -q                                   (quick hypothesis profile, < 3 min on 2 cores)
     HYPOTHESIS_PROFILE=thorough pytest -q       (10x more examples per property)

Order: the theory in the order of diffenc.py's method sections (1. schedule ... 7. finite depth),
then its machinery (8. configuration ... 13. command line, data parallel).


The linear-Gaussian toy (used for the convergence and variance claims). Per dimension
x ~ N(m, s^2); encoder y = A(lambda) x + B(lambda) (smooth, non-trivial); model
x_hat = C(t) z + E(t), slightly off the Bayes-optimal linear estimator. Every quantity is then
linear in (x, eps), every loss quadratic, so its expectation over x and eps is *exactly* the
average over the four "sigma points" x = m +- s, eps = +-1 (they match the mean and covariance
of (x, eps)). No sampling noise: the tests are deterministic.
"""


import argparse
import copy
import dataclasses
import gzip
import io
import math
import os
import pickle
import re
import signal
import socket
import struct
import subprocess
import sys
import tarfile
import time
import urllib.error
import zlib


import numpy as np
import pytest
import sympy as sp
import torch
from hypothesis import HealthCheck, example, given, settings, strategies as st


import diffenc as de


settings.register_profile("quick", max_examples=15, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=150, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "quick"))
# the theory is checked in float64; the model is dtype-agnostic
torch.set_default_dtype(torch.float64)

# Hypothesis strategies used by several tests
SEEDS = st.integers(0, 2 ** 16)   # a torch seed for random inputs and weights
GAMMAS = st.floats(-13.3, 5.0)    # gamma = -log SNR over the paper's default schedule
PIXELS = st.floats(-1, 1)         # a scaled pixel value


HERE = os.path.dirname(os.path.abspath(__file__))
SCHEDULE = de.NoiseSchedule("fixed", -13.3, 5.0)  # the paper's default schedule
# The test networks: 8 channels in GroupNorm groups of >= 2 channels. (A group of one channel
# subtracts the time embedding away: such networks cannot see t, and dy/dgamma would be 0.)
NET = dict(n_embd=8, n_layer=1, norm_groups=4, enc_ch=8, enc_levels=1, enc_norm_groups=2)


def close_to_scale(a, b, rel, scale=None):
    """|a - b| <= rel * scale in every entry, scale = max|b| unless given: two computations of one
    quantity agree to a fraction rel of its scale. This is the tolerance rounding allows. An entry
    that is a sum of n terms carries an error of about n * 2^-53 times the size of its terms (and
    kernels may sum in another order on another CPU), not of itself: an entry near 0 (a gradient
    that cancels) cannot be compared relative to its own size. rel is chosen per test from the
    number of terms summed; each test asserts that what it compares is non-trivial."""
    scale = b.abs().max() if scale is None else scale
    return bool(((a - b).abs() <= rel * scale).all())


# ---------------------------------------------------------------------------------------- the toy


M, S = 0.3, 0.5  # data mean and std per dimension
SIGMA_X = torch.tensor([M - S, M - S, M + S, M + S])[:, None]  # (4, 1): x sigma points
SIGMA_EPS = torch.tensor([-1.0, 1.0, -1.0, 1.0])[:, None]        # (4, 1): eps sigma points


def toy_y(x, gamma):
    """The toy's inner encoder y(x, lambda) = A(lambda) x + B(lambda), lambda = -gamma."""
    lam = -gamma
    return (0.5 + 0.3 * torch.tanh(lam / 4)) * x + 0.1 * torch.sin(lam / 3)


def toy_encode(x, gamma, derivative=True):
    """x_phi and dx_phi/dlambda of the toy through diffenc.encoder_mean; dy/dgamma by jvp."""
    y, dy = torch.func.jvp(lambda g: toy_y(x, g), (gamma,), (torch.ones_like(gamma),))
    return de.encoder_mean("learned", x, gamma, y, dy if derivative else None)


def toy_x_hat(z, gamma):
    """x_hat = C z + E: the Bayes-optimal linear estimator of x_phi from z, with C detuned by 2%.
    A function of gamma (not of t), as the networks are: then L_inf depends on the schedule's
    endpoints only."""
    alpha, sigma = de.alpha_sigma(gamma)
    u = (gamma + 13.3) / 18.3                            # t under the fixed schedule
    # x_phi = a x + b
    a = torch.sigmoid(-gamma) + torch.sigmoid(gamma) * (0.5 + 0.3 * torch.tanh(-gamma / 4))
    b = torch.sigmoid(gamma) * 0.1 * torch.sin(-gamma / 3)
    mu, var = a * M + b, (a * S) ** 2
    g = alpha * var / (alpha ** 2 * var + sigma ** 2)
    return g * (1 + 0.02 * torch.sin(5 * u)) * z + mu - g * alpha * mu


def sigma_points(t, schedule=SCHEDULE):
    """Broadcast sigma points against times t (N,): x, eps (N, 4, 1) and gamma (N, 1, 1)."""
    return SIGMA_X.expand(len(t), 4, 1), SIGMA_EPS.expand(len(t), 4, 1), schedule(t).view(-1, 1, 1)


def flat(*tensors):
    return [a.reshape(-1, 1) for a in tensors]


def toy_losses(t, x, eps, schedule=SCHEDULE):
    """The continuous diffusion-loss integrand of the toy for examples (t, x, eps), each (N,), and
    the schedule's shape values (s(t), ds/dt) it was computed from, as DiffEnc._continuous does."""
    s, ds_dt = torch.func.jvp(schedule.shape, (t,), (torch.ones_like(t),))
    gamma_0, gamma_1 = schedule.endpoints()
    gamma, dgamma_dt = gamma_0 + (gamma_1 - gamma_0) * s, (gamma_1 - gamma_0) * ds_dt
    alpha, sigma = de.alpha_sigma(gamma)
    x_enc, dx_enc = toy_encode(x, gamma)
    z = alpha * x_enc + sigma * eps
    x_hat = toy_x_hat(z, gamma)
    v_hat = (alpha * z - x_hat) / sigma  # the v-prediction that gives this x_hat
    err = de.scaled_error(v_hat, eps, x_enc, alpha, sigma, "v")
    terms = flat(dgamma_dt, alpha, sigma, err, dx_enc, sigma ** 2 * x_hat)
    return de.diffusion_loss_continuous(*terms), (s, ds_dt)


def toy_integrand(t, schedule=SCHEDULE):
    """E_{x, eps}[continuous diffusion-loss integrand] at times t (N,), per dimension: (N,)."""
    x, eps, _ = sigma_points(t, schedule)
    losses, _ = toy_losses(t.repeat_interleave(4), x.flatten(), eps.flatten(), schedule)
    return losses.view(len(t), 4).mean(1)


def gauss_legendre(panels=400, order=16):
    """Nodes and weights of composite Gauss-Legendre on [0, 1] (each (panels * order,))."""
    nodes, weights = np.polynomial.legendre.leggauss(order)
    edges = np.linspace(0, 1, panels + 1)
    mid, half = (edges[:-1, None] + edges[1:, None]) / 2, (edges[1:, None] - edges[:-1, None]) / 2
    t = (mid + half * nodes).ravel()
    w = ((edges[1:, None] - edges[:-1, None]) / 2 * weights).ravel()
    return torch.tensor(t), torch.tensor(w)


def toy_L_inf(schedule=SCHEDULE):
    """L_inf = int_0^1 E[integrand] dt by composite Gauss-Legendre (exact to ~1e-12 for this
    smooth integrand)."""
    t, w = gauss_legendre()
    return (toy_integrand(t, schedule) * w).sum().item()


def toy_steps(T, schedule=SCHEDULE):
    """Per-step tensors of the T-step toy chain at the sigma points, each (T, 4, 1), for steps i =
    1..T."""
    i = torch.arange(1, T + 1, dtype=torch.float64)
    x, eps, gamma_t = sigma_points(i / T, schedule)
    gamma_s = schedule(((i - 1) / T)).view(-1, 1, 1)
    alpha_t, sigma_t = de.alpha_sigma(gamma_t)
    x_enc_t, _ = toy_encode(x, gamma_t, derivative=False)
    x_enc_s, _ = toy_encode(x, gamma_s, derivative=False)
    z_t = alpha_t * x_enc_t + sigma_t * eps
    x_hat = toy_x_hat(z_t, gamma_t)
    return dict(x=x, eps=eps, gamma_s=gamma_s, gamma_t=gamma_t, alpha_t=alpha_t, sigma_t=sigma_t,
                x_enc_s=x_enc_s, x_enc_t=x_enc_t, z_t=z_t, x_hat=x_hat)


def toy_step_kls(T, increment="euler", schedule=SCHEDULE):
    """E[KL_i] for i = 1..T from diffenc.diffusion_loss_discrete: (T,)."""
    p = toy_steps(T, schedule)
    v_hat = (p["alpha_t"] * p["z_t"] - p["x_hat"]) / p["sigma_t"]
    err = de.scaled_error(v_hat, p["eps"], p["x_enc_t"], p["alpha_t"], p["sigma_t"], "v")
    full = lambda a: a.expand_as(p["x"])
    kl = de.diffusion_loss_discrete(*flat(full(p["gamma_s"]), full(p["gamma_t"]),
                                          full(p["alpha_t"]), full(p["sigma_t"]),
                                          err, p["x_enc_s"], p["x_enc_t"], p["x_hat"]), increment)
    return kl.view(T, 4).mean(1)


def toy_mean_gaps(T, increment="euler"):
    """mu_Q - mu_P (T, 4, 1) and sigma_Q^2 (T, 1, 1) from diffenc.q_reverse / p_reverse."""
    p = toy_steps(T)
    mu_q, var_q = de.q_reverse(p["z_t"], p["x_enc_s"], p["x_enc_t"], p["gamma_s"], p["gamma_t"])
    mu_p, var_p = de.p_reverse(p["z_t"], p["x_hat"], p["gamma_s"], p["gamma_t"], increment)
    assert torch.equal(var_p, var_q)
    return mu_q - mu_p, var_q


@pytest.fixture(scope="module")
def L_inf():
    return toy_L_inf()


# ------------------------------------------------------------------------------ 1. noise schedule


def random_schedule(kind, seed, scale, w_sign, linear, sharp=1.0):
    """A schedule of this kind whose learned parameters are moved by N(0, scale^2) noise, whose w
    has the sign w_sign and (net) whose linear part is scaled by `linear` (0: the shape is the
    sigmoid layer alone) and whose sigmoid units' input weights by `sharp` (steep units of both
    signs: rising and falling steps, were a weight not taken as |w|): any values training could
    reach, negative weights included."""
    torch.manual_seed(seed)
    s = de.NoiseSchedule(kind, -13.3, 5.0)
    with torch.no_grad():
        for p in s.parameters():
            p.add_(torch.randn_like(p) * scale)
        s.w.mul_(w_sign)
        if kind == "net":
            s.l1.weight.mul_(linear)
            s.l2.weight.mul_(sharp)
    return s


# (seed, scale, w_sign, linear, sharp) of random_schedule
schedule_parameters = st.tuples(SEEDS, st.floats(0.01, 5.0), st.sampled_from([1, -1]),
                                st.sampled_from([1.0, 0.0]), st.sampled_from([1.0, 20.0]))


@given(t=st.lists(st.floats(0, 1), min_size=2, max_size=20), params=schedule_parameters)
def test_schedules_are_monotone_variance_preserving_with_their_endpoints(t, params):
    """[VDM; DiffEnc: schedule] For every schedule kind and any values of its learned parameters:
    alpha^2 + sigma^2 = 1 (1e-15: rounding), gamma is non-decreasing in t (1e-12: rounding) at the
    drawn t and on a grid of 1001, and gamma(0), gamma(1) are the configured / learned endpoints
    b <= b + |w| (exactly for fixed, 1e-12 for the network's normalisation)."""
    t = torch.tensor(sorted(t))
    learned = [random_schedule(kind, *params) for kind in ("scalar", "net")]
    for s in [de.NoiseSchedule("fixed", -13.3, 5.0)] + learned:
        gamma = s(t)
        alpha, sigma = de.alpha_sigma(gamma)
        assert torch.allclose(alpha ** 2 + sigma ** 2, torch.ones_like(gamma), atol=1e-15)
        assert (gamma.diff() >= -1e-12).all()
        assert (s(torch.linspace(0, 1, 1001)).diff() >= -1e-12).all()
        ends = s(torch.tensor([0.0, 1.0]))
        assert ends[0].item() == pytest.approx(s.b.item(), abs=1e-12)
        assert ends[1].item() == pytest.approx((s.b + s.w.abs()).item(), abs=1e-12)
        assert ends[0] <= ends[1]


def test_fixed_schedule_matches_the_papers_table():
    """[VDM; DiffEnc: experiments] gamma from -13.3 to 5: sigma^2(0) = sigmoid(-13.3) and
    alpha^2(1) = sigmoid(-5) (the endpoints the paper's likelihoods are computed with), and the
    slope gamma'(t) = 18.3 that the continuous loss uses (by jvp)."""
    gamma, slope = torch.func.jvp(SCHEDULE, (torch.tensor([0.0, 0.5, 1.0]),), (torch.ones(3),))
    assert torch.allclose(slope, torch.full((3,), 18.3))
    alpha, sigma = de.alpha_sigma(gamma)
    assert sigma[0] ** 2 == pytest.approx(1 / (1 + math.exp(13.3)), rel=1e-12)
    assert alpha[2] ** 2 == pytest.approx(1 / (1 + math.exp(5.0)), rel=1e-12)


HERMITE_3 = np.polynomial.hermite_e.hermegauss(3)  # exact for E[degree <= 5 polynomial], N(0, 1)


def toy_loss_moments(t, schedule, hook=False):
    """E[L | t] and E[L^2 | t] (N,) of the toy's one-sample loss at times t (N,), exact over
    (x, eps) by 3 x 3 Gauss-Hermite (L is quadratic in them, L^2 quartic). With hook, the loss
    goes through diffenc.variance_gradient, so its backward reaches the shape as that of L^2."""
    xi, w = torch.tensor(HERMITE_3[0]), torch.tensor(HERMITE_3[1]) / math.sqrt(2 * math.pi)
    x, eps = (M + S * xi).repeat_interleave(3), xi.repeat(3)           # (9,) points
    weight = (w.repeat_interleave(3) * w.repeat(3))                     # (9,)
    n = len(t)
    losses, shape_values = toy_losses(t.repeat_interleave(9), x.repeat(n), eps.repeat(n), schedule)
    if hook:
        de.variance_gradient(shape_values, losses.detach())
    losses = losses.view(n, 9)
    return (losses * weight).sum(1), (losses ** 2 * weight).sum(1)


def test_the_variance_gradient_trains_the_shape_to_lower_the_variance_and_keeps_L_inf(L_inf):
    """[VDM: Appendix I.2] With variance_gradient, the gradient of the average loss that reaches the
    shape is that of the average squared loss (checked against autograd of L^2, to 1e-10 of each
    gradient's largest entry: sums of 32 x 4 terms, rounding ~1e-14), and 30
    Adam steps on it lower the variance of the one-sample estimator of L_inf (t ~ U[0, 1], x,
    eps; exact by quadrature) by more than 20%, while L_inf itself stays the same (1e-9)."""
    schedule = net_schedule(0)
    shape = [p for name, p in schedule.named_parameters() if name not in ("b", "w")]
    t_grid, w_grid = gauss_legendre(panels=50)
    variance = lambda: ((toy_loss_moments(t_grid, schedule)[1] * w_grid).sum() - L_inf ** 2).item()
    t = (torch.arange(32, dtype=torch.float64) + 0.5) / 32
    mean, _ = toy_loss_moments(t, schedule, hook=True)
    hooked = torch.autograd.grad(mean.mean(), shape)
    _, second = toy_loss_moments(t, schedule)
    direct = torch.autograd.grad(second.mean(), shape)
    scale = max(b.abs().max() for b in direct)       # one scale: a tensor's gradient may be 0
    assert all(close_to_scale(a, b, 1e-10, scale) for a, b in zip(hooked, direct))
    assert all(b.abs().max() > 0.1 for b in direct[2:])          # the sigmoid layer's (l2, l3)
    before = variance()
    opt = torch.optim.Adam(shape, lr=0.05)
    for k in range(30):
        opt.zero_grad()
        t = (torch.arange(32, dtype=torch.float64) + torch.rand(1, generator=seeded(k))) / 32
        toy_loss_moments(t, schedule, hook=True)[0].mean().backward()
        opt.step()
    after = variance()
    print(f"\nvariance of the one-sample loss: {before:.2f} -> {after:.2f}")
    assert after < 0.8 * before
    assert toy_L_inf(schedule) == pytest.approx(L_inf, rel=1e-9)


def test_a_net_schedule_trains_its_shape_on_the_variance_and_its_endpoints_on_the_elbo():
    """[VDM: Appendix I.2] In continuous-time training with --schedule net, the gradient of the bpd
    that reaches gamma's endpoints (b, w) is the ELBO's, the same as without variance_gradient,
    and the gradient that reaches the shape equals, by a separate computation, the gradient of
    the mean squared per-image diffusion loss (bpd): both to 1e-10 (of each gradient's size)."""
    shape = (1, 8, 8)
    model = randomize(small_model(image=shape, schedule="net")).train()
    gen = torch.Generator().manual_seed(0)
    x_int = torch.randint(0, 256, (4, *shape), generator=gen)
    t, eps, eps_0 = (torch.rand(4, generator=gen), torch.randn(4, *shape, generator=gen),
                     torch.randn(4, *shape, generator=gen))
    ends = [model.schedule.b, model.schedule.w]
    net = [p for name, p in model.schedule.named_parameters() if name not in ("b", "w")]
    bpd = lambda: de.bits_per_dim(model(x_int, t, eps, eps_0), shape).mean()
    hooked = torch.autograd.grad(bpd(), ends + net)
    plain = de.variance_gradient
    try:
        de.variance_gradient = lambda *args: None
        ends_plain = torch.autograd.grad(bpd(), ends)
    finally:
        de.variance_gradient = plain
    model.eval()                                     # no hooks now; no dropout either way
    per_image = de.bits_per_dim([model._continuous(de.scale_pixels(x_int), t, eps)], shape)
    squared = (per_image ** 2).mean()
    direct = torch.autograd.grad(squared, net)
    assert all(torch.allclose(a, b, rtol=1e-10) for a, b in zip(hooked[:2], ends_plain))
    # 1e-10 of the gradients' scale: elements near 0 (l1's bias: 0) carry the large ones' rounding
    scale = max(b.abs().max() for b in direct)
    assert all(close_to_scale(a, b, 1e-10, scale) for a, b in zip(hooked[2:], direct))
    names = [name for name, _ in model.schedule.named_parameters() if name not in ("b", "w")]
    assert all(g.abs().max() > 0 for name, g in zip(names, direct)
               if name != "l1.bias")                 # l1's bias cancels in the normalised shape


# ------------------------------------------------------------------------------------- 2. encoder


def seeded(seed):
    """A CPU random generator with this seed."""
    return torch.Generator().manual_seed(seed)


def randomize(module, std=0.3):
    """Give every zero-initialised layer (time projections, output convs, attention projections)
    random weights, so that the outputs depend on everything, gamma included. Returns module."""
    for m in module.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and not m.weight.any():
            torch.nn.init.normal_(m.weight, std=std)
    return module


def encoder_y(model, x, gamma):
    """y and dy/dgamma of the model's encoder network, to assert that they are non-trivial."""
    return torch.func.jvp(lambda g: model.enc(x, g), (gamma,), (torch.ones_like(gamma),))


def small_model(encoder="learned", image=(1, 8, 8), **kw):
    """A small DiffEnc (NET) whose encoder is randomized, so that y and dy/dgamma are far from
    trivial; its score network keeps its initialisation (v_hat = z) unless randomized too."""
    cfg = de.Config(**{**NET, **dict(encoder=encoder, dropout=0.0, enc_dropout=0.0), **kw})
    torch.manual_seed(0)
    model = de.DiffEnc(cfg, image)
    if model.enc is not None:
        randomize(model.enc)
    return model


def test_encoder_derivative_matches_central_differences_and_is_per_sample():
    """[DiffEnc: encoder] dx_phi/dlambda from the single jvp equals the central difference
    -(x_phi(gamma + h) - x_phi(gamma - h)) / 2h (float64, h = 1e-6: the truncation error is
    ~h^2 times the third derivative of y, ~1e-9 relative, since y oscillates in gamma with period
    ~0.1 (sin(1000 t f)); rounding adds ~2^-52 / h ~ 2e-10 absolute; allowed: 1e-6 relative +
    1e-9 absolute, while dx_phi/dlambda reaches >= 1e-4 in every sample, even at gamma = -10),
    and the jvp is per sample: moving one sample's gamma changes only its row."""
    model = small_model().eval()
    x = de.scale_pixels(torch.randint(0, 256, (3, 1, 8, 8)))
    gamma = torch.tensor([-10.0, 0.3, 4.0])
    assert encoder_y(model, x, gamma)[1].abs().mean() > 0.1, "dy/dgamma must be non-trivial"
    _, dx = model.encode(x, gamma, derivative=True)
    h = 1e-6
    fd = -(model.encode(x, gamma + h, False)[0] - model.encode(x, gamma - h, False)[0]) / (2 * h)
    assert (dx.abs().flatten(1).amax(1) > 1e-4).all()
    assert torch.allclose(dx, fd, rtol=1e-6, atol=1e-9)
    moved = model.encode(x, gamma + torch.tensor([0.0, 0.5, 0.0]), False)[0]
    same = model.encode(x, gamma, False)[0]
    assert torch.equal(moved[[0, 2]], same[[0, 2]]) and not torch.equal(moved[1], same[1])


def test_gradients_through_the_jvp_are_exact():
    """[DiffEnc: joint training] The encoder and its lambda-derivative, both from the single jvp,
    pass exact gradients to the encoder's parameters: torch.autograd.gradcheck (reverse-over-forward
    AD against finite differences, float64; fast mode: a random projection of the Jacobian) of
    (x_phi, dx_phi/dlambda) with respect to the output conv's weight and a time projection's
    weight."""
    model = small_model(image=(1, 4, 4)).eval()
    x = de.scale_pixels(torch.randint(0, 256, (2, 1, 4, 4)))
    gamma = torch.tensor([-3.0, 2.0])
    for name in ("conv_out", "down.0.0.temb"):
        layer = model.enc.get_submodule(name)
        weight = layer.weight

        def encode_with(w):  # model.encode with this layer's weight replaced by the tensor w
            del layer.weight
            layer.weight = w
            try:
                return model.encode(x, gamma, derivative=True)
            finally:
                del layer.weight
                layer.weight = weight
        w = weight.detach().clone().requires_grad_()
        assert torch.autograd.gradcheck(encode_with, (w,), eps=1e-6, atol=1e-6, fast_mode=True)


def test_the_full_loss_trains_every_encoder_parameter():
    """[DiffEnc: joint training] One backward pass of the bpd reaches every parameter of the
    encoder U-Net (through the diffusion term's y and dy/dgamma and the boundary terms; t = 0.3
    and 0.8 put one image at each end) with a gradient whose RMS is at least 1e-3 of the largest
    parameter tensor's (observed >= 0.05). A path that is cut in effect, such as the time
    embedding of a network whose GroupNorm erases it, gives ~1e-13 relative, not exactly 0."""
    model = small_model(image=(1, 4, 4))
    x_int = torch.randint(0, 256, (2, 1, 4, 4))
    terms = model(x_int, torch.tensor([0.3, 0.8]), torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4))
    de.bits_per_dim(terms, model.image_shape).mean().backward()
    rms = {name: p.grad.pow(2).mean().sqrt().item()
           for name, p in model.named_parameters() if p.grad is not None}
    largest = max(rms.values())
    for name, _ in model.enc.named_parameters():
        assert rms.get("enc." + name, 0) > 1e-3 * largest, name


@pytest.mark.parametrize("param", ["v", "eps"])
@pytest.mark.parametrize("T", [0, 10])
def test_learned_encoder_at_zero_init_gives_exactly_the_fixed_encoders_loss(param, T):
    """[DiffEnc: encoder; code: S3VA vs S4V_NT] The learned encoder's last conv is zero-initialised,
    so y = tanh(0) = 0 and its loss equals the fixed encoder's bit for bit (float32, the training
    dtype) on the same batch, t and eps, for both parameterisations and both loss kinds."""
    shape = (1, 8, 8)
    x_int = torch.randint(0, 256, (4, *shape), generator=torch.Generator().manual_seed(0))
    t, eps, eps_0 = de.draw_noise(0, 0, 4, shape)
    losses = {}
    torch.set_default_dtype(torch.float32)
    try:
        for encoder in ("learned", "fixed"):
            cfg = de.Config(encoder=encoder, param=param, T=T, **NET)
            torch.manual_seed(0)
            model = de.DiffEnc(cfg, shape)
            # The encoder draws from the RNG during construction, so give both models the same
            # score weights.
            torch.manual_seed(0)
            model.score.load_state_dict(de.DiffEnc(dataclasses.replace(cfg, encoder="none"),
                                                   shape).score.state_dict())
            losses[encoder] = torch.stack(model(x_int, t.float(), eps.float(), eps_0.float()))
    finally:
        torch.set_default_dtype(torch.float64)
    assert torch.equal(losses["learned"], losses["fixed"])


@pytest.mark.parametrize("T", [0, 10])
def test_v_nobase_is_v_without_the_base_measure_with_the_same_loss_at_equal_outputs(T):
    """[VDM: parameterisation] --param v-nobase differs from --param v only in the network: with
    the same weights its output is v's minus z_t (no base measure). Given the same v_hat the two
    models have the same loss bit for bit (continuous and T-step) and
    the same sampler, so the optimum is the same; the outputs read as eps would give another loss
    (checked, so that the equality is not trivial)."""
    shape = (1, 8, 8)
    x_int = torch.randint(0, 256, (4, *shape), generator=torch.Generator().manual_seed(0))
    t, eps, eps_0 = de.draw_noise(0, 0, 4, shape)
    models = {}
    for param in ("v", "v-nobase", "eps"):
        torch.manual_seed(0)
        models[param] = de.DiffEnc(de.Config(param=param, T=T, **NET), shape)
        for p in models[param].score.conv_out.parameters():   # not zero, as after training
            torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(1))
    z, gamma = torch.randn(4, *shape, dtype=torch.float64), torch.linspace(-5, 5, 4)
    v_hat = models["v"].score(z, gamma)
    assert torch.equal(models["v-nobase"].score(z, gamma) + z, v_hat)
    assert (v_hat - z).abs().max() > 1e-2                     # the base measure is not nothing
    same = models["v"].score.forward                          # every model gets the v net's v_hat
    for param in ("v-nobase", "eps"):
        models[param].score.forward = same
    loss = {p: torch.stack(m(x_int, t, eps, eps_0)) for p, m in models.items()}
    assert torch.equal(loss["v-nobase"], loss["v"])
    assert not torch.allclose(loss["eps"], loss["v"], rtol=1e-3)
    draws = {p: de.sample(models[p], 2, 5, seed=0)[0] for p in ("v", "v-nobase")}
    assert torch.equal(draws["v"], draws["v-nobase"])


@given(seed=SEEDS)
def test_encoder_starts_at_the_data_and_stays_bounded(seed):
    """[DiffEnc: encoder] x_phi(lambda_0) = x + sigma_0^2 (y - x), so |x_phi(0) - x| <= 2 sigma_0^2
    = 3.3e-6 (|x|, |y| <= 1); and since y in (-1, 1), |x_phi| <= 1 at every t."""
    model = small_model()
    x = de.scale_pixels(torch.randint(0, 256, (2, 1, 8, 8),
                                      generator=torch.Generator().manual_seed(seed)))
    gammas = SCHEDULE(torch.tensor([0.0, 0.3, 0.7, 1.0]))
    sigma2_0 = torch.sigmoid(gammas[0]).item()
    x0 = model.encode(x, gammas[0].expand(2), False)[0]
    assert (x0 - x).abs().max().item() <= 2 * sigma2_0
    for g in gammas:
        assert model.encode(x, g.expand(2), False)[0].abs().max().item() <= 1


# ------------------------------------------------------------------------------------ 3. networks


PRESET_SHAPES = [(size, data) for size in ("tiny", "small", "large")
                 for data in ("mnist", "cifar10")]


@pytest.mark.parametrize("size, dataset", PRESET_SHAPES)
def test_every_preset_sees_gamma_in_the_score_network_and_the_encoder(size, dataset, float32):
    """[architecture] With every zero-initialised layer given random weights, the score network's
    output and the encoder's y change with gamma for every preset and image shape: between
    gamma = -10 and gamma = 3 they move by > 5% of their size. (A GroupNorm with one channel per
    group subtracts the time embedding, a per-channel constant, exactly: the change was 1e-6 at
    the old `tiny`.) float32, as users train."""
    cfg = de.Config(**{**de.PRESETS[size], "size": size, "dataset": dataset})
    torch.manual_seed(0)
    model = randomize(de.DiffEnc(cfg, de.IMAGE_SHAPES[dataset])).eval()
    x = de.scale_pixels(torch.randint(0, 256, (1, *de.IMAGE_SHAPES[dataset]))).expand(2, -1, -1, -1)
    z, gamma = torch.randn_like(x[:1]).expand(2, -1, -1, -1), torch.tensor([-10.0, 3.0])
    with torch.no_grad():
        out, y = model.score(z, gamma) - z, model.enc(x, gamma)
    assert (out[0] - out[1]).abs().mean() > 0.05 * out.abs().mean()
    assert (y[0] - y[1]).abs().mean() > 0.05 * y.abs().mean()


def test_a_group_norm_with_one_channel_per_group_is_refused():
    """[architecture; no silent fallback] A GroupNorm whose groups would hold one channel (or do
    not divide the channels) is an error at construction that names the flags to change."""
    for kw in (dict(n_embd=32, norm_groups=32), dict(enc_ch=16, norm_groups=16),
               dict(enc_ch=16, enc_norm_groups=16), dict(n_embd=24, norm_groups=16)):
        cfg = de.Config(**{**NET, **kw})
        with pytest.raises(de.DiffEncError, match="--norm-groups"):
            de.DiffEnc(cfg, (1, 8, 8))


@pytest.mark.parametrize("L", [0, 1, 2])
def test_the_score_unet_halves_l_times_to_its_middle_and_every_layer_reaches_the_output(L):
    """[architecture] --downsample L: the score network's middle (its attention) runs on
    (B, n 2^L, H / 2^L, W / 2^L), L = 0 being VDM's single resolution with no resampling layer;
    the output has the input's shape and dtype (float64); with every zero-initialised layer given
    random weights, every parameter gets a non-zero gradient (no layer is built and left out of
    the forward, no skip is dropped) and the output moves with gamma by > 5 % of its size."""
    shape = (1, 8, 8)
    torch.manual_seed(0)
    net = randomize(de.ScoreUNet(de.Config(**{**NET, "dropout": 0.0, "downsample": L}), shape))
    assert len(net.halve) == len(net.upsample) == L
    seen = []
    net.attn.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0].shape))
    z = torch.randn(2, *shape, generator=seeded(1))
    out = net(z, torch.tensor([-10.0, 3.0])) - z
    assert seen == [(2, NET["n_embd"] * 2 ** L, 8 // 2 ** L, 8 // 2 ** L)]
    assert out.shape == z.shape and out.dtype == torch.float64
    assert (out[0] - out[1]).abs().mean() > 0.05 * out.abs().mean()
    out.square().sum().backward()
    dead = [name for name, p in net.named_parameters() if p.grad is None or not p.grad.any()]
    assert not dead, dead


def graph_nodes(y):
    """The names of every node of the autograd graph that produced y."""
    seen, todo = set(), [y.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and node not in seen:
            seen.add(node)
            todo.extend(next_fn for next_fn, _ in node.next_functions)
    return {node.name() for node in seen}


def test_fused_attention_gives_the_plain_attentions_loss_and_gradients():
    """[architecture; speed without new maths] The score network's attention in the 4-D form
    that PyTorch's fused kernel takes gives the loss and every gradient of the plain
    softmax(q k^T / sqrt(C)) v form to float64 rounding, and the fused kernel really runs (its
    backward is in the autograd graph; not so for the plain form). It matters here: its output
    projection is randomized, and its weights get non-zero gradients. Tolerance: 1e-11 of each
    gradient tensor's largest entry (close_to_scale). A gradient entry sums over the batch, the
    pixels and the channels (4 x 64 x 8 products here); the two kernels sum them in different
    orders (another order on AVX-512 than on AVX2), so they differ by ~1e-15 of the tensor's scale
    (5e-15 measured on AVX-512), and an entry near 0 differs by that much too: per-entry relative
    tolerances fail there. A wrong scale (1/C for 1/sqrt(C)) moves them by ~1e-2."""
    model = randomize(small_model(image=(1, 8, 8)).double())
    x = torch.randint(0, 256, (4, 1, 8, 8))
    t, eps, eps_0 = (a.double() for a in de.draw_noise(0, 1, 4, (1, 8, 8)))
    runs = {}
    for fused in (True, False):
        model.score.attn.fused = fused
        model.zero_grad()
        loss = de.bits_per_dim(list(model(x, t, eps, eps_0)), (1, 8, 8)).mean()
        assert any("FlashAttention" in name for name in graph_nodes(loss)) == fused
        loss.backward()
        runs[fused] = (loss, [p.grad.clone() for p in model.parameters() if p.grad is not None])
    (loss_f, grads_f), (loss_p, grads_p) = runs[True], runs[False]
    assert torch.allclose(loss_f, loss_p, rtol=1e-11, atol=0)
    assert all(close_to_scale(a, b, 1e-11) for a, b in zip(grads_f, grads_p))
    assert model.score.attn.qkv.weight.grad.abs().max() > 1e-3


# -------------------------------------------------------------- 4. losses: discrete -> continuous


@pytest.mark.parametrize("increment", ["euler", "exp"])
def test_discrete_loss_converges_to_continuous_at_first_order(L_inf, increment):
    """[DiffEnc: diffusion loss; --increment] The T-step loss L_T tends to the continuous-time loss
    L_inf at first order, from above: L_T = L_inf + c/T + O(1/T^2), so (L_T - L_inf)/(L_2T -
    L_inf) -> 2, for the Euler increment and for `exp` alike (the two agree to first order in the
    step, so they share L_inf; only c differs).

    Exact expectations (toy); the ratio's deviation from 2 is O(1/T) with a constant below 10 here
    (second-order term), hence [1.9, 2.1] for T >= 1000 and a tightening between consecutive ratios.
    """
    L = {T: float(toy_step_kls(T, increment).sum()) for T in (1000, 2000, 4000, 8000)}
    gaps = [L[T] - L_inf for T in sorted(L)]
    assert all(g > 0 for g in gaps), "L_T must approach L_inf from above"
    ratios = [a / b for a, b in zip(gaps, gaps[1:])]
    print(f"\nL_inf = {L_inf:.6f}; L_T = {L}; ratios = {ratios}")
    assert all(1.9 < r < 2.1 for r in ratios)
    assert abs(ratios[-1] - 2) < abs(ratios[0] - 2), "the ratio must approach 2 as T grows"


def point_mass_model(increment, m):
    """A fixed-encoder DiffEnc (x_phi = alpha^2 x) on 4x4 images whose data is the point mass x = m
    in every pixel, with its exact denoiser: x_hat = x_phi(t) = alpha_t^2 m for every z_t."""
    model = small_model("fixed", image=(1, 4, 4), increment=increment).eval()
    model.score = GaussianDenoiser(m, 0.0, "fixed")
    return model


def point_mass_step_kls(model, T, m):
    """KL_i of each step i = 1..T of the point-mass model (T,): _discrete at the steps' middles
    (any eps: with an exact x_hat of a point mass the KL does not depend on it) over T."""
    model.cfg.T = T
    t = (torch.arange(T) + 0.5) / T
    x = torch.full((T, 1, 4, 4), m)
    return model._discrete(x, t, torch.randn(T, 1, 4, 4, generator=seeded(T))) / T


def test_the_exp_increment_is_exact_for_the_fixed_encoder_and_euler_costs_one_over_T_squared():
    """[DiffEnc: increment model, --increment] Fixed encoder, exact denoiser of a point mass x = m
    (d = 16). The `exp` step predicts x_phi(s) - x_phi(t) = (alpha_s^2 - alpha_t^2) m exactly, so
    every step's KL is 0 for every T (below 1e-20 nats: float64 rounding of O(1) numbers, squared;
    Euler's largest KL_i is > 1e-6 even at T = 400). Euler's increment misses by x_hat (sigma_s^2
    expm1(D) - sigma_t^2 D) = x_hat D^2 sigma_t^2 (1/2 - alpha_t^2) + O(D^3), D = gamma_t -
    gamma_s = gamma'/T; with KL_i = 1/2 SNR_s ||miss||^2 / kappa, kappa = D + O(D^2), that is
        KL_i = 1/2 D^3 alpha_t^6 sigma_t^2 (1/2 - alpha_t^2)^2 d m^2 (1 + O(1/T))   ~ 1/T^3,
        L_T = sum_i KL_i = C / T^2 (1 + O(1/T)),
        C = gamma'^2 / 2 d m^2 int alpha^6 sigma^2 (1/2 - alpha^2)^2 dgamma   (-13.3 to 5).
    Checked: T^2 L_T / C and T^3 KL_i / its formula (the step that ends at t = 1/2) tend to 1,
    their distance to 1 halving as T doubles (200, 400, 800: ratios in (1.8, 2.2)), and within
    6% at T = 800."""
    m, d, slope = 0.5, 16, 18.3
    euler, exp = point_mass_model("euler", m), point_mass_model("exp", m)
    for T in (1, 2, 5, 10, 100, 400):
        kl_exp, kl_euler = point_mass_step_kls(exp, T, m), point_mass_step_kls(euler, T, m)
        assert kl_exp.abs().max() < 1e-20 and kl_euler.max() > 1e-6, (T, kl_exp, kl_euler)
    f = lambda g: (torch.sigmoid(-g) ** 3 * torch.sigmoid(g) * (0.5 - torch.sigmoid(-g)) ** 2)
    nodes, weights = gauss_legendre(panels=400)
    C = slope ** 2 / 2 * d * m ** 2 * slope * (f(-13.3 + slope * nodes) * weights).sum()
    gamma_half = torch.tensor(-13.3 + slope / 2)
    errors = {}
    for T in (200, 400, 800):
        kls = point_mass_step_kls(euler, T, m)
        step_half = 0.5 * (slope / T) ** 3 * f(gamma_half) * d * m ** 2
        errors[T] = (T ** 2 * kls.sum() / C - 1, kls[T // 2 - 1] / step_half - 1)
    print(f"\nEuler, point mass: (T^2 L_T / C - 1, T^3 KL_i / formula - 1) = {errors}")
    for a, b in ((200, 400), (400, 800)):
        assert all(1.8 < ea / eb < 2.2 for ea, eb in zip(errors[a], errors[b]))
    assert all(abs(e) < 0.06 for e in errors[800])


def test_each_step_of_the_discrete_loss_tends_to_the_continuous_integrand_with_real_networks():
    """[DiffEnc: diffusion loss] With the real U-Nets (float64, randomized so that y, dy/dgamma and
    v_hat - z are non-trivial), T times the KL of the step [t, t + 1/T) tends to the continuous
    integrand at t at first order: the gap shrinks 4x when T grows 4x (ratios in
    (3, 5): the O(1/T^2) remainder is a few percent here). This is L_T -> L_inf step by step, and
    it ties the encoder's exact increment (x_s - x_t)/kappa on the discrete side to the jvp's
    dx_phi/dlambda on the continuous side, so a wrong sign or a dropped dy/dgamma breaks it.
    The T are large because both networks embed time as sin(1000 t f), f up to 1, which makes the
    integrand oscillate with period ~0.006 in t; first order sets in once 1/T is well below that."""
    model = randomize(small_model(image=(1, 4, 4))).eval()
    x = de.scale_pixels(torch.randint(0, 256, (2, 1, 4, 4), generator=seeded(0)))
    eps = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.05, 0.37])
    with torch.no_grad():
        dy_dgamma = encoder_y(model, x, model.schedule(t))[1]
        assert dy_dgamma.abs().mean() > 0.1, "dy/dgamma must be non-trivial"
        gaps = []
        for T in (2 ** 14, 2 ** 16, 2 ** 18):
            model.cfg.T = T
            t_T = torch.round(t * T) / T                          # a step starts exactly at t_T
            gaps.append(model._discrete(x, t_T, eps) - model._continuous(x, t_T, eps))
    ratios = [(a / b).tolist() for a, b in zip(gaps, gaps[1:])]
    print(f"\nT KL_i - integrand at T = 4^7, 4^8, 4^9: {[g.tolist() for g in gaps]}; "
          f"ratios {ratios}")
    assert all(3 < r < 5 for pair in ratios for r in pair)


@pytest.mark.parametrize("increment", ["euler", "exp"])
def test_discrete_loss_equals_kl_between_reverse_processes(increment):
    """[DiffEnc: reverse process] diffusion_loss_discrete (the float32-stable closed form) equals
    ||mu_Q - mu_P||^2 / (2 sigma_Q^2) built from q_reverse and p_reverse, step by step, for both
    increment models (float64, relative 1e-9: the two differ only in rounding), and the two
    increments give different losses (each is really used)."""
    for T in (10, 300):
        gap, var_q = toy_mean_gaps(T, increment)
        direct = (gap ** 2 / (2 * var_q)).mean(dim=(1, 2))
        assert torch.allclose(toy_step_kls(T, increment), direct, rtol=1e-9, atol=0)
    other = {"euler": "exp", "exp": "euler"}[increment]
    assert (toy_step_kls(10, increment) - toy_step_kls(10, other)).abs().max() > 1e-3


@pytest.mark.parametrize("increment", ["euler", "exp"])
def test_discrete_loss_is_T_times_the_kl_of_the_step_that_contains_t(increment):
    """[DiffEnc: diffusion loss] DiffEnc._discrete at t is T * KL(q(z_s|z_t,x) || p(z_s|z_t)) for
    the step [s, t_i) = [(i-1)/T, i/T) that contains t, and t = 1 belongs to the last step T
    (never to a step T + 1 beyond gamma_max). The KL is built here from q_reverse, p_reverse (with
    the increment given to the model by --increment) and the model's own encoder and score
    network (float64, randomized networks, relative 1e-9: rounding), so the step index, the step
    count T and the increment are all pinned: the bound scores the step that the sampler takes
    (p_reverse)."""
    T, shape = 7, (1, 4, 4)
    model = randomize(small_model(image=shape, increment=increment, T=T)).eval()
    t = torch.tensor([0.0, 0.2, 0.5, 0.99, 1.0])
    steps = torch.tensor([1, 2, 4, 7, 7])                     # floor(t T) + 1, and T for t = 1
    gen = torch.Generator().manual_seed(0)
    x_int = torch.randint(0, 256, (5, *shape), generator=gen)
    eps = torch.randn(5, *shape, generator=gen)
    x_int[4], eps[4] = x_int[3], eps[3]                       # t = 0.99 and t = 1: the same step
    x = de.scale_pixels(x_int)
    with torch.no_grad():
        loss = model._discrete(x, t, eps)
        gamma_s, gamma_t = model.schedule((steps - 1) / T), model.schedule(steps / T)
        x_enc_s, _ = model.encode(x, gamma_s, False)
        x_enc_t, _ = model.encode(x, gamma_t, False)
        g_s, g_t = gamma_s.view(-1, 1, 1, 1), gamma_t.view(-1, 1, 1, 1)
        alpha_t, sigma_t = de.alpha_sigma(g_t)
        z_t = alpha_t * x_enc_t + sigma_t * eps
        x_hat = de.predict_x(model.score(z_t, gamma_t), z_t, alpha_t, sigma_t, "v")
        mu_q, var_q = de.q_reverse(z_t, x_enc_s, x_enc_t, g_s, g_t)
        mu_p, _ = de.p_reverse(z_t, x_hat, g_s, g_t, increment)
    expected = T * ((mu_q - mu_p) ** 2 / (2 * var_q)).flatten(1).sum(1)
    assert torch.allclose(loss, expected, rtol=1e-9, atol=0)
    assert loss[3].item() == pytest.approx(loss[4].item(), rel=1e-12) and (expected > 1).all()


def test_training_with_dropout_uses_one_encoder_mask_for_both_ends_of_a_step():
    """[DiffEnc: diffusion loss; deviation: one dropout mask] In training mode with encoder
    dropout 0.5, the T-step loss divides x_phi(s) - x_phi(t) by kappa ~ 18/T. Both ends use the
    same dropout mask, so the step's T * KL tends to the continuous integrand evaluated with that
    mask as T grows (the gap shrinks by > 2.5x per 4x T; first order predicts 4x). With two masks
    the difference would be dropout noise of size ~1 divided by 18/T: a loss growing as T^2."""
    shape = (1, 8, 8)
    model = small_model(image=shape, enc_dropout=0.5).train()
    x = de.scale_pixels(torch.randint(0, 256, (2, *shape), generator=seeded(0)))
    eps = torch.randn(2, *shape, generator=torch.Generator().manual_seed(1))
    gaps = []
    for T in (1000, 4000, 16000):
        model.cfg.T = T
        t = torch.round(torch.tensor([0.9, 0.5]) * T) / T
        torch.manual_seed(5)
        discrete = model._discrete(x, t, eps)
        torch.manual_seed(5)                                  # the same mask for the jvp's call
        gaps.append((discrete - model._continuous(x, t, eps)).abs().detach())
    print(f"\n|T KL_i - integrand| in training mode, T = 1000, 4000, 16000: "
          f"{[g.tolist() for g in gaps]}")
    assert all((a > 2.5 * b).all() for a, b in zip(gaps, gaps[1:]))


# -------------------------------------------- 4. losses: reverse encoder and loss algebra (sympy)


@given(g_s=st.floats(-13.3, 4.9), dg=st.floats(1e-3, 10.0), x_s=PIXELS, x_t=PIXELS)
def test_reverse_encoder_reproduces_the_marginals(g_s, dg, x_s, x_t):
    """[DiffEnc: reverse process] z_t ~ N(alpha_t x_phi(t), sigma_t^2) pushed through q(z_s|z_t, x)
    has mean alpha_s x_phi(s) and variance sigma_s^2, for any two encoder outputs (1e-12: rounding).
    """
    g_s, g_t = torch.tensor(g_s), torch.tensor(g_s + dg)
    xs, xt = torch.tensor(x_s), torch.tensor(x_t)
    (alpha_s, sigma_s), (alpha_t, sigma_t) = de.alpha_sigma(g_s), de.alpha_sigma(g_t)
    slope, intercept = linear_coefficients(lambda z: de.q_reverse(z, xs, xt, g_s, g_t)[0])
    var_q = de.q_reverse(torch.tensor(0.0), xs, xt, g_s, g_t)[1]
    assert (slope * alpha_t * xt + intercept).item() == pytest.approx((alpha_s * xs).item(),
                                                                      abs=1e-12)
    assert (slope ** 2 * sigma_t ** 2 + var_q).item() == pytest.approx((sigma_s ** 2).item(),
                                                                       rel=1e-12)


def test_reverse_encoder_marginals_hold_along_a_whole_chain():
    """[DiffEnc: reverse process] Running the 40-step reverse encoder from q(z_1|x) with the toy
    encoder keeps every marginal N(alpha_t x_phi(t), sigma_t^2) (1e-12: accumulated rounding)."""
    x = torch.tensor([0.37])
    t = torch.linspace(1, 0, 41)
    gammas = SCHEDULE(t)
    x_encs = [toy_encode(x, g.view(1), derivative=False)[0][0] for g in gammas]
    alpha_1, sigma_1 = de.alpha_sigma(gammas[0])
    mean, var = alpha_1 * x_encs[0], sigma_1 ** 2
    for k in range(1, 41):
        slope, intercept = linear_coefficients(lambda z: de.q_reverse(z, x_encs[k], x_encs[k - 1],
                                                                      gammas[k], gammas[k - 1])[0])
        var_q = de.q_reverse(torch.tensor(0.0), x_encs[k], x_encs[k - 1], gammas[k],
                             gammas[k - 1])[1]
        mean, var = slope * mean + intercept, slope ** 2 * var + var_q
        alpha, sigma = de.alpha_sigma(gammas[k])
        assert mean.item() == pytest.approx((alpha * x_encs[k]).item(), abs=1e-12)
        assert var.item() == pytest.approx((sigma ** 2).item(), rel=1e-12, abs=1e-15)


def test_step_kl_tends_to_the_continuous_integrand_symbolically():
    """[DiffEnc: diffusion loss] sympy: with mu_Q, mu_P, sigma_Q as defined in diffenc's section 4,
    (i) ||mu_Q - mu_P||^2 / (2 sigma_Q^2) = 1/2 (SNR_s - SNR_t) ||x_t - x_hat + [(x_s - x_t) -
    (lambda_s - lambda_t) sigma_t^2 x_hat] / kappa||^2 exactly, and (ii) to first order in the step
    h = lambda_s - lambda_t the bracket / kappa -> dx_phi/dlambda - sigma_t^2 x_hat, so KL_i ->
    1/2 (SNR_s - SNR_t) ||x_phi + dx_phi/dlambda - (1 + sigma_t^2) x_hat||^2."""
    lam, h, z, xh = sp.symbols("lambda h z x_hat", real=True)
    f = sp.Function("x_phi")
    sig2 = lambda l: 1 / (1 + sp.exp(l))  # sigma^2 = sigmoid(gamma) = sigmoid(-lambda)
    alp = lambda l: sp.sqrt(1 - sig2(l))
    snr = lambda l: sp.exp(l)
    lam_s = lam + h
    kappa = 1 - snr(lam) / snr(lam_s)
    coef = alp(lam_s) / alp(lam) * snr(lam) / snr(lam_s)
    mu_q = coef * z + alp(lam_s) * kappa * f(lam) + alp(lam_s) * (f(lam_s) - f(lam))
    mu_p = coef * z + alp(lam_s) * kappa * xh + alp(lam_s) * h * sig2(lam) * xh
    var_q = kappa * sig2(lam_s)
    bracket = f(lam) - xh + ((f(lam_s) - f(lam)) - h * sig2(lam) * xh) / kappa
    closed = sp.Rational(1, 2) * (snr(lam_s) - snr(lam)) * bracket ** 2
    assert sp.simplify((mu_q - mu_p) ** 2 / (2 * var_q) - closed) == 0
    limit = sp.series(bracket, h, 0, 1).removeO().doit()
    assert sp.simplify(limit - (f(lam) + sp.diff(f(lam), lam) - (1 + sig2(lam)) * xh)) == 0


def test_v_form_and_x_form_of_the_continuous_loss_agree_symbolically():
    """[DiffEnc: diffusion loss; code: sigma3_v_approx_model.py] sympy: for x_phi = alpha^2 x +
    sigma^2 y(gamma), the official code's v-form 1/2 gamma' alpha^2 ||(1 + sigma^2)(v - v_hat) +
    sigma (y + dy/dgamma)||^2 equals the x-form 1/2 gamma' SNR ||x_phi + dx_phi/dlambda - (1 +
    sigma^2) x_hat||^2, with z = alpha x_phi + sigma eps, v = alpha eps - sigma x_phi, x_hat =
    alpha z - sigma v_hat. Written in alpha, sigma with d(sigma^2)/dgamma = alpha^2 sigma^2 and
    alpha^2 = 1 - sigma^2 (the variance-preserving constraint) so that sympy simplifies it fast."""
    a, s = sp.symbols("alpha sigma", positive=True)
    x, eps, vh, y, dy = sp.symbols("x epsilon v_hat y dy_dgamma", real=True)
    x_phi = a ** 2 * x + s ** 2 * y
    dx_dlam = -(-a ** 2 * s ** 2 * x + a ** 2 * s ** 2 * y + s ** 2 * dy)  # -d/dgamma of x_phi
    z = a * x_phi + s * eps
    v = a * eps - s * x_phi
    x_hat = a * z - s * vh
    v_form = a ** 2 * ((1 + s ** 2) * (v - vh) + s * (y + dy)) ** 2
    # SNR = alpha^2 / sigma^2
    x_form = a ** 2 / s ** 2 * (x_phi + dx_dlam - (1 + s ** 2) * x_hat) ** 2
    assert sp.simplify(sp.expand(v_form - x_form).subs(a, sp.sqrt(1 - s ** 2))) == 0


@given(seed=SEEDS, gamma=GAMMAS, param=st.sampled_from(["v", "eps"]))
def test_continuous_loss_equals_the_official_v_form(seed, gamma, param):
    """[code: sigma3_v_approx_model.py] diffenc.diffusion_loss_continuous, fed by encoder_mean,
    predict_x and scaled_error, equals the official code's v-form 1/2 gamma' alpha^2 ||v - v_hat +
    sigma (x_hat - x_phi + y + dy/dgamma)||^2 for the learned encoder, with either
    parameterisation (relative 1e-8: float64 rounding amplified by SNR up to 6e5)."""
    gen = torch.Generator().manual_seed(seed)
    x, y, dy, eps, out = (torch.rand(3, 5, generator=gen) * 2 - 1 for _ in range(5))
    g = torch.full((3, 1), gamma)
    alpha, sigma = de.alpha_sigma(g)
    x_enc, dx_enc = de.encoder_mean("learned", x, g, y, dy)
    z = alpha * x_enc + sigma * eps
    x_hat = de.predict_x(out, z, alpha, sigma, param)
    err = de.scaled_error(out, eps, x_enc, alpha, sigma, param)
    ours = de.diffusion_loss_continuous(18.3, alpha, sigma, err, dx_enc, sigma ** 2 * x_hat)
    v = alpha * eps - sigma * x_enc
    # the v-prediction behind x_hat: x_hat = alpha z - sigma v_hat
    v_hat = (alpha * z - x_hat) / sigma
    official = 0.5 * 18.3 * (alpha ** 2 * (v - v_hat + sigma * (x_hat - x_enc + y + dy)) ** 2
                             ).sum(1)
    assert torch.allclose(ours, official, rtol=1e-8, atol=1e-12)


@given(seed=SEEDS, gamma=GAMMAS)
def test_plain_vdm_loss_is_the_same_in_eps_and_v_form(seed, gamma):
    """[VDM] For encoder `none`, the continuous loss is 1/2 gamma' ||eps - eps_hat||^2 with an
    eps-network and 1/2 gamma' alpha^2 ||v - v_hat||^2 with a v-network, and the two agree when
    both networks imply the same x_hat (relative 1e-9: rounding)."""
    gen = torch.Generator().manual_seed(seed)
    x, eps, eps_hat = (torch.rand(2, 6, generator=gen) * 2 - 1 for _ in range(3))
    g = torch.full((2, 1), gamma)
    alpha, sigma = de.alpha_sigma(g)
    x_enc, dx_enc = de.encoder_mean("none", x, g)
    z = alpha * x_enc + sigma * eps
    # same x_hat, v-space
    v_hat = alpha * eps_hat - sigma * de.predict_x(eps_hat, z, alpha, sigma, "eps")
    losses = {}
    for param, out in (("eps", eps_hat), ("v", v_hat)):
        err = de.scaled_error(out, eps, x_enc, alpha, sigma, param)
        losses[param] = de.diffusion_loss_continuous(2.0, alpha, sigma, err, dx_enc,
                                                     torch.zeros_like(x))
    # 1/2 * gamma' (= 2) * ||.||^2
    assert torch.allclose(losses["eps"], (eps - eps_hat).pow(2).sum(1), rtol=1e-9)
    assert torch.allclose(losses["v"], losses["eps"], rtol=1e-9)


@given(seed=SEEDS, gamma=GAMMAS)
def test_v_prediction_trains_its_output_alpha_times_more_weakly_than_eps_prediction(seed, gamma):
    """[learning speed, README "v- or eps-prediction"] For the same x_hat the two parameterisations
    have the same loss, but the gradient that reaches the network's output is alpha_t times
    smaller with v-prediction (err = alpha (v_hat - v) against err = eps_hat - eps), and a unit
    step of v_hat moves x_hat by sigma where one of eps_hat moves it by sigma/alpha: in x_hat's
    terms the v-network learns with rate alpha^2 relative to the eps-network, 0.007 at gamma = 5.
    This is why v-prediction starts slower at high noise and small learning rates (1e-10, of the
    loss and of the gradient's largest entry: elementwise rounding)."""
    gen = torch.Generator().manual_seed(seed)
    x, eps, eps_hat = (torch.rand(3, 5, generator=gen) * 2 - 1 for _ in range(3))
    g = torch.full((3, 1), gamma)
    alpha, sigma = de.alpha_sigma(g)
    z = alpha * x + sigma * eps
    x_hat = de.predict_x(eps_hat, z, alpha, sigma, "eps")
    # the v-prediction of that x_hat
    v_hat = alpha * eps_hat - sigma * x_hat
    grads, losses = {}, {}
    for param, out in (("eps", eps_hat), ("v", v_hat)):
        out = out.clone().requires_grad_()
        err = de.scaled_error(out, eps, x, alpha, sigma, param)
        losses[param] = de.diffusion_loss_continuous(18.3, alpha, sigma, err, 0, 0)
        grads[param], = torch.autograd.grad(losses[param].sum(), out)
    assert torch.allclose(losses["v"], losses["eps"], rtol=1e-10)
    assert close_to_scale(grads["v"], alpha * grads["eps"], 1e-10)


# ----------------------------------------------- 4. losses: the ELBO chain and the variance ratio


def gaussian_chain(first_mean, first_var, steps):
    """Joint mean and covariance of z_T, z_{T-1}, ..., z_0 for z_T ~ N(first_mean, first_var) and
    z_{k-1} = a_k z_k + b_k + N(0, v_k), steps = [(a_k, b_k, v_k)] in that order."""
    n = len(steps) + 1
    mean, cov = torch.zeros(n), torch.zeros(n, n)
    mean[0], cov[0, 0] = first_mean, first_var
    for k, (a, b, v) in enumerate(steps, start=1):
        mean[k] = a * mean[k - 1] + b
        cov[k, :k] = a * cov[k - 1, :k]
        cov[:k, k] = cov[k, :k]
        cov[k, k] = a * a * cov[k - 1, k - 1] + v
    return mean, cov


def linear_coefficients(fn):
    """(slope, intercept) of a function that is affine in its scalar argument."""
    at0, at1 = fn(torch.tensor(0.0)), fn(torch.tensor(1.0))
    return at1 - at0, at0


@pytest.mark.parametrize("T, w", [(5, 1.0), (20, 1.0), (20, 0.8)])
def test_elbo_is_prior_kl_plus_sum_of_step_kls(T, w):
    """[DiffEnc: ELBO] KL(q(z_0..z_1 | x) || p(z_0..z_1)) between the joint Gaussians of a 1-D
    chain, computed from covariance matrices, equals KL(q(z_1|x) || p(z_1)) + sum_i E_q(z_t|x) KL_i,
    the per-step KLs from diffenc.q_reverse / p_reverse / gaussian_kl (relative 1e-8: conditioning
    of the 21x21 covariances). Model x_hat = 0.8 alpha_t z + 0.1 cos 2t, sigma_P^2 = sigma_Q^2 / w.
    """
    x = torch.tensor([0.37])
    t = torch.linspace(1, 0, T + 1)                                      # t_T = 1, ..., t_0 = 0
    gammas = SCHEDULE(t)
    x_encs = [toy_encode(x, g.view(1), derivative=False)[0][0] for g in gammas]
    alpha_1, sigma_1 = de.alpha_sigma(gammas[0])
    q_steps, p_steps, step_kls = [], [], 0.0
    for k in range(1, T + 1):
        g_t, g_s = gammas[k - 1], gammas[k]
        x_hat = lambda z: 0.8 * de.alpha_sigma(g_t)[0] * z + 0.1 * torch.cos(2 * t[k - 1])
        q_mean = lambda z: de.q_reverse(z, x_encs[k], x_encs[k - 1], g_s, g_t)[0]
        p_mean = lambda z: de.p_reverse(z, x_hat(z), g_s, g_t, "euler")[0]
        a_q, b_q = linear_coefficients(q_mean)
        a_p, b_p = linear_coefficients(p_mean)
        var_q = de.q_reverse(torch.tensor(0.0), x_encs[k], x_encs[k - 1], g_s, g_t)[1]
        q_steps.append((a_q, b_q, var_q))
        p_steps.append((a_p, b_p, var_q / w))
        alpha_t, sigma_t = de.alpha_sigma(g_t)
        for e in (-1.0, 1.0):  # E over z_t ~ N(alpha_t x_t, sigma_t^2): KL_i is quadratic in z_t
            z = alpha_t * x_encs[k - 1] + sigma_t * e
            mu_q, v_q = de.q_reverse(z, x_encs[k], x_encs[k - 1], g_s, g_t)
            mu_p, v_p = de.p_reverse(z, x_hat(z), g_s, g_t, "euler")
            step_kls += de.gaussian_kl(mu_q, v_q, mu_p, v_p / w) / 2
    mq, cq = gaussian_chain(alpha_1 * x_encs[0], sigma_1 ** 2, q_steps)
    mp, cp = gaussian_chain(torch.tensor(0.0), torch.tensor(1.0), p_steps)
    cp_inv = torch.linalg.inv(cp)
    joint = 0.5 * (torch.trace(cp_inv @ cq) + (mp - mq) @ cp_inv @ (mp - mq) - (T + 1)
                   + torch.logdet(cp) - torch.logdet(cq))
    prior = de.gaussian_kl(alpha_1 * x_encs[0], sigma_1 ** 2, torch.tensor(0.0), torch.tensor(1.0))
    assert joint.item() == pytest.approx((prior + step_kls).item(), rel=1e-8)


def golden_min(f, lo, hi, iters=200):
    """Minimise a unimodal f on [lo, hi] by golden-section search (a generic numerical minimiser).
    """
    r = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    for _ in range(iters):
        c, d = b - r * (b - a), a + r * (b - a)
        a, b = (a, d) if f(c) < f(d) else (c, b)
    return (a + b) / 2


@given(var_q=st.floats(1e-4, 10.0), d=st.integers(1, 64), scale=st.floats(1e-3, 3.0), seed=SEEDS)
def test_optimal_sigma_p2_minimises_the_expected_step_kl(var_q, d, scale, seed):
    """[DiffEnc: variance ratio] For a finite step, the sigma_P^2 minimising E KL(N(mu_Q, sigma_Q^2
    I) || N(mu_P, sigma_P^2 I)) is sigma_Q^2 + E||mu_Q - mu_P||^2 / d. The expected KL is built from
    diffenc.gaussian_kl over 8 random mean gaps and minimised numerically over log sigma_P^2;
    tolerance 1e-6 relative is what 200 golden-section steps in double precision reach."""
    # mu_Q - mu_P samples
    gaps = torch.randn(8, d, generator=torch.Generator().manual_seed(seed)) * scale
    vq = torch.tensor(var_q)
    var_p = lambda log_vp: torch.exp(torch.tensor(log_vp))
    expected_kl = lambda log_vp: de.gaussian_kl(gaps, vq, torch.zeros(()), var_p(log_vp)
                                                ).sum(1).mean().item()
    numeric = math.exp(golden_min(expected_kl, math.log(var_q) - 5,
                                  math.log(var_q + 10 * scale ** 2) + 5))
    formula = de.optimal_sigma_p2(vq, gaps.pow(2).sum(1).mean() / d).item()
    assert formula == pytest.approx(numeric, rel=1e-6)


@given(A=st.floats(1e-6, 1e3), d=st.integers(1, 4096))
def test_optimal_weight_and_its_kl(A, d):
    """[DiffEnc: variance ratio] Minimising KL(w) = d/2 (w - 1 - log w) + w A (weighted_step_kl)
    over w gives w* = d / (d + 2A) and the value d/2 log(1 + 2A/d) <= A: the optimal variance never
    does worse than sigma_P = sigma_Q. Tolerance as above (numerical minimiser)."""
    w = lambda log_w: torch.exp(torch.tensor(log_w))
    kl = lambda log_w: de.weighted_step_kl(torch.tensor(A), w(log_w), d).item()
    w_num = math.exp(golden_min(kl, -20.0, 1.0))
    assert w_num == pytest.approx(d / (d + 2 * A), rel=1e-6)
    assert kl(math.log(w_num)) == pytest.approx(d / 2 * math.log1p(2 * A / d), rel=1e-6, abs=1e-12)
    assert kl(math.log(w_num)) <= A * (1 + 1e-12)


def test_optimal_variance_ratio_tends_to_one_at_rate_one_over_T():
    """[DiffEnc: variance ratio] In the toy, sigma_P*^2 / sigma_Q^2 = 1 + E(mu_Q - mu_P)^2 /
    sigma_Q^2 -> 1 uniformly over the steps, at rate 1/T: max_i |ratio - 1| halves when T doubles
    (within 5%: the O(1/T^2) remainder is below 1% of the leading term at T >= 1000), and the
    optimal-variance loss lies below L_T and approaches it."""
    worst, gain = {}, {}
    for T in (1000, 2000, 4000):
        gap, var_q = toy_mean_gaps(T)
        # d = 1 per dimension
        var_p = de.optimal_sigma_p2(var_q, gap.pow(2).mean(dim=(1, 2), keepdim=True))
        worst[T] = (var_p / var_q - 1).abs().max().item()
        # E KL_i at w = 1
        A = (gap.pow(2) / (2 * var_q)).mean(dim=(1, 2))
        w = (var_q / var_p).flatten()
        # L_T(w=1) - L_T(w*)
        gain[T] = (A - de.weighted_step_kl(A, w, 1)).sum().item()
    print(f"\nmax |sigma_P*^2/sigma_Q^2 - 1|: {worst}; L_T - L_T(optimal): {gain}")
    for T in (1000, 2000):
        assert worst[T] / worst[2 * T] == pytest.approx(2, rel=0.05)
        assert gain[T] > gain[2 * T] > 0


@given(w=st.floats(0.5, 2.0).filter(lambda w: abs(w - 1) > 1e-3),
       T=st.sampled_from([10, 100, 1000]))
def test_fixed_variance_ratio_adds_a_term_linear_in_T(w, T):
    """[DiffEnc: variance ratio] With sigma_P^2 = sigma_Q^2 / w for every step, the diffusion loss
    is exactly w L_T + T d/2 (w - 1 - log w). The left side is summed from diffenc.gaussian_kl of
    the toy's reverse processes, the right from diffusion_loss_discrete (relative 1e-9: rounding).
    """
    gap, var_q = toy_mean_gaps(T)
    w_t = torch.tensor(w)
    weighted = de.gaussian_kl(gap, var_q, torch.zeros(()), var_q / w_t).mean(dim=(1, 2)).sum()
    L_T = toy_step_kls(T).sum()
    assert weighted.item() == pytest.approx((w * L_T + T / 2 * (w_t - 1 - torch.log(w_t))).item(),
                                            rel=1e-9)


def test_only_ratio_one_keeps_the_elbo_bounded_as_T_grows(L_inf):
    """[DiffEnc: variance ratio] The diffusion loss with sigma_P^2 = sigma_Q^2 / w, summed from
    diffenc.gaussian_kl of the toy's reverse processes, grows linearly in T for w = 0.9 and 1.1:
    between T = 10^4 and 2 * 10^4 its slope is d/2 (w - 1 - log w) (d = 1) within 2%, since w L_T
    itself moves by only ~w * 47/10^4 against the added 10^4 * slope ~ 27. For w = 1 the loss stays
    within 1% of L_inf."""
    def loss(T, w):
        gap, var_q = toy_mean_gaps(T)
        return de.gaussian_kl(gap, var_q, torch.zeros(()), var_q / w).mean(dim=(1, 2)).sum().item()
    for w in (0.9, 1.1):
        slope = (loss(20_000, w) - loss(10_000, w)) / 10_000
        assert slope == pytest.approx(0.5 * (w - 1 - math.log(w)), rel=0.02)
    assert loss(20_000, 1.0) == pytest.approx(L_inf, rel=0.01)


# ---------------------------------------------------------------------- 5. the model and the ELBO


def test_float64_model_has_exact_gradients_through_the_whole_forward():
    """[dtype] float64 in, float64 all the way: the three -ELBO terms of a float64 model are
    float64, and the gradient of the bpd with respect to the schedule's learned endpoints, the
    encoder and the score network (their first, time and last layers) equals a five-point central
    difference to 1e-6 relative (observed <= 3e-8 at h = 3e-6; the step is small because the
    networks oscillate in t and z with periods ~0.006 and ~0.008). A float32 cast anywhere in the
    forward leaves errors of ~1e-3."""
    shape = (1, 8, 8)
    model = randomize(small_model(image=shape, schedule="scalar")).eval()
    gen = torch.Generator().manual_seed(0)
    x_int = torch.randint(0, 256, (3, *shape), generator=gen)
    t = torch.tensor([0.1, 0.5, 0.9])
    eps, eps_0 = torch.randn(3, *shape, generator=gen), torch.randn(3, *shape, generator=gen)
    bpd = lambda: de.bits_per_dim(model(x_int, t, eps, eps_0), shape).mean()
    assert all(term.dtype == torch.float64 for term in model(x_int, t, eps, eps_0))
    bpd().backward()
    params, h = dict(model.named_parameters()), 3e-6
    for name, idx in [("schedule.b", ()), ("schedule.w", ()), ("enc.conv_in.weight", (0, 0, 1, 1)),
                      ("enc.temb.0.weight", (3, 5)), ("enc.conv_out.weight", (0, 2, 1, 1)),
                      ("score.conv_in.weight", (2, 0, 1, 1)), ("score.temb.0.weight", (1, 2)),
                      ("score.conv_out.weight", (0, 3, 1, 1))]:
        p = params[name]
        f = {}
        with torch.no_grad():
            value = p[idx].item()
            for k in (-2, -1, 1, 2):
                p[idx] = value + k * h
                f[k] = bpd().item()
            p[idx] = value
        numeric = (f[-2] - 8 * f[-1] + 8 * f[1] - f[2]) / (12 * h)
        assert p.grad[idx].item() == pytest.approx(numeric, rel=1e-6), name


def test_amp_trains_the_learned_encoder_within_bf16_accuracy():
    """[--amp] bf16 autocast with the paper's learned encoder runs forward and backward on the CPU
    (only the score network is autocast; the encoder's jvp stays in float32). Each image's
    diffusion term agrees with float32 to 1e-2 relative: bf16 keeps 8 significant bits (unit
    roundoff 2^-9 = 2e-3) and the network's rounding errors add up over its ~10 layers; the
    boundary terms, outside autocast, are identical; the gradient points the same way (cosine
    > 0.99; observed 0.9998)."""
    shape = (1, 16, 16)
    torch.set_default_dtype(torch.float32)
    try:
        model = randomize(small_model(image=shape, enc_levels=2))
        x_int = torch.randint(0, 256, (8, *shape), generator=torch.Generator().manual_seed(0))
        t, eps, eps_0 = de.draw_noise(0, 0, 8, shape)
        results = {}
        for amp in (False, True):
            model.cfg.amp = amp
            model.zero_grad()
            terms = model(x_int, t, eps, eps_0)
            de.bits_per_dim(terms, shape).mean().backward()
            grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
            results[amp] = [a.detach() for a in terms], grad
    finally:
        torch.set_default_dtype(torch.float64)
    (full, g32), (half, g16) = results[False], results[True]
    assert not torch.equal(full[0], half[0]), "autocast must be active"
    assert torch.allclose(half[0], full[0], rtol=1e-2, atol=0)
    assert torch.equal(half[1], full[1]) and torch.equal(half[2], full[2])
    assert torch.nn.functional.cosine_similarity(g16, g32, dim=0) > 0.99


def test_training_estimate_of_the_boundary_terms_is_unbiased():
    """[ELBO] In training each image pays the boundary term of the end nearer its t, twice. Over a
    uniform grid of t (half below 1/2) the average of those estimates equals the exact prior and
    reconstruction terms that evaluation computes for every image, per image, to float64 rounding.
    """
    model = small_model(image=(1, 4, 4))
    n_t, x_int = 10, torch.randint(0, 256, (3, 1, 4, 4), generator=torch.Generator().manual_seed(1))
    eps_0 = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    t = (torch.arange(n_t) + 0.5) / n_t                                 # 0.05 .. 0.95
    rep = lambda a: a.repeat_interleave(n_t, 0)                         # each image at every t
    train_terms = model.train()(rep(x_int), t.repeat(3), torch.randn(3 * n_t, 1, 4, 4), rep(eps_0))
    _, latent, recon = model.eval()(x_int, torch.full((3,), 0.5), torch.randn(3, 1, 4, 4), eps_0)
    assert torch.allclose(train_terms[1].view(3, n_t).mean(1), latent, rtol=1e-12, atol=0)
    assert torch.allclose(train_terms[2].view(3, n_t).mean(1), recon, rtol=1e-12, atol=0)
    latent, recon = train_terms[1].view(3, n_t), train_terms[2].view(3, n_t)
    assert (latent[:, :n_t // 2] == 0).all() and (recon[:, n_t // 2:] == 0).all()


def test_decoder_is_a_normalised_distribution():
    """[VDM: discretised decoder] sum over the 256 pixel values of p(x | z_0) = 1 for any z_0,
    computed from recon_loss (1e-12: float64 rounding over 256 terms)."""
    g0 = SCHEDULE(torch.tensor([0.0]))
    for u in (-1.2, -0.3, 0.0017, 0.99, 1.3):
        x_int = torch.arange(256).view(256, 1)
        nll = de.recon_loss(x_int, torch.full((256, 1), u), g0.view(1, 1), torch.zeros(256, 1))
        assert torch.exp(-nll).sum().item() == pytest.approx(1.0, abs=1e-12)


def test_recon_loss_matches_independent_quadrature_and_edges_cost_half():
    """[VDM: discretised decoder] E_eps[-log p(x | z_0)] at gamma_0 = -13.3 by 250-point
    Gauss-Hermite equals a 40001-point trapezoid integral over eps in [-12, 12] (relative 1e-6). The
    integrand bends sharply where z_0 crosses the midpoint to a neighbouring grid value (|eps| ~ 3),
    so Gauss-Hermite needs ~250 nodes to converge to 1e-7 (80 nodes: 3e-5). A boundary value (0 or
    255) has one neighbour instead of two, so it costs half an interior value (within 1%: the
    neighbours' tails are equal by symmetry)."""
    g0 = SCHEDULE(torch.tensor([0.0])).view(1, 1)
    nodes, weights = np.polynomial.hermite_e.hermegauss(250)  # weight exp(-eps^2/2)
    grid = torch.linspace(-12, 12, 40001)
    density = torch.exp(-grid ** 2 / 2) / math.sqrt(2 * math.pi)

    def expected_nll(k, eps, w):
        x_int = torch.full((len(eps), 1), k)
        x_enc = de.scale_pixels(x_int)
        return (de.recon_loss(x_int, x_enc, g0, eps.view(-1, 1)) * w).sum().item()
    gh = lambda k: expected_nll(k, torch.tensor(nodes),
                                torch.tensor(weights) / math.sqrt(2 * math.pi))
    trap = lambda k: expected_nll(k, grid, density * (grid[1] - grid[0]))
    for k in (0, 100, 255):
        assert gh(k) == pytest.approx(trap(k), rel=1e-6)
    assert gh(0) / gh(100) == pytest.approx(0.5, rel=0.01)
    assert gh(255) / gh(100) == pytest.approx(0.5, rel=0.01)


def test_recon_loss_has_the_absolute_scale_of_the_neighbouring_grid_values():
    """[VDM: discretised decoder] The decoder's cost at gamma_0 = -13.3 has the right absolute
    scale: the grid spacing delta = 2/256 is ~6 noise standard deviations s = exp(gamma_0/2), so
    only the two neighbours of the true value compete, and -log p = log(1 + e^{-(delta^2 - 2 delta
    s eps)/(2 s^2)} + e^{-(delta^2 + 2 delta s eps)/(2 s^2)}) for z_0/alpha_0 = x + s eps. Its
    expectation (written out here, by 250-point Gauss-Hermite) equals recon_loss's to 1e-6
    relative (the farther grid values weigh e^{-4 delta^2/(2 s^2)} ~ 1e-31)."""
    g0 = SCHEDULE(torch.tensor([0.0]))
    s, delta = torch.exp(g0 / 2), 2 / 256
    nodes, weights = np.polynomial.hermite_e.hermegauss(250)
    eps, w = torch.tensor(nodes), torch.tensor(weights) / math.sqrt(2 * math.pi)
    x_int = torch.full((len(eps), 1), 100)
    ours = (de.recon_loss(x_int, de.scale_pixels(x_int), g0.view(1, 1), eps.view(-1, 1)) * w).sum()
    neighbours = torch.log1p(torch.exp(-(delta ** 2 - 2 * delta * s * eps) / (2 * s ** 2))
                             + torch.exp(-(delta ** 2 + 2 * delta * s * eps) / (2 * s ** 2)))
    assert ours.item() == pytest.approx((neighbours * w).sum().item(), rel=1e-6)


def test_decode_returns_the_pixel_whose_grid_value_is_nearest():
    """[VDM: discretised decoder] decode(z_0) is the argmax of p(x | z_0): for every pixel value k,
    z_0 = alpha_0 (x_k + u delta) with |u| < 1/2 (inside k's bin, delta = 2/256) decodes to k, and
    the argmax of the 256 probabilities from recon_loss agrees."""
    g0 = SCHEDULE(torch.tensor([0.0]))
    alpha_0 = de.alpha_sigma(g0)[0]
    k = torch.arange(256)
    for u in (-0.49, 0.0, 0.49):
        z_0 = alpha_0 * (de.scale_pixels(k) + u * 2 / 256)
        assert torch.equal(de.decode(z_0.view(256, 1), g0).view(-1), k.to(torch.uint8))
    z_0 = alpha_0 * (de.scale_pixels(k)[::17] + 0.3 * 2 / 256)          # 16 test points
    u = (z_0 / alpha_0).view(16, 1)
    nll = torch.stack([de.recon_loss(torch.full((16, 1), j), u, g0.view(1, 1), torch.zeros(16, 1))
                       for j in range(256)], 1)                        # (16, 256)
    assert torch.equal(nll.argmin(1), k[::17])


def test_bits_per_dim_and_the_training_loss_are_in_bits_per_dimension():
    """[ELBO in bits/dim] A distribution that spends log 256 nats on each of d dimensions (the
    uniform distribution over pixel values) costs exactly 8 bits/dim. The loss that train_step
    optimises and reports is the batch mean of the three terms divided by d ln 2, term by term."""
    shape = (1, 4, 4)
    d = math.prod(shape)
    uniform = de.bits_per_dim([torch.full((3,), d * math.log(256))], shape)
    assert uniform.tolist() == pytest.approx([8.0] * 3, rel=1e-15)
    model = small_model(image=shape).train()
    x_int = torch.randint(0, 256, (4, *shape), generator=torch.Generator().manual_seed(0))
    t, eps, eps_0 = (a.double() for a in de.draw_noise(0, 0, 4, shape))
    expected = torch.stack(model(x_int, t, eps, eps_0)).mean(1).detach() / (d * math.log(2))  # (3,)
    opt = de.make_optimizer(model, model.cfg, torch.device("cpu"))
    ema = copy.deepcopy(model)
    report = de.train_step(model, model, ema, opt, model.cfg, 0, (x_int, t, eps, eps_0), 1)
    assert torch.allclose(report, expected, rtol=1e-12, atol=0) and report[0] > 1


def test_loss_weight_is_the_elbo_at_inf_and_moves_weight_toward_high_noise():
    """[loss weighting, Kingma & Gao 2023] loss_weight is w = sigmoid(b - log SNR) = 1 / (1 +
    exp(log SNR - b)): exactly 1 for b = inf (the ELBO, the flag's default); for finite b, 1/2 at
    log SNR = b, non-increasing in log SNR (the condition under which the weighted loss is a
    mixture of ELBOs) and running from ~0 at the schedule's low-noise end to ~1 at its
    high-noise end."""
    gamma = torch.linspace(-13.3, 5.0, 50, dtype=torch.float64)          # gamma = -log SNR
    assert torch.equal(de.loss_weight(gamma, math.inf), torch.ones_like(gamma))
    b = 2.0
    w = de.loss_weight(gamma, b)
    assert torch.allclose(w, 1 / (1 + torch.exp(-gamma - b)), rtol=1e-14, atol=0)
    assert (w.diff() > 0).all() and w[0] < 1e-4 and w[-1] > 0.99
    assert de.loss_weight(torch.tensor([-b], dtype=torch.float64), b).item() == 0.5


def test_weight_bias_weights_the_trained_diffusion_term_and_nothing_else():
    """[loss weighting] With --weight-bias b, train_step's diffusion term is the batch mean of
    w(log SNR_t) times each image's ELBO integrand, and its gradient is that of this sum with w
    held constant: with a learned schedule (--schedule scalar) the endpoints are not pulled
    toward where w is small. The latent and recon terms stay unweighted, and forward (--eval's
    ELBO) is untouched. Gradients agree to 1e-10 of their largest entry (float64, the same sums)."""
    shape = (1, 4, 4)
    model = small_model(image=shape, schedule="scalar", weight_bias=2.0).train()
    ref = copy.deepcopy(model)
    x_int = torch.randint(0, 256, (4, *shape), generator=torch.Generator().manual_seed(0))
    batch = (x_int, *(a.double() for a in de.draw_noise(0, 0, 4, shape)))
    diff, latent, recon = ref(*batch)
    w = de.loss_weight(ref.schedule(batch[1]).detach(), 2.0)                    # (4,)
    assert w.max() - w.min() > 0.5, "the batch's t must span weights far apart"
    expected = de.batch_bpd((w * diff, latent, recon), shape)                   # (3,)
    expected.sum().backward()
    opt = de.make_optimizer(model, model.cfg, torch.device("cpu"))
    report = de.train_step(model, model, copy.deepcopy(model), opt, model.cfg, 0, batch, 1)
    assert torch.allclose(report, expected.detach(), rtol=1e-12, atol=0)
    assert ref.schedule.b.grad.abs() > 0, "the learned endpoint must get a gradient"
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert close_to_scale(p.grad, q.grad, 1e-10), name


def test_the_learning_rate_warms_up_then_stays_or_follows_a_half_cosine_to_zero():
    """[optimisation] lr_at: a linear warm-up to --lr over --warmup steps, then --lr at every step
    (the paper's constant) or, with --lr-decay cosine, --lr (1 + cos(pi k / steps)) / 2: half of
    --lr at the run's middle, 0.854 of it a quarter in (a linear decay would give 0.75), falling
    at every step after the warm-up, and below 1e-4 of --lr (yet above 0) at the last step.
    train_step sets the step's value on every parameter group."""
    cfg = de.Config(lr=2e-3, warmup=10, steps=1000)
    const = [de.lr_at(cfg, k) for k in range(1000)]
    assert const[:10] == pytest.approx([2e-3 * (k + 1) / 10 for k in range(10)], rel=1e-12)
    assert const[10:] == [2e-3] * 990
    cos = [de.lr_at(dataclasses.replace(cfg, lr_decay="cosine"), k) for k in range(1000)]
    assert cos[0] == pytest.approx(2e-4, rel=1e-12)                # the warm-up; cos(0) = 1
    assert cos[250] == pytest.approx(2e-3 * (1 + math.cos(math.pi / 4)) / 2, rel=1e-12)
    assert cos[500] == pytest.approx(1e-3, rel=1e-12)
    assert all(b < a for a, b in zip(cos[9:], cos[10:]))
    assert 0 < cos[-1] < 2e-3 * 1e-4
    shape = (1, 4, 4)
    model = small_model("none", image=shape, lr=2e-3, warmup=10, steps=1000, lr_decay="cosine")
    x_int = torch.randint(0, 256, (4, *shape), generator=torch.Generator().manual_seed(0))
    batch = (x_int, *(a.double() for a in de.draw_noise(0, 0, 4, shape)))
    opt = de.make_optimizer(model, model.cfg, torch.device("cpu"))
    assert len(opt.param_groups) == 2
    de.train_step(model, model, copy.deepcopy(model), opt, model.cfg, 250, batch, 1)
    assert [g["lr"] for g in opt.param_groups] == [cos[250]] * 2


@given(x=PIXELS, g1=st.floats(-2.0, 8.0))
def test_prior_loss_matches_gauss_hermite_integration(x, g1):
    """[VDM: prior loss] KL(N(alpha_1 x_phi(1), sigma_1^2) || N(0, 1)) from prior_loss equals
    E_q[log q(z) - log p(z)] integrated by 40-point Gauss-Hermite with the Gaussian log-densities
    written out (exact for this quadratic integrand, so 1e-10)."""
    gamma = torch.tensor([[g1]])
    alpha, sigma = de.alpha_sigma(gamma)
    nodes, weights = np.polynomial.hermite_e.hermegauss(40)
    z = alpha * x + sigma * torch.tensor(nodes)
    log_q = -0.5 * ((z - alpha * x) / sigma) ** 2 - torch.log(sigma) - 0.5 * math.log(2 * math.pi)
    log_p = -0.5 * z ** 2 - 0.5 * math.log(2 * math.pi)
    numeric = ((log_q - log_p) * torch.tensor(weights)).sum() / math.sqrt(2 * math.pi)
    assert de.prior_loss(torch.tensor([[x]]), gamma).item() == pytest.approx(numeric.item(),
                                                                             rel=1e-10, abs=1e-14)


# ------------------------------------------------------------------------------------ 6. sampling


def test_sampler_never_uses_the_encoder():
    """[DiffEnc: the encoder is discarded after training] Samples are identical with the encoder's
    weights replaced by NaN, and with the encoder removed: the sampler cannot have called it."""
    model = small_model().eval()
    reference, _ = de.sample(model, 4, 20, seed=1)
    with torch.no_grad():
        for p in model.enc.parameters():
            p.fill_(float("nan"))
    poisoned, _ = de.sample(model, 4, 20, seed=1)
    model.enc = None
    removed, _ = de.sample(model, 4, 20, seed=1)
    assert torch.equal(reference, poisoned) and torch.equal(reference, removed)


class GaussianDenoiser(torch.nn.Module):
    """The exact v-prediction for data x ~ N(m, s^2) per dimension and the fixed encoder
    (x_phi = alpha^2 x, or x_phi = x with encoder none): x_hat = E[x_phi | z_t] in closed form."""

    def __init__(self, m, s, encoder):
        super().__init__()
        self.m, self.s, self.encoder = m, s, encoder

    def forward(self, z, gamma, cond=None):  # cond: --model em's latent, unused
        g = gamma.view(-1, 1, 1, 1)
        alpha, sigma = de.alpha_sigma(g)
        a = torch.sigmoid(-g) if self.encoder == "fixed" else torch.ones_like(g)  # x_phi = a x
        mean, var = a * self.m, (a * self.s) ** 2                                # of x_phi
        x_hat = mean + alpha * var / (alpha ** 2 * var + sigma ** 2) * (z - alpha * mean)
        return (alpha * z - x_hat) / sigma                                       # v_hat


@pytest.mark.parametrize("encoder", ["none", "fixed"])
def test_sampler_with_the_exact_denoiser_draws_the_data_distribution(encoder, monkeypatch):
    """[sampling] With the exact x_hat for Gaussian data x ~ N(0.2, 0.5^2) per dimension, 1000
    ancestral steps (sigma_P = sigma_Q, and for the fixed encoder the Euler term, which is exact
    in form for it: dx_phi/dlambda = sigma^2 x_phi) draw z_0 / alpha_0 with the data's mean and
    variance: 2000 samples x 16 dimensions, mean within 0.01 (3.5 standard errors) and variance
    within 3% (the O(1/T) bias of sigma_P = sigma_Q is ~0.4% at T = 1000; 3.5 standard errors are
    2.8%). The decoder is bypassed so that z_0 itself is seen."""
    m, s = 0.2, 0.5
    model = small_model(encoder, image=(1, 4, 4)).eval()
    model.score = GaussianDenoiser(m, s, encoder)
    monkeypatch.setattr(de, "decode", lambda z_0, gamma_0: z_0 / de.alpha_sigma(gamma_0)[0])
    x0, _ = de.sample(model, 2000, 1000, seed=0)
    assert abs(x0.mean().item() - m) < 0.01
    assert x0.var().item() == pytest.approx(s ** 2, rel=0.03)


def test_the_exp_sampler_draws_a_point_masss_z_0_exactly_in_three_steps(monkeypatch):
    """[sampling; --increment] The sampler takes the step the bound scores: with the fixed encoder
    and the exact denoiser of a point mass x = m, `exp`'s step is the true reverse step (its KL is
    0, test above), so 3 ancestral steps draw z_0 ~ q(z_0 | x) = N(alpha_0^3 m, sigma_0^2):
    z_0 / alpha_0 has mean alpha_0^2 m (within 4 standard errors, 500 x 16 draws) and standard
    deviation sigma_0 / alpha_0 = e^-6.65 (within 5%). Euler's 3-step sampler is off in the mean
    by more than 50 standard errors (measured: 0.0029 against a standard error of 1.5e-5)."""
    m, n = 0.5, 500
    monkeypatch.setattr(de, "decode", lambda z_0, gamma_0: z_0 / de.alpha_sigma(gamma_0)[0])
    alpha2_0, sd = torch.sigmoid(torch.tensor(13.3)), math.exp(-6.65)
    offsets = {}
    for increment in ("exp", "euler"):
        x0, _ = de.sample(point_mass_model(increment, m), n, 3, seed=0)
        offsets[increment] = (x0.mean() - alpha2_0 * m) / (sd / math.sqrt(x0.numel()))
        if increment == "exp":
            assert x0.std().item() == pytest.approx(sd, rel=0.05)
    print(f"\nmean offset of z_0 / alpha_0 in standard errors, T = 3: {offsets}")
    assert abs(offsets["exp"]) < 4 and abs(offsets["euler"]) > 50


def test_the_sampler_takes_each_steps_variance_and_the_optimal_one_makes_few_steps_exact(
        monkeypatch):
    """[DiffEnc: variance ratio; sampling] With T = 5 steps the generative variance matters. For
    Gaussian data x ~ N(0.2, 0.5^2) and the exact denoiser, the true reverse step has variance
    sigma_Q^2 + (alpha_s kappa)^2 Var(x | z_t) (x_hat is exact in mean, not in value), and that is
    sigma_P*^2 = sigma_Q^2 + E||mu_Q - mu_P||^2 / d: with it, 5 ancestral steps draw z_0 / alpha_0
    with the data's variance (within 3%, 2000 x 16 draws), while sigma_P = sigma_Q falls short by
    more than 10%."""
    m, s, T = 0.2, 0.5, 5
    model = small_model("none", image=(1, 4, 4)).eval()
    model.score = GaussianDenoiser(m, s, "none")
    gammas = SCHEDULE(torch.linspace(0, 1, T + 1))
    ratio = torch.empty(T)
    for i in range(1, T + 1):                                 # step i: from t = i/T to s = (i-1)/T
        alpha_s, sigma_s = de.alpha_sigma(gammas[i - 1])
        alpha_t, sigma_t = de.alpha_sigma(gammas[i])
        kappa = -torch.expm1(gammas[i - 1] - gammas[i])
        var_x = s ** 2 * sigma_t ** 2 / (alpha_t ** 2 * s ** 2 + sigma_t ** 2)  # Var(x | z_t)
        ratio[i - 1] = 1 + (alpha_s * kappa) ** 2 * var_x / (kappa * sigma_s ** 2)
    monkeypatch.setattr(de, "decode", lambda z_0, gamma_0: z_0 / de.alpha_sigma(gamma_0)[0])
    optimal, _ = de.sample(model, 2000, T, seed=0, var_ratio=ratio)
    equal, _ = de.sample(model, 2000, T, seed=0)
    print(f"\nvariance of z_0/alpha_0 with T = 5: optimal {optimal.var():.4f}, "
          f"equal {equal.var():.4f}, data {s ** 2}")
    assert optimal.var().item() == pytest.approx(s ** 2, rel=0.03) and equal.var() < 0.9 * s ** 2


def test_keeping_intermediate_predictions_does_not_change_the_samples():
    """[figures] The reverse-process grid is a by-product: sampling with keep=(steps) returns the
    same samples as without, and x_hat at exactly the kept steps, each (n, C, H, W)."""
    model = small_model("learned", image=(1, 8, 8)).eval()
    plain, _ = de.sample(model, 3, 10, seed=1)
    kept_x, kept = de.sample(model, 3, 10, seed=1, keep=(10, 6, 2))
    assert torch.equal(plain, kept_x) and sorted(kept) == [2, 6, 10]
    assert all(v.shape == (3, 1, 8, 8) and v.isfinite().all() for v in kept.values())


# -------------------------------------------------------------------------------- 7. finite depth


def net_schedule(seed):
    """VDM's monotone-network schedule with gamma from -13.3 to 5 and a random shape far from
    linear (its own initialisation is within ~1% of linear): the sigmoid layer alone, weights
    ~N(0, 3^2)."""
    schedule = random_schedule("net", seed, 3.0, 1, 0.0)
    with torch.no_grad():
        schedule.b.fill_(-13.3)
        schedule.w.fill_(18.3)
    return schedule


def test_L_inf_does_not_depend_on_the_schedule_shape(L_inf):
    """[VDM: invariance; DiffEnc: the noise schedule] With a model that is a function of gamma (as
    the networks are), L_inf = int_{gamma_0}^{gamma_1} f(gamma) dgamma depends on the schedule's
    endpoints only: two random shapes of VDM's monotone network, each more than 0.5 away from the
    linear gamma somewhere, give the linear schedule's L_inf (1e-9: quadrature), while their
    T-step losses at T = 10 differ from the linear schedule's (by > 0.1%)."""
    L_10, t = toy_step_kls(10).sum().item(), torch.linspace(0, 1, 101)
    for seed in range(2):
        schedule = net_schedule(seed)
        assert (schedule(t) - SCHEDULE(t)).abs().max() > 0.5
        assert toy_L_inf(schedule) == pytest.approx(L_inf, rel=1e-9)
        assert abs(toy_step_kls(10, schedule=schedule).sum().item() / L_10 - 1) > 1e-3


def test_tuning_the_schedule_shape_lowers_the_T_step_loss_and_keeps_it_monotone(L_inf):
    """[DiffEnc: optimizing the noise schedule for inference] For T = 5 the loss depends on the
    schedule's interior. Starting from the linear schedule (linear_net_schedule: a monotone net
    within 1e-3 of it), 40 Adam steps on the shape alone (endpoints frozen) lower the toy's exact
    L_5 by more than 10% (observed 26%); the tuned schedule is still non-decreasing with the same
    endpoints, and its L_inf is unchanged (1e-9)."""
    schedule = de.linear_net_schedule(de.NoiseSchedule("fixed", -13.3, 5.0))
    t = torch.linspace(0, 1, 101)
    assert torch.allclose(schedule(t), SCHEDULE(t), atol=18.3 * 1e-3)
    shape = [p for name, p in schedule.named_parameters() if name not in ("b", "w")]
    for end in (schedule.b, schedule.w):
        end.requires_grad_(False)
    opt = torch.optim.Adam(shape, lr=0.2)
    before = toy_step_kls(5, schedule=schedule).sum().item()
    for _ in range(40):
        opt.zero_grad()
        toy_step_kls(5, schedule=schedule).sum().backward()
        opt.step()
    after = toy_step_kls(5, schedule=schedule).sum().item()
    print(f"\nL_5: {before:.4f} (linear) -> {after:.4f} (tuned); L_inf = {L_inf:.6f}")
    gamma = schedule(t).detach()
    assert after < 0.9 * before and (gamma.diff() >= 0).all()
    assert gamma[0].item() == pytest.approx(-13.3) and gamma[-1].item() == pytest.approx(5.0)
    assert toy_L_inf(schedule) == pytest.approx(L_inf, rel=1e-9)


def test_eval_with_the_optimal_variance_per_step_lowers_the_T_step_bound(tmp_path, monkeypatch,
                                                                         capsys, float32):
    """[DiffEnc: variance ratio] --eval CKPT --T 8 --sigma-p optimal estimates each step's optimal
    sigma_P^2 / sigma_Q^2 (>= 1: sigma_Q^2 plus a mean square) on training images and evaluates
    the 8-step ELBO on the test images with it and with sigma_P = sigma_Q, paired: the optimal
    variance gives the lower bound (on a randomized model the steps' errors are large), and the
    CSV holds the 8 ratios."""
    monkeypatch.setattr(de, "SIGMA_P_PAIRS", 400)
    model = randomize(small_model("learned", image=(1, 16, 16), dataset="synthetic"))
    ckpt = save_model(model, tmp_path / "m.pt")
    args = de.build_parser().parse_args(["--eval", str(ckpt), "--T", "8", "--sigma-p", "optimal",
                                         "--eval-images", "64", "--batch-size", "64"])
    de.run_eval(args.eval, args)
    out = capsys.readouterr().out
    assert "8-step ELBO" in out and "(paired)" in out
    rows = (tmp_path / "sigma_p_T8.csv").read_text().splitlines()
    ratios = [float(r.split(",")[2]) for r in rows[1:]]
    assert rows[0] == "step,t_mid,var_ratio,se" and len(ratios) == 8
    assert min(ratios) >= 1 and max(ratios) > 1.01
    difference = float(out.split("optimal minus equal: ")[1].split()[0])
    assert difference < 0


class PointMassScore(torch.nn.Module):
    """A v-prediction network for data that is one image x0, wrong by a known amount: it predicts
    x_hat = x0 + e(gamma) in every pixel, e(gamma) = 0.002 (1 + 10 sigmoid(gamma))."""

    def __init__(self, x0):
        super().__init__()
        self.x0 = x0                                                    # (C, H, W)

    @staticmethod
    def error(gamma):
        return 0.002 * (1 + 10 * torch.sigmoid(gamma))

    def forward(self, z, gamma, cond=None):                             # z (B, C, H, W), gamma (B,)
        g = gamma[:, None, None, None]
        alpha, sigma = de.alpha_sigma(g)
        return (alpha * z - (self.x0 + self.error(g))) / sigma         # x_hat = alpha z - sigma v


@pytest.mark.parametrize("T", (3, 5))
def test_the_per_step_optimal_variance_estimate_is_its_closed_form_step_by_step(T, monkeypatch):
    """[DiffEnc: variance ratio; section 7] optimal_variance_ratios, the estimator behind --eval and
    --sample --sigma-p optimal, gives sigma_P*^2 / sigma_Q^2 = 1 + 2 E[KL_i] / d for each step i
    of its own: on data that is one image x0 and a VDM whose x_hat misses it by e(gamma_t) in every
    pixel, KL_i = 1/2 (SNR_s - SNR_t) ||x0 - x_hat||^2 = d/2 (SNR_s - SNR_t) e(gamma_t)^2 whatever
    eps is, so the ratio of step i = [s, t] is 1 + (SNR_s - SNR_t) e(gamma_t)^2, with standard
    error 0. Compared entry by entry (each is one positive product; x_hat's error is recovered
    from O(1) terms, which costs 3 of float64's 16 digits: 1e-9 relative). The ratios differ from
    step to step by orders of magnitude (a shifted step is caught), and by far more than 1e-9
    from 1 + half the KL (a dropped factor 2). Pairs per step: 8, in batches of 7 (batches cross
    the steps' boundaries)."""
    monkeypatch.setattr(de, "SIGMA_P_PAIRS", 8 * T)
    model = small_model("none", image=(1, 4, 4)).eval()
    model.cfg.T = T
    x0_int = torch.randint(0, 256, (1, 4, 4), generator=seeded(0))
    model.score = PointMassScore(de.scale_pixels(x0_int))
    data = x0_int[None].expand(20, 1, 4, 4)                             # 20 copies of x0
    ratio, ratio_se = de.optimal_variance_ratios(model, data, seed=3, batch_size=7)
    gamma = model.schedule(torch.arange(T + 1) / T)                     # step i: [i-1, i] / T
    snr = torch.exp(-gamma)
    expected = 1 + (snr[:-1] - snr[1:]) * PointMassScore.error(gamma[1:]) ** 2
    print(f"\nsigma_P*^2 / sigma_Q^2 per step, T = {T}: {expected.tolist()}")
    assert torch.allclose(ratio, expected, rtol=1e-9, atol=0)
    assert (ratio_se <= 1e-9 * ratio).all()
    assert (expected - 1).max() / (expected - 1).min() > 10


def test_the_sigma_p_estimate_is_sized_by_its_flag_saved_and_reused_by_sample(tmp_path, capsys,
                                                                             monkeypatch):
    """[finite depth; usability] --sigma-pairs N sizes the sigma_P* estimate (N // T pairs per
    step); --eval saves it beside the checkpoint, and --sample --sigma-p optimal of the same
    checkpoint, T and pairs reads it instead of estimating again (optimal_variance_ratios is not
    called), while other pairs or another T estimate anew. --sigma-pairs without --sigma-p
    optimal is refused."""
    calls = []
    estimate = de.optimal_variance_ratios
    monkeypatch.setattr(de, "optimal_variance_ratios",
                        lambda *a, **k: calls.append(a[4]) or estimate(*a, **k))
    model = randomize(small_model("learned", image=(1, 16, 16), dataset="synthetic"))
    ckpt = str(save_model(model, tmp_path / "m.pt"))
    run = lambda *argv: de.main([str(a) for a in argv])
    run("--eval", ckpt, "--T", 4, "--sigma-p", "optimal", "--sigma-pairs", 64, "--eval-images",
        16, "--batch-size", 16)
    assert calls == [64] and "from 64 training pairs" in capsys.readouterr().out
    assert (tmp_path / "m_sigma_p_T4.pt").exists()
    run("--sample", ckpt, "--T", 4, "--sigma-p", "optimal", "--sigma-pairs", 64, "--n-samples", 2)
    assert calls == [64] and "read from" in capsys.readouterr().out
    run("--sample", ckpt, "--T", 4, "--sigma-p", "optimal", "--sigma-pairs", 128, "--n-samples", 2)
    run("--sample", ckpt, "--T", 2, "--sigma-p", "optimal", "--sigma-pairs", 64, "--n-samples", 2)
    assert calls == [64, 128, 64]
    code, err = main_error(capsys, "--sample", ckpt, "--sigma-pairs", 64)
    assert code == 2 and "add --sigma-p optimal" in err


def test_tune_schedule_lowers_the_T_step_test_bound_with_frozen_networks(tmp_path, capsys, float32):
    """[DiffEnc: optimizing the noise schedule for inference] --tune-schedule CKPT --T 4 tunes only
    the schedule's shape (the networks and gamma's endpoints are unchanged, the schedule stays
    non-decreasing) and lowers the 4-step bound on the same test images (paired; by 3 standard
    errors), writing a checkpoint whose --eval uses the tuned schedule and T = 4."""
    model = small_model("none", image=(1, 16, 16), dataset="synthetic")
    ckpt = save_model(model, tmp_path / "m.pt")
    code = de.main(["--tune-schedule", str(ckpt), "--T", "4", "--steps", "40", "--lr", "0.05",
                    "--eval-images", "64", "--batch-size", "32"])
    assert code is None
    out = capsys.readouterr().out
    difference, se = (float(v) for v in out.split("tuned minus original ")[1].split()[:3:2])
    assert difference < -3 * se
    tuned = de.load_checkpoint(str(tmp_path / "tuned_T4.pt"))
    assert tuned["config"]["schedule"] == "net" and tuned["config"]["T"] == 4
    before, after = model.state_dict(), tuned["ema"]
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith("schedule."))
    assert all(torch.equal(before[k], after[k]) for k in ("schedule.b", "schedule.w"))
    tuned_model = de.model_from_checkpoint(tuned, torch.device("cpu"))
    gamma = tuned_model.schedule(torch.linspace(0, 1, 201))
    assert (gamma.diff() >= 0).all() and tuned_model.cfg.T == 4


def test_the_increment_flag_reaches_every_t_step_path_and_is_refused_where_nothing_reads_it(
        tmp_path, capsys, monkeypatch, float32):
    """[--increment] --increment exp is the step that training with --T > 0, --eval --T, --sample,
    --sigma-p optimal and --tune-schedule use (increment_hat is recorded: exp and nothing else on
    each path; a trained run's checkpoint keeps it), and --eval --depths evaluates a DiffEnc
    checkpoint with both increments and the VDM once, paired, writing the CSV and a log-log SVG.
    Refused with one line and exit 2: a VDM (no increment), the continuous-time loss (no step),
    --inspect, and --depths beside --T."""
    seen = []
    increment_hat = de.increment_hat
    monkeypatch.setattr(de, "increment_hat", lambda *a: seen.append(a[3]) or increment_hat(*a))
    monkeypatch.setattr(de, "SIGMA_P_PAIRS", 64)
    run = lambda *argv: de.main([str(a) for a in argv])
    train = lambda out, *extra: run("--train", "synthetic", *TINY, "--steps", 2, "--out",
                                    tmp_path / out, *extra)
    ckpt, vdm = tmp_path / "run" / "latest.pt", tmp_path / "vdm" / "latest.pt"
    small = ["--eval-images", 16, "--batch-size", 16]
    exp = ["--increment", "exp"]
    paths = {"train": lambda: train("exp_run", "--T", 4, *exp),
             "eval": lambda: run("--eval", ckpt, "--T", 4, *exp, *small),
             "sample": lambda: run("--sample", ckpt, "--sample-steps", 3, *exp, "--n-samples", 2),
             "sigma-p": lambda: run("--eval", ckpt, "--T", 4, *exp, "--sigma-p", "optimal",
                                    *small),
             "tune": lambda: run("--tune-schedule", ckpt, "--T", 4, *exp, "--steps", 2, *small)}
    train("run")
    train("vdm", "--encoder", "none")
    for name, call in paths.items():
        seen.clear()
        call()
        assert seen and set(seen) == {"exp"}, (name, set(seen))
    saved = de.load_checkpoint(str(tmp_path / "exp_run" / "latest.pt"))["config"]
    assert saved["increment"] == "exp" and saved["T"] == 4
    assert de.load_checkpoint(str(tmp_path / "run" / "tuned_T4.pt"))["config"]["increment"] == "exp"
    seen.clear()
    run("--eval", vdm, ckpt, "--depths", 2, 4, *small)
    assert set(seen) == {"euler", "exp", None}                         # None: the VDM
    assert (tmp_path / "vdm" / "depths.csv").read_text().startswith("T,vdm,se,run_euler,se,")
    assert (tmp_path / "vdm" / "depths.svg").read_text().startswith("<svg")
    for argv, words in (
            (["--train", "synthetic", *TINY, "--encoder", "none", "--T", 4, "--increment", "exp",
              "--out", tmp_path / "x1"], "drop --increment"),
            (["--train", "synthetic", *TINY, "--increment", "exp", "--out", tmp_path / "x2"],
             "add --T"),
            (["--eval", vdm, "--T", 4, "--increment", "exp"], "drop --increment"),
            (["--eval", ckpt, "--increment", "exp"], "add --T"),
            (["--inspect", ckpt, "--increment", "exp"], "drop --increment"),
            (["--eval", ckpt, "--depths", 2, 4, "--T", 4], "drop --T"),
            (["--eval", vdm, "--depths", 2, "--increment", "exp"], "drop --increment"),
            (["--sample", ckpt, "--depths", 2], "--depths T [T ...] is an option of --eval")):
        code, err = main_error(capsys, *argv)
        assert code == 2 and err.count("\n") == 1 and words in err, (argv, err)


# ----------------------------------------------------------------------- 8. the Diffusion Encoder


def gaussian_denoiser(mean, cov):
    """The exact latent denoiser for data z_0 ~ N(mean, cov): E[eps | z_t] = sigma_t C_t^-1
    (z_t - alpha_t mean), C_t = alpha_t^2 cov + sigma_t^2 I, per row, through cov's
    eigendecomposition."""
    lam, U = torch.linalg.eigh(cov)
    def denoise(z, gamma):                              # (B, d), (B,) -> (B, d)
        alpha, sigma = de.alpha_sigma(gamma[:, None])
        r = (z - alpha * mean) @ U                      # in cov's eigenbasis
        return sigma * (r / (alpha ** 2 * lam + sigma ** 2)) @ U.T
    return denoise


def linear_gaussian(beta=1.0):
    """A linear-Gaussian decoder p(x | z) = N(W z + b, s^2 I) (d_x = 3, d = 2) at one x: its
    negative log-likelihood in z, the tempered posterior N(mean, cov) of p(z) exp(-nll / beta),
    and -log p(x) (x ~ N(b, W W^T + s^2 I))."""
    W = torch.tensor([[1.0, 0.5], [-0.3, 1.2], [0.8, -0.7]])
    b, x, s2 = torch.tensor([0.1, -0.2, 0.3]), torch.tensor([1.0, -0.5, 0.7]), 0.3
    nll = lambda z: ((x - z @ W.T - b).square().sum(-1) / (2 * s2)
                     + 1.5 * math.log(2 * math.pi * s2))
    precision = torch.eye(2) + W.T @ W / (beta * s2)
    cov = torch.linalg.inv(precision)
    mean = cov @ W.T @ (x - b) / (beta * s2)
    evidence = torch.distributions.MultivariateNormal(b, W @ W.T + s2 * torch.eye(3))
    return nll, mean, cov, -evidence.log_prob(x)


def chains(n, seed):
    """A draw of (n, 2) standard normals per call, from one seeded generator."""
    gen = seeded(seed)
    return lambda: torch.randn(n, 2, generator=gen)


def test_the_e_step_samples_the_tempered_posterior_with_ulas_bias():
    """[Diffusion Encoder: E-step; ULA] Langevin on U = |z|^2/2 + nll/beta for a linear-Gaussian
    decoder at beta = 2, from z = m + 4 (far from the posterior), reaches ULA's stationary law
    N(m, (P - eta P^2/2)^-1) with P, m the tempered posterior's precision and mean: 20,000 chains
    after 300 steps of eta = 0.1 match its mean and covariance within 5 standard errors, and
    their covariance is not P^-1 (the bias eta P / 2 is over 10 standard errors). The chain
    moved downhill: U fell on average."""
    nll, mean, cov, _ = linear_gaussian(beta=2.0)
    P, eta, n = torch.linalg.inv(cov), 0.1, 20_000
    noise = chains(n, 0)
    z_0 = (mean + 4.0).expand(n, 2)
    z, delta_U = de.e_step(z_0, de.posterior_energy(nll, beta=2.0), eta, 300, noise)
    ula = torch.linalg.inv(P - eta * P @ P / 2)
    se_mean = (ula.diagonal() / n).sqrt()
    se_cov = ((ula.diagonal()[:, None] * ula.diagonal()[None] + ula ** 2) / n).sqrt()
    assert ((z.mean(0) - mean).abs() < 5 * se_mean).all()
    assert ((torch.cov(z.T) - ula).abs() < 5 * se_cov).all()
    assert ((ula - cov).abs().max() > 10 * se_cov.max())
    assert delta_U.mean() < -1.0


def test_the_preconditioned_e_step_moves_stiff_and_flat_dimensions_alike(monkeypatch):
    """[Diffusion Encoder: E-step, --langevin-precond] On U = sum_j P_j (z_j - m_j)^2 / 2 with
    P = (1, 400), from z_0 = m + 4 in every row, the step in dimension j is eta / r_j, r_j = 4 P_j
    the batch's RMS of dU/dz_j at the start, held for all K steps. At eta = 0.4 both dimensions
    then take the same relative step h_j P_j = 0.1, and 20,000 chains after 300 steps match the
    preconditioned ULA's stationary law N(m_j, 1 / (P_j - h_j P_j^2 / 2)) within 5 standard errors
    (noise sqrt(2 h_j), not sqrt(2 eta)). Without the preconditioner the same eta diverges in the
    stiff dimension (eta P = 160 > 2), and one recomputed at every step (r_j about sqrt(P_j)
    near the target) would too. --langevin-precond reaches e_step from the config."""
    P, m, eta, n = torch.tensor([1.0, 400.0]), torch.tensor([0.5, -1.0]), 0.4, 20_000
    U = lambda z: 0.5 * (P * (z - m).square()).sum(-1)
    z_0 = (m + 4.0).expand(n, 2)
    z, delta_U = de.e_step(z_0, U, eta, 300, chains(n, 0), precond=True)
    h = eta / (4 * P)
    var = 1 / (P - h * P ** 2 / 2)                                              # (2,)
    assert ((z.mean(0) - m).abs() < 5 * (var / n).sqrt()).all()
    assert ((z.var(0) - var).abs() < 5 * var * math.sqrt(2 / n)).all()
    assert delta_U.mean() < -1.0
    plain, _ = de.e_step(z_0, U, eta, 30, chains(n, 0))
    assert not plain[:, 1].abs().lt(1e3).all()  # diverged (or overflowed to inf / nan)
    seen = {}
    monkeypatch.setattr(de, "e_step", lambda *a: seen.update(args=a) or (a[0], a[0][:, 0]))
    model = em_model(langevin_precond=True)
    x = torch.zeros(2, 1, 8, 8)
    de.em_e_step(model, x, torch.zeros(2, 3), None, lambda: torch.rand(2), torch.randn)
    assert seen["args"][5] is True


def test_the_alignment_term_tempers_the_e_step_by_one_minus_lambda():
    """[Diffusion Encoder: the alignment regulariser] E-steps on U = |z|^2/2 + nll - lambda log q,
    each followed by refitting the Gaussian q to the chains' samples, converge to precision
    P / (1 - lambda) and the posterior's mean (lambda = 0.5: twice the posterior's precision).
    With eta = 0.002 the fixed point carries ULA's bias, computed here exactly for Gaussians
    (Q = A - eta A^2 / 2, A = P + lambda Q); it is within 4 % of P / (1 - lambda) and matched to 6 %
    (10,000 chains: 4 standard errors); lambda = 0 would give P, off by 100 %."""
    nll, mean, cov, _ = linear_gaussian()
    P, lam, eta, n = torch.linalg.inv(cov), 0.5, 0.002, 10_000
    q_mean, q_cov, z = torch.zeros(2), torch.eye(2), torch.zeros(n, 2)
    noise = chains(n, 1)
    for _ in range(8):
        log_q = torch.distributions.MultivariateNormal(q_mean, q_cov).log_prob
        z, _ = de.e_step(z, de.posterior_energy(nll, lam=lam, log_q=log_q), eta, 200, noise)
        q_mean, q_cov = z.mean(0), torch.cov(z.T)
    Q = P.clone()
    for _ in range(200):
        A = P + lam * Q
        Q = A - eta * A @ A / 2
    assert torch.allclose(Q, P / (1 - lam), rtol=0.04, atol=0.04 * Q.abs().max())
    assert torch.allclose(torch.linalg.inv(q_cov), Q, rtol=0.06, atol=0.06 * Q.abs().max())
    assert ((q_mean - mean).abs() < 0.03).all()


def test_the_ancestral_latent_sampler_converges_at_first_order_in_the_steps():
    """[Diffusion Encoder: latent sampler; VDM's ancestral step] With the exact denoiser of a
    Gaussian N(m, Sigma), the ancestral sampler's covariance error shrinks about as 1/S: from
    S = 10 to S = 100 by a factor 5 to 20 (50,000 draws: the standard error, ~0.006, is well
    below either error), and its mean is right at both."""
    m, Sigma = torch.tensor([0.5, -1.0]), torch.tensor([[1.0, 0.6], [0.6, 0.8]])
    denoise, n, errors = gaussian_denoiser(m, Sigma), 50_000, []
    for S in (10, 100):
        noise = chains(n, S)
        z = de.latent_sample(denoise, noise(), S, noise)
        errors.append((torch.cov(z.T) - Sigma).abs().max())
        assert ((z.mean(0) - m).abs() < 0.03).all()
    assert errors[1] < 0.1 and 5 < errors[0] / errors[1] < 20


def test_the_deterministic_sampler_has_exactly_the_density_latent_log_q_gives():
    """[Diffusion Encoder: exact log q] With a Gaussian's exact denoiser every deterministic step
    is affine, so z_0 = M z_1 + v and q = N(v, M M^T). latent_log_q's change of variables (the
    per-step Jacobians by jacrev) equals that density to float64 rounding at every z_0 (1e-10 of
    the largest |log q|: S sums of d-term products),
    and the map is not the identity (log q differs from log N(z_1; 0, I) by >= 0.5)."""
    m, Sigma = torch.tensor([0.5, -1.0]), torch.tensor([[1.0, 0.6], [0.6, 0.8]])
    denoise, S = gaussian_denoiser(m, Sigma), 20
    z_1 = chains(6, 2)()
    z_0, log_q = de.latent_log_q(denoise, z_1, S)
    v = de.latent_sample(denoise, torch.zeros(1, 2), S)[0]
    M = torch.stack([de.latent_sample(denoise, torch.eye(2)[k:k + 1], S)[0] - v for k in (0, 1)], 1)
    assert close_to_scale(z_0, de.latent_sample(denoise, z_1, S), 1e-12)
    assert close_to_scale(log_q, torch.distributions.MultivariateNormal(v, M @ M.T).log_prob(z_0),
                          1e-10)
    standard = torch.distributions.MultivariateNormal(torch.zeros(2), torch.eye(2))
    assert (log_q - standard.log_prob(z_1)).abs().min() > 0.5


def test_the_latent_skip_is_a_gaussians_exact_denoiser_learned_from_the_image():
    """[Diffusion Encoder: --latent-skip] gaussian_eps is the exact denoiser of N(m, diag v): it
    equals the eigendecomposition helper's E[eps | z_t] at every z_t and t (1e-12 of the largest
    entry: a few float64 operations per entry). With --latent-skip the encoder starts as the
    prior (its denoiser is sigma_t z_t to rounding: alpha^2 + sigma^2 is 1 to rounding; its other
    weights start as without the skip, so the two runs differ by the skip alone), and with
    the skip's Dense random and the MLP's last layer at zero it is exactly the denoiser of
    N(m(x), diag v(x)), (m, log v) the Dense on h(x), which differ between images; the encoder's
    M-step loss reaches the skip (non-zero gradient)."""
    gen = seeded(0)
    z, gamma = torch.randn(6, 3, generator=gen), torch.linspace(-9, 9, 6)
    m, log_v = torch.randn(3, generator=gen), torch.randn(3, generator=gen)
    exact = gaussian_denoiser(m, torch.diag(log_v.exp()))(z, gamma)
    ours = de.gaussian_eps(z, gamma, m.expand(6, 3), log_v.expand(6, 3))
    assert close_to_scale(ours, exact, 1e-12) and (ours - exact.mean(0)).abs().max() > 0.1
    model, plain = em_model(latent_skip=True), em_model().state_dict()
    assert all(torch.equal(plain[k], v) for k, v in model.state_dict().items() if k in plain)
    x = de.scale_pixels(torch.randint(0, 256, (6, 1, 8, 8), generator=seeded(1)))
    enc = model.latent_enc
    sigma = de.alpha_sigma(gamma[:, None])[1]
    assert close_to_scale(enc.denoiser(x)(z, gamma), sigma * z, 1e-15)
    randomize(enc.skip, std=3.0)
    m_x, log_v_x = enc.skip(enc.embed(x)).chunk(2, dim=1)                      # (6, 3) each
    assert (m_x - m_x.mean(0)).abs().max() > 0.1 and (log_v_x - log_v_x.mean(0)).abs().max() > 0.1
    for i in range(6):  # row i: the exact denoiser of image i's Gaussian
        exact = gaussian_denoiser(m_x[i].detach(), torch.diag(log_v_x[i].detach().exp()))
        assert close_to_scale(enc.denoiser(x)(z, gamma)[i], exact(z, gamma)[i], 1e-12)
    loss = de.latent_denoising_loss(enc.denoiser(x), z, torch.rand(6, generator=gen),
                                    torch.randn(6, 3, generator=gen)).sum()
    assert torch.autograd.grad(loss, enc.skip.weight)[0].abs().max() > 0


def test_the_latent_denoising_loss_is_the_latents_negative_log_likelihood_bound():
    """[Diffusion Encoder: encoder M-step; VDM: continuous-time loss] For z_0 ~ N(m, Sigma) and the
    exact denoiser, E[latent_denoising_loss] plus the reconstruction term of a continuous z_0 at
    gamma_0, d/2 (log 2 pi + gamma_0 + 1), independent of the encoder, is N(m, Sigma)'s entropy:
    the bound is tight (within 4 standard errors of 400,000 (z_0, t, eps)), so minimising the loss
    over samples is maximum likelihood. A denoiser off by 10 % has a larger loss (paired)."""
    m, Sigma = torch.tensor([0.5, -1.0]), torch.tensor([[1.0, 0.6], [0.6, 0.8]])
    gen, n = seeded(3), 400_000
    z_0 = m + torch.randn(n, 2, generator=gen) @ torch.linalg.cholesky(Sigma).T
    t, eps = torch.rand(n, generator=gen), torch.randn(n, 2, generator=gen)
    denoise = gaussian_denoiser(m, Sigma)
    loss = de.latent_denoising_loss(denoise, z_0, t, eps)
    recon = 2 * de.LATENT_RECON              # d (log 2 pi + gamma_0 + 1) / 2, for d = 2
    assert recon == pytest.approx(math.log(2 * math.pi) + de.LATENT_GAMMA[0] + 1, rel=1e-15)
    entropy = torch.distributions.MultivariateNormal(m, Sigma).entropy()
    assert abs(loss.mean() + recon - entropy) < 4 * loss.std() / math.sqrt(n)
    worse = de.latent_denoising_loss(lambda z, g: 1.1 * denoise(z, g), z_0, t, eps)
    assert (worse - loss).mean() > 10 * (worse - loss).std() / math.sqrt(n)


def test_the_bound_is_tight_at_the_posterior_and_looser_away_from_it():
    """[Diffusion Encoder: the bound D + R] Latents from the deterministic sampler with the exact
    denoiser of the tempered posterior pi_beta of a linear-Gaussian decoder, with their exact
    log q. Per draw, D + R + log p(x) = log q(z) - log posterior(z) (1e-10). At beta = 1 q is the
    posterior up to the sampler's discretisation: the largest |D + R + log p(x)| of 500 draws
    shrinks as 1/S (S = 25 -> 100: by 2.5 to 6) and the mean is 0 within 4 standard errors; at
    beta = 0.5 and 2 the mean is KL(q || posterior) > 0.05 nats (and > 4 standard errors). R falls
    and D rises as beta grows (the information bottleneck)."""
    _, post_mean, post_cov, _ = linear_gaussian(1.0)
    posterior = torch.distributions.MultivariateNormal(post_mean, post_cov)
    parts, worst = {}, {}
    for beta, S in ((1.0, 25), (1.0, 100), (0.5, 100), (2.0, 100)):
        nll, mean, cov, neg_log_px = linear_gaussian(beta)
        z, log_q = de.latent_log_q(gaussian_denoiser(mean, cov), chains(500, 4)(), S)
        D, R = de.distortion_rate(nll(z), log_q, z)
        parts[beta], gap = (D.mean(), R.mean()), D + R - neg_log_px
        assert close_to_scale(gap, log_q - posterior.log_prob(z), 1e-10)
        se = gap.std() / math.sqrt(len(gap))
        if beta == 1.0:
            worst[S] = gap.abs().max()
            assert gap.mean().abs() < 4 * se
        else:
            assert gap.mean() > max(0.05, 4 * se)
    assert 2.5 < worst[25] / worst[100] < 6
    assert parts[0.5][1] > parts[1.0][1] > parts[2.0][1]      # R
    assert parts[0.5][0] < parts[1.0][0] < parts[2.0][0]      # D


# --model em: the pieces above with the networks

def em_model(image=(1, 8, 8), **kw):
    """A small --model em decoder (VDM, NET) with its latent encoder; d = 3 unless given."""
    cfg = de.Config(**{**NET, **dict(encoder="none", model="em", latent_dim=3, latent_width=8,
                                     latent_steps=3, langevin_steps=3, dropout=0.0), **kw})
    torch.manual_seed(0)
    return de.DiffEnc(cfg, image)


class GaussianDecoderScore(torch.nn.Module):
    """The exact eps-prediction for data x ~ N(W z + b, s2 I) given the latent z (cond):
    x_hat = E[x | z_t] = mu + alpha s2 / (alpha^2 s2 + sigma^2) (z_t - alpha mu), mu = W z + b."""

    def __init__(self, W, b, s2, shape):
        super().__init__()
        self.W, self.b, self.s2, self.shape = W, b, s2, shape

    def forward(self, z_t, gamma, cond):
        alpha, sigma = de.alpha_sigma(gamma[:, None, None, None])
        mu = (cond @ self.W.T + self.b).view(-1, *self.shape)
        x_hat = mu + alpha * self.s2 / (alpha ** 2 * self.s2 + sigma ** 2) * (z_t - alpha * mu)
        return (z_t - alpha * x_hat) / sigma


def test_decoder_pressure_through_the_real_forward_is_the_tempered_gaussian_pull():
    """[Diffusion Encoder: decoder pressure] With p(x | z) = N(W z + b, s^2 I) and the score
    network replaced by its exact denoiser, the E-step's energy built from the real decoder
    (posterior_energy of decoder_nll: DiffEnc._continuous, predict, the scaled error) has
    E_{t,eps} grad_z U = z + c(s) W^T (W z + b - x) / (beta s^2), c(s) = 1 / (1 + s^2 e^-gamma_max)
    - 1 / (1 + s^2 e^-gamma_min) (0.99798 for s^2 = 0.3): to 1e-10, with E_t by 200-point
    Gauss-Legendre and eps in antithetic pairs (the cross term, linear in eps, cancels exactly;
    the eps^2 term does not depend on z). beta = 2 checks that the pressure is divided by beta."""
    model = em_model(image=(1, 2, 2), param="eps", latent_dim=2).eval()
    gen, s2, beta = seeded(0), 0.3, 2.0
    W, b = torch.randn(4, 2, generator=gen), torch.randn(4, generator=gen)
    model.score = GaussianDecoderScore(W, b, s2, (1, 2, 2))
    x, z = torch.randn(1, 1, 2, 2, generator=gen), torch.randn(2, generator=gen)
    nodes, weights = np.polynomial.legendre.leggauss(200)
    eps = torch.randn(3, 1, 2, 2, generator=gen)
    eps = torch.cat([eps, -eps]).repeat_interleave(200, 0)                # (1200, 1, 2, 2)
    t = torch.tensor((nodes + 1) / 2).repeat(6)                           # (1200,)
    w = torch.tensor(weights / 2).repeat(6) / 6                           # sums to 1
    U = de.posterior_energy(de.decoder_nll(model, x.expand(1200, 1, 2, 2), t, eps), beta=beta)
    z = z.requires_grad_(True)
    grad, = torch.autograd.grad((w * U(z.expand(1200, 2))).sum(), z)
    cfg = model.cfg
    c = 1 / (1 + s2 * math.exp(-cfg.gamma_max)) - 1 / (1 + s2 * math.exp(-cfg.gamma_min))
    pull = c * W.T @ (W @ z.detach() + b - x.flatten()) / (beta * s2)
    assert close_to_scale(grad, z.detach() + pull, 1e-10)
    assert pull.abs().min() > 0.1 and abs(c - 0.99798) < 1e-5


def test_em_on_probabilistic_pca_climbs_to_the_closed_form_mle():
    """[Diffusion Encoder: EM; Tipping & Bishop 1999] EM with the mode's E-step (ULA on
    posterior_energy of the decoder's exact nll, 50 persistent chains per point) and the
    decoder's M-step (maximum likelihood of x given the chains' z: least squares for W, b, the
    mean squared residual for s^2), on 200 points of a 1-factor model in 4 dimensions:
    - from W = 0.5: the log-likelihood never falls by more than 0.1 nats (Monte Carlo noise), rises
      by over 800, and ends within 1 nat of the closed-form maximum (sigma^2 = the mean of the
      discarded eigenvalues, |W|^2 = the top one minus sigma^2) after 15 iterations (exact EM is
      there after about 11; ULA's bias, eta P / 2 in the chains' variance, keeps this one from
      getting much closer at eta = 0.01);
    - at the MLE, one iteration from exact posterior draws leaves |W| and s^2 within 1 %: it is a
      fixed point;
    - from W = 0 the decoder exerts no pressure, the chains stay prior draws that know nothing of
      x, and W stays at Monte Carlo noise (< 0.05): W = 0 is a fixed point too, which is why the
      real decoder's z-projection is not zero-initialised."""
    gen, D, N, M = seeded(5), 4, 200, 50
    W_true, b_true = torch.tensor([[2.0], [1.0], [-1.0], [0.5]]), torch.tensor([0.5, -1, 0, 2])
    x = (torch.randn(N, 1, generator=gen) @ W_true.T + b_true
         + 0.5 * torch.randn(N, D, generator=gen))                          # (N, D), s^2 = 0.25
    S = torch.cov(x.T, correction=0)
    lam, U = torch.linalg.eigh(S)                                          # ascending
    s2_ml, x_mean = lam[:-1].mean(), x.mean(0)
    W_ml = U[:, -1:] * (lam[-1] - s2_ml).sqrt()
    log_lik = lambda W, b, s2: torch.distributions.MultivariateNormal(
        b, W @ W.T + s2 * torch.eye(D)).log_prob(x).sum()
    noise = lambda: torch.randn(N, M, 1, generator=gen)
    X = x[:, None].expand(N, M, D).reshape(-1, D)                          # (N M, D)

    def em_iteration(z, W, b, s2, eta, K):
        nll = lambda z: (x[:, None] - z @ W.T - b).square().sum(-1) / (2 * s2)  # (N, M)
        z, _ = de.e_step(z, de.posterior_energy(nll), eta, K, noise)           # (N, M, 1)
        Z = torch.cat([z.reshape(-1, 1), torch.ones(N * M, 1)], 1)             # (N M, 2)
        coef = torch.linalg.lstsq(Z, X).solution                               # (2, D)
        return z, coef[:1].T, coef[1], (X - Z @ coef).square().mean()

    W, b, s2, z = torch.full((D, 1), 0.5), torch.zeros(D), torch.tensor(1.0), torch.zeros(N, M, 1)
    lls = [log_lik(W, b, s2)]
    for _ in range(15):
        z, W, b, s2 = em_iteration(z, W, b, s2, 0.01, 10)
        lls.append(log_lik(W, b, s2))
    lls, ll_ml = torch.stack(lls), log_lik(W_ml, x_mean, s2_ml)
    assert (lls.diff() > -0.1).all() and lls[-1] - lls[0] > 800
    assert 0 <= ll_ml - lls[-1] < 1.0
    P = 1 + (W_ml.T @ W_ml) / s2_ml                                        # posterior precision
    z = ((x - x_mean) @ W_ml / s2_ml / P)[:, None] + noise() / P.sqrt()
    _, W, _, s2 = em_iteration(z, W_ml, x_mean, s2_ml, 0.001, 100)
    assert abs(W.norm() / W_ml.norm() - 1) < 0.01 and abs(s2 / s2_ml - 1) < 0.01
    W, b, s2, z = torch.zeros(D, 1), x_mean, s2_ml, torch.zeros(N, M, 1)
    for _ in range(2):
        z, W, b, s2 = em_iteration(z, W, b, s2, 0.01, 10)
        assert W.norm() < 0.05


def test_a_decoder_blind_to_z_is_a_fixed_point_and_the_real_decoder_is_not_blind():
    """[Diffusion Encoder: the decoder's z-projection] The real decoder after three EM training
    steps from its initialisation feels z: grad_z L_diff is non-zero for every image. (Before, it
    cannot: as in VDM, the score network's output conv, each ResBlock's last conv and the
    time-embedding projections that z joins start at zero, and each step moves the next of them
    off zero.) With its z-projection's last layer zeroed, grad_z L_diff is exactly 0, and the
    E-step's chains for two different images are identical (same noise): the posterior is
    the prior, z carries nothing about x, and the M-step has nothing to fit."""
    model = em_model(warmup=1)
    x_int = torch.randint(0, 256, (4, 1, 8, 8), generator=seeded(1))
    t, eps, eps_0 = (a.double() for a in de.draw_noise(0, 0, 4, (1, 8, 8)))
    opt, ema = de.make_optimizer(model, model.cfg, torch.device("cpu")), copy.deepcopy(model)
    for step in range(3):
        de.train_step(model, model, ema, opt, model.cfg, step, (x_int, t, eps, eps_0), 1)
    x, z = de.scale_pixels(x_int), torch.randn(4, 3, generator=seeded(2)).requires_grad_(True)
    pressure = lambda: torch.autograd.grad(de.decoder_nll(model.eval(), x, t, eps)(z).sum(), z)[0]
    assert (pressure().norm(dim=1) > 0).all()
    torch.nn.init.zeros_(model.score.zemb[-1].weight)
    torch.nn.init.zeros_(model.score.zemb[-1].bias)
    assert torch.equal(pressure(), torch.zeros_like(z))
    denoise = model.latent_enc.denoiser(x)
    chains = []
    for image in (x, x.flip(0)):
        gen = seeded(3)
        times = lambda: torch.rand(4, generator=gen)
        normal = lambda *shape: torch.randn(shape, generator=gen)
        chains.append(de.em_e_step(model, image, z.detach(), denoise, times, normal)[0])
    assert torch.equal(*chains) and not torch.equal(chains[0], z.detach())


def test_film_and_the_spatial_map_extend_the_time_embedding_route_and_each_carries_z():
    """[Diffusion Encoder: --latent-cond] film and spatial add a route for z beside the time
    embedding's, and nothing else: with the route's own layers zeroed (every ResBlock's FiLM
    layer; the map's Dense), the decoder's output is exactly that of the temb decoder with the
    same other weights (FiLM is (1 + s) GN(h) + b, the identity at s = b = 0; the map's input
    channels are then zero). With the route's layers random, the output differs and depends on z
    through the route alone (the gradient to those layers is non-zero). Inside a ResBlock, FiLM
    is (1 + s(z)) GN(h) + b(z) after the time embedding is added, checked against that formula
    written out. All layers random (randomize), so none of this holds by a zero. "Exactly" is up
    to float64 rounding: the same operations, a conv summing extra zero channels in another
    order, errors ~1e-16 per term over < 1e3 terms, so 1e-10 of the output's largest entry."""
    x = torch.randn(3, 1, 8, 8, generator=seeded(1))
    gamma, cond = torch.tensor([-3.0, 0.0, 2.0]), torch.randn(3, 3, generator=seeded(2))
    temb = randomize(em_model(latent_cond="temb"))
    for cond_kind, route in (("film", lambda m: [b.film for b in m.score.modules()
                                                 if isinstance(b, de.ResBlock)]),
                             ("spatial", lambda m: [m.score.zmap])):
        model = randomize(em_model(latent_cond=cond_kind))
        state = model.state_dict()
        for name, w in temb.state_dict().items():  # the common weights: the temb model's
            state[name] = w if name != "score.conv_in.weight" else \
                torch.cat([w, state[name][:, w.shape[1]:]], dim=1)
        model.load_state_dict(state)
        layers = route(model)
        for layer in layers:
            torch.nn.init.normal_(layer.weight, std=0.3)
            torch.nn.init.normal_(layer.bias, std=0.3)
        out = model.predict(x, gamma, cond)
        assert (out - temb.predict(x, gamma, cond)).abs().max() > 1e-2, cond_kind
        grads = torch.autograd.grad(out.square().sum(), [l.weight for l in layers])
        assert all(g.abs().max() > 0 for g in grads), cond_kind
        for layer in layers:
            torch.nn.init.zeros_(layer.weight)
            torch.nn.init.zeros_(layer.bias)
        want = temb.predict(x, gamma, cond)
        assert (model.predict(x, gamma, cond) - want).abs().max() <= 1e-10 * want.abs().max()
    block = randomize(de.ResBlock(4, 4, 6, 2, 0.0, film_dim=5))
    torch.nn.init.normal_(block.film.bias, std=0.3)
    h, t_emb, z_emb = (torch.randn(*s, generator=seeded(i)) for i, s in
                       enumerate([(2, 4, 5, 5), (2, 6), (2, 5)]))
    scale, shift = block.film(z_emb)[:, :, None, None].chunk(2, dim=1)
    silu = torch.nn.functional.silu
    inner = block.norm2(block.conv1(silu(block.norm1(h))) + block.temb(t_emb)[:, :, None, None])
    want = h + block.conv2(silu((1 + scale) * inner + shift))
    assert (block(h, t_emb, z_emb) - want).abs().max() <= 1e-10 * want.abs().max()
    assert (scale.abs().max() > 0.1) and (shift.abs().max() > 0.1)


def test_the_latent_gate_hands_the_decoder_sigma_t_z():
    """[Diffusion Encoder: --latent-gate] The gated decoder is the ungated one (same weights, all
    of them random) given sigma_t z for z, at every gamma and for every way of reading z (temb,
    film, spatial): to float64 rounding (the same operations on the same numbers, 1e-12 of the
    output's largest entry). It is not the ungated decoder given z itself (the gate acts), and
    at gamma = -13.3 (t = 0, sigma = 0.0013) the gradient of the output by z is below 1 % of
    that at gamma = 5 (sigma = 0.996): the latent has almost no say where the noise is small."""
    x = torch.randn(3, 1, 8, 8, generator=seeded(1))
    cond = torch.randn(3, 3, generator=seeded(2))
    for kind in ("temb", "film", "spatial"):
        gated = randomize(em_model(latent_cond=kind, latent_gate=True))
        plain = em_model(latent_cond=kind)
        plain.load_state_dict(gated.state_dict())
        for g in (-13.3, -2.0, 5.0):
            gamma = torch.full((3,), g)
            sigma = de.alpha_sigma(gamma[:, None])[1]
            want = plain.predict(x, gamma, sigma * cond)
            assert (gated.predict(x, gamma, cond) - want).abs().max() <= 1e-12 * want.abs().max()
        gamma = torch.zeros(3)
        assert (gated.predict(x, gamma, cond) - plain.predict(x, gamma, cond)).abs().max() > 1e-3
        z = cond.clone().requires_grad_(True)
        dz = [torch.autograd.grad(gated.predict(x, torch.full((3,), g), z).square().sum(), z)[0]
              for g in (-13.3, 5.0)]
        assert dz[0].abs().max() < 0.01 * dz[1].abs().max(), kind


def test_the_latent_encoder_learns_the_posterior_from_its_samples_and_not_from_its_own():
    """[Diffusion Encoder: encoder M-step] The LatentEncoder network, trained by
    latent_denoising_loss for 200 Adam steps (lr 1e-2 decaying linearly to 0) on exact posterior
    draws of a linear-Gaussian decoder (x a 4x4 image, d = 2, fresh x each step), draws
    z ~ q_phi(z | x) (ancestral, S = 50) for 1,000 new images whose errors z - E[z | x] have mean
    within 0.06 of 0 (the posterior's standard deviations are 0.38 and 0.54) and covariance within
    0.04 of the posterior's (entries 0.06 to 0.26). Trained on its own draws instead (the E-step
    switched off, K = 0), it does not: its mean squared error is over 3 times the posterior's
    variance (here it diverges)."""
    gen, d, s2, B = seeded(7), 2, 0.5, 512
    W, b = 0.3 * torch.randn(16, d, generator=gen), 0.2 * torch.randn(16, generator=gen)
    cov = torch.linalg.inv(torch.eye(d) + W.T @ W / s2)                     # posterior's
    post_mean = lambda x: (x.flatten(1) - b) @ W @ cov / s2                  # (n, d)
    normal = lambda n: (lambda: torch.randn(n, d, generator=gen))

    def images(n):                                                       # x ~ p(x), (n, 1, 4, 4)
        z = torch.randn(n, d, generator=gen)
        return (z @ W.T + b + math.sqrt(s2) * torch.randn(n, 16, generator=gen)).view(n, 1, 4, 4)

    x_test, errors = images(1000), {}
    for e_step in (True, False):
        torch.manual_seed(0)
        enc = em_model(image=(1, 4, 4), latent_dim=d, latent_width=32).latent_enc
        opt = torch.optim.Adam(enc.parameters(), lr=1e-2)
        decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - i / 200)  # to 0 at the end
        for _ in range(200):
            x = images(B)
            if e_step:  # what a perfect E-step returns: draws of the posterior
                z = post_mean(x) + normal(B)() @ torch.linalg.cholesky(cov).T
            else:       # the encoder's own proposals, which an E-step with K = 0 passes on
                with torch.no_grad():
                    z = de.latent_sample(enc.denoiser(x), normal(B)(), 4, normal(B))
            t, eps = torch.rand(B, generator=gen), normal(B)()
            loss = de.latent_denoising_loss(enc.denoiser(x), z, t, eps).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            decay.step()
        with torch.no_grad():
            z = de.latent_sample(enc.denoiser(x_test), normal(1000)(), 50, normal(1000))
        errors[e_step] = z - post_mean(x_test)                                 # (1000, d)
    assert (errors[True].mean(0).abs() < 0.06).all()
    assert (torch.cov(errors[True].T) - cov).abs().max() < 0.04
    assert errors[False].square().sum(1).mean() > 3 * cov.trace()


def test_the_e_step_moves_only_z_and_each_m_step_only_its_own_network(monkeypatch):
    """[Diffusion Encoder: the EM iteration] em_losses (handed beta = 2, the step's, over the
    run's 1, as during --beta-warmup; lambda = 0.25) leaves every weight as it was and no gradient
    behind (the E-step differentiates by z alone), runs the decoder in eval mode in the E-step (no
    dropout), with the handed beta and the configured lambda, and hands it back in training mode;
    both M-steps get the E-step's z_K; the decoder's loss reaches no
    latent-encoder weight and the encoder's loss no decoder weight, while each reaches its own
    (non-zero gradients), and the E-step lowered U on this batch (Delta U < 0). A chain that
    cannot move (eta = 1e-300) reports Delta U = 0 exactly: U(z_K) reuses U(z_0)'s draw."""
    model = randomize(em_model(dropout=0.1, langevin_steps=5, langevin_eta=0.001, beta=1.0,
                               lam=0.25)).train()
    randomize(model.latent_enc.mlp)
    x_int = torch.randint(0, 256, (4, 1, 8, 8), generator=seeded(1))
    t, eps, eps_0 = (a.double() for a in de.draw_noise(0, 0, 4, (1, 8, 8)))
    before = copy.deepcopy(model.state_dict())
    # record what em_losses hands its pieces: the decoder's mode in each energy, beta and lambda,
    # the E-step's z_K, and the latents that the two M-steps are given
    modes, seen = [], {}
    nll, energy, e_step = de.decoder_nll, de.posterior_energy, de.e_step
    latent_loss, forward = de.latent_denoising_loss, de.DiffEnc.forward
    monkeypatch.setattr(de, "decoder_nll",
                        lambda model, *a: modes.append(model.training) or nll(model, *a))
    monkeypatch.setattr(de, "posterior_energy", lambda nll, beta, lam, log_q: seen.setdefault(
        "beta, lam", (beta, lam)) and energy(nll, beta, lam, log_q))
    monkeypatch.setattr(de, "e_step", lambda *a: seen.setdefault("z_K", e_step(*a)))
    monkeypatch.setattr(de, "latent_denoising_loss",
                        lambda f, z, *a: seen.update(enc=z) or latent_loss(f, z, *a))
    monkeypatch.setattr(de.DiffEnc, "forward", lambda self, *a, cond: seen.setdefault(
        "dec", cond) is cond and forward(self, *a, cond=cond))
    decoder_loss, encoder_loss, report = de.em_losses(model, x_int, t, eps, eps_0, seeded(2),
                                                      2.0)
    monkeypatch.undo()
    assert seen["dec"] is seen["z_K"][0] and seen["enc"] is seen["z_K"][0]
    assert seen["beta, lam"] == (2.0, 0.25)
    assert all(p.grad is None for p in model.parameters()) and model.training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert modes == [False] * 6                                         # K + 1 energies, eval
    enc = list(model.latent_enc.parameters())
    dec = [p for name, p in model.named_parameters()
           if p.requires_grad and not name.startswith("latent_enc.")]
    for loss, own, other in ((decoder_loss, dec, enc), (encoder_loss, enc, dec)):
        grads = torch.autograd.grad(loss, own + other, allow_unused=True, retain_graph=True)
        assert all(g is None for g in grads[len(own):])
        assert sum(g.abs().sum() for g in grads[:len(own)] if g is not None) > 0
    assert report[4] < 0
    # Delta U compares z_K and z_0 on the same draw: a chain that cannot move has Delta U = 0
    gen, x = seeded(5), de.scale_pixels(x_int)
    times, normal = lambda: torch.rand(4, generator=gen), lambda *s: torch.randn(s, generator=gen)
    frozen = copy.deepcopy(model).eval()
    frozen.cfg = dataclasses.replace(model.cfg, langevin_eta=1e-300)
    z_0 = torch.randn(4, 3, generator=gen)
    z_K, delta_U = de.em_e_step(frozen, x, z_0, frozen.latent_enc.denoiser(x), times, normal)
    assert torch.equal(z_K, z_0) and torch.equal(delta_U, torch.zeros(4))



def test_the_shared_e_step_takes_its_first_gradient_from_the_decoders_m_step_at_z_0(
        monkeypatch):
    """[Diffusion Encoder: --langevin-shared] em_losses with the flag (K = 2, handed beta = 2
    over the run's 1, dropout 0.1) runs the decoder's M-step once, in training mode, on the
    encoder's draw z_0: the decoder gradients it leaves in .grad are those of its bpd at z_0 with
    the same dropout masks, and none reaches the latent encoder; the E-step's first step is handed
    U(z_0) = |z_0|^2 / 2 + L_diff(z_0) / beta and grad U = z_0 + dL_diff/dz_0 / beta as computed
    directly (the bpd's gradient rescaled by B D ln 2), so the chain evaluates the decoder K - 1
    times in eval mode, then U(z_K) once in training mode; the encoder's M-step gets z_K. Both
    agree to 1e-10 of their largest entry (float64 sums of a few hundred terms). A chain that
    cannot move reports Delta U = 0 exactly although dropout is on: U(z_K) replays the M-step's
    masks."""
    def losses(eta, seen):
        model = randomize(em_model(dropout=0.1, langevin_steps=2, langevin_eta=eta, beta=1.0,
                                   langevin_shared=True, langevin_precond=True)).train()
        randomize(model.latent_enc.mlp)
        sampler, e_step, forward = de.latent_sample, de.e_step, de.DiffEnc.forward
        latent_loss, nll = de.latent_denoising_loss, de.decoder_nll
        monkeypatch.setattr(de, "latent_sample", lambda *a: seen.setdefault("z_0", sampler(*a)))
        monkeypatch.setattr(de, "e_step", lambda *a: seen.setdefault("e_step", (a, e_step(*a)))[1])
        monkeypatch.setattr(de.DiffEnc, "forward", lambda self, *a, cond: seen.setdefault(
            "forward", []).append((self.training, cond)) or forward(self, *a, cond=cond))
        monkeypatch.setattr(de, "decoder_nll", lambda model, *a: seen.setdefault(
            "nll", []).append(model.training) or nll(model, *a))
        monkeypatch.setattr(de, "latent_denoising_loss",
                            lambda f, z, *a: seen.update(enc=z) or latent_loss(f, z, *a))
        torch.manual_seed(7)  # the dropout masks of the M-step
        out = de.em_losses(model, x_int, t, eps, eps_0, seeded(2), 2.0)
        monkeypatch.undo()
        return model, out

    x_int = torch.randint(0, 256, (4, 1, 8, 8), generator=seeded(1))
    t, eps, eps_0 = (a.double() for a in de.draw_noise(0, 0, 4, (1, 8, 8)))
    seen = {}
    model, (decoder_loss, _, report) = losses(1e-3, seen)
    (z_0, _, _, K, _, _, first), (z_K, _) = seen["e_step"]
    assert seen["z_0"] is z_0 and seen["enc"] is z_K and not decoder_loss.requires_grad
    assert [m for m, _ in seen["forward"]] == [True, True] and seen["forward"][1][1] is z_K
    assert torch.equal(seen["forward"][0][1], z_0) and seen["nll"] == [False] * (K - 1)
    # the reference: the same pass on z_0 from the same random state
    z = z_0.clone().requires_grad_(True)
    torch.manual_seed(7)
    diff, latent, recon = model(x_int, t, eps, eps_0, cond=z)
    dec = [(n, p) for n, p in model.named_parameters()
           if p.requires_grad and not n.startswith("latent_enc.")]
    grads = torch.autograd.grad(de.batch_bpd((diff, latent, recon), (1, 8, 8)).sum(),
                                [p for _, p in dec], retain_graph=True, allow_unused=True)
    grad_z, = torch.autograd.grad(diff.sum(), z)
    for (n, p), g in zip(dec, grads):
        assert (p.grad is None) == (g is None), n
        assert g is None or close_to_scale(p.grad, g, 1e-10, g.abs().max() + 1e-300), n
    assert sum(g.abs().sum() for g in grads if g is not None) > 0
    assert all(p.grad is None for p in model.latent_enc.parameters())
    U_0 = 0.5 * z_0.square().sum(-1) + diff.detach() / 2.0
    assert close_to_scale(first[0], U_0, 1e-10)
    assert close_to_scale(first[1], z_0 + grad_z / 2.0, 1e-10)
    assert (grad_z / 2.0).abs().max() > 1e-3          # the decoder reads z: a pressure to check
    # a frozen chain: the same z and the same masks, so Delta U is 0 to the last bit
    _, (_, _, report) = losses(1e-300, {})
    assert report[4] == 0


@pytest.mark.parametrize("encoder", ["fixed", "learned"])
def test_the_em_decoder_may_be_a_diffenc_model(encoder):
    """[Diffusion Encoder: the decoder is any --encoder] With DiffEnc's fixed or learned encoder in
    the decoder (x_phi and its jvp inside the E-step's energy), one EM iteration gives finite
    losses and Delta U, the decoder feels z (non-zero pressure grad_z L_diff), and the two losses
    reach the score network, the latent encoder and (for learned) the DiffEnc encoder: the same
    code path as the VDM decoder's."""
    model = randomize(em_model(encoder=encoder, langevin_eta=0.001)).train()
    x_int = torch.randint(0, 256, (4, 1, 8, 8), generator=seeded(1))
    t, eps, eps_0 = (a.double() for a in de.draw_noise(0, 0, 4, (1, 8, 8)))
    z = torch.randn(4, 3, generator=seeded(3)).requires_grad_(True)
    x = de.scale_pixels(x_int)
    pressure, = torch.autograd.grad(de.decoder_nll(model.eval(), x, t, eps)(z).sum(), z)
    assert (pressure.norm(dim=1) > 0).all()                      # the decoder feels z
    decoder_loss, encoder_loss, report = de.em_losses(model.train(), x_int, t, eps, eps_0,
                                                      seeded(2), 1.0)
    assert torch.isfinite(report).all() and report[4] != 0
    (decoder_loss + encoder_loss).backward()
    nets = [model.score, model.latent_enc] + ([model.enc] if encoder == "learned" else [])
    assert all(sum(p.grad.abs().sum() for p in net.parameters() if p.grad is not None) > 0
               for net in nets)

def test_at_init_the_latent_encoder_is_the_prior_and_the_bound_knows_its_rate_exactly():
    """[Diffusion Encoder: the initial encoder and the bound's R] At init the latent encoder's
    denoiser is sigma_t z_t exactly, the exact denoiser of N(0, I): q_phi(z | x) is the prior (for
    every x), and each deterministic step scales z by alpha_s alpha_t + sigma_s sigma_t, so
    z = c z_1 with c their product and R = log q - log p = -d log c - |z_1|^2 (1 - c^2) / 2 per
    image. evaluate_em's R column is that, to 1e-10, for the z_1 it draws per image. With the
    decoder's z-projection zeroed, D_prior - D is 0 (to rounding: the two sums are taken in
    another order): a decoder blind to z gets nothing from the latent; with the real one it is
    not 0."""
    model = em_model().eval()
    randomize(model.score)                           # a decoder that uses z; the encoder at init
    d, S = model.cfg.latent_dim, model.cfg.latent_steps
    gammas = de.latent_grid(S, torch.zeros(1))
    z_t, g = torch.randn(5, d, generator=seeded(0)), gammas[2].expand(5)
    denoise = model.latent_enc.denoiser(torch.zeros(5, 1, 8, 8))
    assert torch.equal(denoise(z_t, g), de.alpha_sigma(g[:, None])[1] * z_t)
    alpha, sigma = de.alpha_sigma(gammas)
    c = (alpha[:-1] * alpha[1:] + sigma[:-1] * sigma[1:]).prod()
    data = torch.randint(0, 256, (6, 1, 8, 8), generator=seeded(1), dtype=torch.uint8)
    bpd = de.evaluate_em(model, data, 4, seed=3)                                   # (6, 6)
    z_1 = de.indexed_normal(torch.arange(6), (d,), 2, 3, 0, de.RNG["latent_eval"])[0]
    rate = -d * torch.log(c) - 0.5 * z_1.square().sum(1) * (1 - c ** 2)       # nats
    assert torch.allclose(bpd[:, 3], de.bits_per_dim([rate], (1, 8, 8)), rtol=0, atol=1e-10)
    assert ((bpd[:, 4] - bpd[:, :3].sum(1)).abs() > 1e-6).all()
    torch.nn.init.zeros_(model.score.zemb[-1].weight)
    torch.nn.init.zeros_(model.score.zemb[-1].bias)
    bpd = de.evaluate_em(model, data, 4, seed=3)
    assert torch.allclose(bpd[:, 4], bpd[:, :3].sum(1), rtol=1e-14, atol=0)


def test_d_other_tells_a_latent_that_is_the_same_for_every_image_from_one_that_carries_it(
        capsys):
    """[coherence: D_other] A Gaussian encoder whose q(z|x) is one narrow point for every image
    (mu = 2, sigma = e^-20, whatever x) pays a large rate, and the decoder, which reads z, gives
    another loss for a prior draw (|D_prior - D| > 0.01 bpd per image; a trained decoder that
    expects the point does worse with anything else), yet the latent says nothing about the
    image: D_other - D, the decoder with another image's latent, is 0 to 1e-6 bpd (the latents
    differ by sigma's e^-20 draws). With an encoder whose mean depends on x, D_other - D
    is non-zero for every image. This is the measure that D_prior - D is not: the latter counts a
    constant the decoder has learnt to expect as information. --eval prints D_other - D from its
    own column; a batch of one image, which has no other image, is refused, not paired with
    itself (D_other = D would read as "no information")."""
    model = em_model(latent_encoder="gaussian").eval()
    randomize(model.score)                                     # a decoder that reads z
    data = torch.randint(0, 256, (6, 1, 8, 8), generator=seeded(1), dtype=torch.uint8)
    head = model.latent_enc.head[-1]
    torch.nn.init.zeros_(head.weight)
    with torch.no_grad():
        head.bias.copy_(torch.tensor([2.0] * 3 + [-40.0] * 3))  # mu = 2, log sigma^2 = -40
    bpd = de.evaluate_em(model, data, 6, seed=3)                                   # (6, 6)
    D = bpd[:, :3].sum(1)
    assert (bpd[:, 3] > 0.1).all() and ((bpd[:, 4] - D).abs() > 0.01).all()
    assert (bpd[:, 5] - D).abs().max() < 1e-6
    torch.nn.init.normal_(head.weight, std=3.0)                # mu now depends on x
    bpd = de.evaluate_em(model, data, 6, seed=3)
    assert ((bpd[:, 5] - bpd[:, :3].sum(1)).abs() > 1e-4).all()
    with pytest.raises(de.DiffEncError, match="change --eval-images or --batch-size"):
        de.evaluate_em(model, data, 5, seed=3)                  # its last batch: one image
    ckpt = dict(config=dataclasses.asdict(model.cfg), step=0)
    de.report_em_bound("em.pt", ckpt, bpd, argparse.Namespace(latent_steps=None))
    line = next(l for l in capsys.readouterr().out.splitlines() if "D_other - D " in l)
    assert float(line.split()[3]) == pytest.approx((bpd[:, 5] - bpd[:, :3].sum(1)).mean().item(),
                                                   abs=1e-5)


def test_the_e_step_probe_scores_the_chains_latents_as_d_and_d_other(monkeypatch, capsys):
    """[coherence: the E-step probe] evaluate_em(probe=True) keeps the six columns of the bound
    exactly and adds the decoder's loss at the E-step's z_K and at z_K of the batch's previous
    image, on the same (t, eps) as D: checked against the model's own forward at a z_K that a
    stand-in E-step returns (the encoder's z + 0.5), and the E-step starts from the encoder's z.
    The real E-step moves z (its column differs from D) and --eval prints D_other - D of z_K."""
    model = randomize(em_model(langevin_steps=2, langevin_eta=0.01)).eval().requires_grad_(False)
    data = torch.randint(0, 256, (4, 1, 8, 8), generator=seeded(1), dtype=torch.uint8)
    plain = de.evaluate_em(model, data, 4, seed=3)                                 # (4, 6)
    probed = de.evaluate_em(model, data, 4, seed=3, probe=True)                    # (4, 8)
    assert torch.equal(probed[:, :6], plain) and (probed[:, 6] != plain[:, :3].sum(1)).all()
    seen, e_step = {}, de.em_e_step
    monkeypatch.setattr(de, "em_e_step", lambda m, x, z, *a: (seen.update(z=z) or z + 0.5, None))
    shifted = de.evaluate_em(model, data, 4, seed=3, probe=True)
    monkeypatch.setattr(de, "em_e_step", e_step)
    t, eps, eps_0 = de.eval_draw(model, torch.arange(4), 3, 0)
    z_1 = de.indexed_normal(torch.arange(4), (3,), 2, 3, 0, de.RNG["latent_eval"])[0].double()
    z, _ = de.encode_log_q(model, de.scale_pixels(data, torch.float64), z_1, 3)
    assert torch.equal(seen["z"], z)
    for col, c in ((6, z + 0.5), (7, (z + 0.5).roll(1, 0))):
        with torch.no_grad():
            want = sum(model(data, t, eps, eps_0, cond=c))                         # (4,) nats
        got = de.bits_per_dim([want], model.image_shape)
        assert close_to_scale(shifted[:, col], got, 1e-12)
    ckpt = dict(config=dataclasses.asdict(model.cfg), step=0)
    de.report_em_bound("em.pt", ckpt, probed, argparse.Namespace(latent_steps=None))
    line = next(l for l in capsys.readouterr().out.splitlines() if "E-step: D_other - D" in l)
    assert float(line.split()[7]) == pytest.approx((probed[:, 7] - probed[:, 6]).mean().item(),
                                                   abs=1e-5)

def test_the_gaussian_rate_is_the_kl_of_its_reparameterised_draws():
    """[Gaussian encoder: rate] gaussian_rate, the closed-form KL(N(mu, diag sigma^2) || N(0, I)),
    is the mean of log q(z) - log p(z) over z = reparameterise(mu, log_var, xi): within 4
    standard errors of a 100,000-draw Monte Carlo mean, for rows whose rates differ and are
    several nats. The draws have variance sigma^2 per dimension (within 4 s.e. of the sample
    variance: sigma in place of sigma^2 is far outside), and gaussian_log_q is torch's Normal
    log-density (to 1e-12 of its scale)."""
    g, N = seeded(0), 100_000
    mu, log_var = torch.randn(3, 4, generator=g), 1.5 * torch.randn(3, 4, generator=g)
    z = de.reparameterise(mu, log_var, torch.randn(N, 3, 4, generator=g))         # (N, 3, 4)
    log_q = de.gaussian_log_q(z, mu, log_var)                                     # (N, 3)
    normal = torch.distributions.Normal(mu, (0.5 * log_var).exp())
    assert close_to_scale(log_q[:100], normal.log_prob(z[:100]).sum(-1), 1e-12)
    mc = log_q - de.log_standard_normal(z)                                        # (N, 3)
    rate = de.gaussian_rate(mu, log_var)                                          # (3,)
    assert ((mc.mean(0) - rate).abs() < 4 * mc.std(0) / math.sqrt(N)).all()
    assert rate.min() > 1 and (rate.max() - rate.min()) > 1
    var = log_var.exp()
    assert ((z.var(0) - var).abs() < 4 * math.sqrt(2 / N) * var).all()
    # near the prior, in float32 (an encoder just leaving it): the rate is log_var^2 / 4 per
    # dimension to leading order, 2.5e-11 here, and must not cancel to float32's rounding of 1
    near = torch.full((1, 4), 1e-5, dtype=torch.float32)
    exact = de.gaussian_rate(near.double() * 0, near.double())
    assert abs(de.gaussian_rate(near * 0, near).item() / exact.item() - 1) < 1e-3


def test_the_gaussian_encoders_bound_is_exact_at_the_posterior_and_above_it_elsewhere():
    """[Gaussian encoder: D + R] Linear-Gaussian toy: p(z) = N(0, I), p(x | z) = N(W z + b, s^2 I)
    with W's columns orthogonal, so the posterior is N(m, diag v), v_j = 1 / (1 + |w_j|^2 / s^2),
    m = v W^T (x - b) / s^2. With the Gaussian encoder's moments set to (m, log v), encode_log_q's
    z and exact log q, through distortion_rate, give D + R = -log p(x) (p(x) = N(b, W W^T +
    s^2 I)) for every z_1, to 1e-10: the bound is tight at the posterior. With other moments its
    mean over draws is -log p(x) + KL(q || posterior) (within 4 s.e. of that closed form, which
    is several nats here)."""
    g, d, s2 = seeded(1), 3, 0.5
    W = torch.linalg.qr(torch.randn(6, d, generator=g))[0] * torch.tensor([2.0, 1.0, 0.5])
    b, x = torch.randn(6, generator=g), torch.randn(6, generator=g)
    cov = W @ W.T + s2 * torch.eye(6)
    log_px = torch.distributions.MultivariateNormal(b, cov).log_prob(x)
    v = 1 / (1 + W.square().sum(0) / s2)                                          # (d,)
    m = v * (W.T @ (x - b)) / s2                                                  # (d,)
    enc = de.GaussianEncoder(de.Config(latent_dim=d, latent_width=8), (1, 8, 8))
    model = type("Model", (), dict(latent_enc=enc))()
    nll = lambda z: -torch.distributions.Normal(z @ W.T + b, math.sqrt(s2)).log_prob(x).sum(-1)

    def bound(mu, log_var, n):
        enc.moments = lambda _: (mu.expand(n, d), log_var.expand(n, d))
        z, log_q = de.encode_log_q(model, None, torch.randn(n, d, generator=g), S=None)
        return sum(de.distortion_rate(nll(z), log_q, z))                          # (n,)
    exact = bound(m, v.log(), 50)
    assert (exact + log_px).abs().max() < 1e-10
    mu, log_var = m + torch.tensor([1.0, -0.5, 0.3]), v.log() + torch.tensor([0.8, -0.6, 0.0])
    n, var = 100_000, log_var.exp()
    loose = bound(mu, log_var, n)
    kl = 0.5 * (var / v + (mu - m).square() / v - 1 + v.log() - log_var).sum()
    assert kl > 1 and abs(loose.mean() + log_px - kl) < 4 * loose.std() / math.sqrt(n)


def test_the_gaussian_baselines_step_is_beta_times_the_rate_and_reaches_the_encoder_through_z():
    """[Gaussian encoder: training] gaussian_losses returns the decoder's bpd and beta times the
    closed-form rate in bpd (beta = 0.3 here, the step's beta it is handed over the run's 1, as
    during --beta-warmup, so a dropped beta or the run's shows), and the decoder's loss
    alone has a non-zero gradient on the encoder's weights: the reparameterisation trick carries
    the decoder's pressure to the encoder (a detached z would leave it at 0). reconstruct draws
    each image's latent noise from its test-set index, whatever batch it is in."""
    model = em_model(latent_encoder="gaussian", beta=1.0)
    randomize(model.score)
    randomize(model.latent_enc)
    torch.nn.init.normal_(model.latent_enc.head[-1].bias, generator=seeded(5))  # a rate of nats
    x_int = torch.randint(0, 256, (4, 1, 8, 8), generator=seeded(0), dtype=torch.uint8)
    t = torch.rand(4, generator=seeded(1))
    eps, eps_0 = (torch.randn(4, 1, 8, 8, generator=seeded(k)) for k in (2, 3))
    dec, enc, report = de.gaussian_losses(model, x_int, t, eps, eps_0, seeded(4), 0.3)
    rate = de.gaussian_rate(*model.latent_enc.moments(de.scale_pixels(x_int)))
    assert torch.allclose(enc, 0.3 * de.batch_bpd((rate,), (1, 8, 8))[0], rtol=1e-12, atol=0)
    assert torch.allclose(report[3], rate.mean(), rtol=1e-12) and rate.min() > 0.1
    grads = torch.autograd.grad(dec, list(model.latent_enc.parameters()), allow_unused=True)
    assert max(g.abs().max() for g in grads if g is not None) > 1e-6
    import unittest.mock
    with unittest.mock.patch.object(de, "sample", lambda m, n, T, seed, cond, stream: (cond, {})):
        z_all = de.reconstruct(model, x_int, torch.arange(4), None, 3, 0, 4)
        z_one = de.reconstruct(model, x_int[2:3], torch.tensor([2]), None, 3, 0, 1)
        z_moved = de.reconstruct(model, x_int[2:3], torch.tensor([3]), None, 3, 0, 1)
    assert torch.equal(z_all[2:3], z_one) and not torch.equal(z_one, z_moved)


def test_beta_warms_up_linearly_from_zero_and_train_step_hands_it_to_both_encoders(monkeypatch):
    """[KL warm-up] With --beta-warmup N, beta_step is beta (k + 1) / N at steps k = 0 .. N - 1:
    positive from the first step (the E-step divides L_dec by it), equal increments, beta at step
    N - 1 and after; with N = 0 it is beta at every step. train_step hands the step's beta to the
    diffusion encoder's EM iteration and to the Gaussian baseline (which weighs its rate by it)."""
    cfg = de.Config(model="em", beta=0.2, beta_warmup=4)
    b = [de.beta_step(cfg, k) for k in range(7)]
    assert 0 < b[0] < 0.2 and all(abs(b[k + 1] - b[k] - b[0]) < 1e-15 for k in range(3))
    assert b[3:] == [0.2] * 4
    assert [de.beta_step(dataclasses.replace(cfg, beta_warmup=0), k) for k in range(3)] == [0.2] * 3
    x_int = torch.randint(0, 256, (4, 1, 8, 8), generator=seeded(1), dtype=torch.uint8)
    batch = tuple(a.double() for a in de.draw_noise(0, 0, 4, (1, 8, 8)))
    for name, enc in (("em_losses", "diffusion"), ("gaussian_losses", "gaussian")):
        model = em_model(latent_encoder=enc, beta=0.2, beta_warmup=4,
                         **({} if enc == "gaussian" else dict(langevin_eta=1e-3)))
        opt, seen, losses = torch.optim.SGD(model.parameters(), lr=0.0), [], getattr(de, name)
        monkeypatch.setattr(de, name, lambda *a: seen.append(a[-1]) or losses(*a))
        for k in (0, 1, 5):
            de.train_step(model, model, copy.deepcopy(model), opt, model.cfg, k, (x_int, *batch), 1)
        monkeypatch.undo()
        assert seen == [b[0], b[1], b[5]], (name, seen)


def test_class_agreement_is_the_classifiers_accuracy_for_the_input_and_chance_for_another_image(
        tmp_path, monkeypatch, capsys):
    """[coherence] report_coherence, given the test images themselves as their 'reconstructions',
    gives a class agreement equal to the classifier's accuracy on those inputs (> 0.95) and a
    distance ratio of 0; given unrelated images of the same classes (a reconstruction that
    forgot its input), an agreement near chance (< 0.3; 10 classes) and a ratio near 1. Both
    printed with standard errors, beside the classifier's accuracy on clean test images."""
    x, y = separable_digits(600, 0)
    net = de.train_classifier(x, y, epochs=3, batch_size=32, lr=1e-3, seed=0)
    test, labels = separable_digits(300, 1)
    monkeypatch.setattr(de, "mnist_classifier", lambda data_dir: (net, 0.97))
    monkeypatch.setattr(de, "load_mnist_labels", lambda data_dir, split: labels)
    idx = torch.arange(100, 300)                                  # not the first images
    on_inputs = (de.class_probs(net, test[idx]).argmax(1) == labels[idx]).double().mean()
    ratio, agree = de.report_coherence(test[idx], test[idx], idx, str(tmp_path), 0, 20, 5, True)
    out = capsys.readouterr().out
    assert agree.mean() == on_inputs > 0.95 and ratio.abs().max() == 0
    assert f"class agreement {100 * on_inputs:.1f} ± " in out and "97.0 % on clean" in out, out
    unrelated, _ = separable_digits(200, 2)
    ratio, agree = de.report_coherence(test[idx], unrelated, idx, str(tmp_path), 0, 20, 5, True)
    assert agree.mean() < 0.3 and 0.8 < ratio.mean() < 1.25
    assert "distance ratio" in capsys.readouterr().out


def test_the_distance_ratio_compares_each_reconstruction_with_another_image_never_itself():
    """[coherence] coherence's partner of each image is another image (a derangement: with two
    images each is the other's), so a reconstruction that copies its input has ratio 0 and one
    that copies its partner has ratio inf; without the classifier's output no agreement."""
    x = torch.randint(0, 256, (2, 1, 4, 4), generator=seeded(0), dtype=torch.uint8)
    ratio, agree = de.coherence(x, x, seed=0)
    assert ratio.tolist() == [0.0, 0.0] and agree is None
    ratio, _ = de.coherence(x, x.flip(0), seed=0)
    assert ratio.isinf().all()
    for seed in range(5):                         # five images: no partner is the image itself
        y = torch.randint(0, 256, (5, 1, 4, 4), generator=seeded(seed), dtype=torch.uint8)
        assert (de.coherence(y, y, seed)[0] == 0).all()
        assert (de.coherence(y, y.roll(1, 0), seed)[0] > 0).all()


# ------------------------------------------------------------------------------- 9. configuration


BAD_VALUES = dict(  # one value out of range for every Config field
    dataset="imagenet", data_dir=__file__, encoder="learnt", param="x", schedule="cosine",
    gamma_min=-1e6, gamma_max=31.0, T=-1, increment="rk4", size="huge", n_embd=0, n_layer=0,
    downsample=-1, norm_groups=0, enc_ch=-8, enc_levels=0, enc_blocks=0, enc_norm_groups=0,
    dropout=1.5, enc_dropout=-0.1, model="vae", latent_encoder="vae", latent_cond="concat",
    latent_gate="yes", latent_dim=65, latent_width=12, latent_skip="yes", latent_steps=0,
    langevin_steps=-1,
    langevin_eta=0.0, langevin_precond="yes", langevin_shared="yes", beta=0.0, beta_warmup=-1,
    lam=1.0, steps=0,
    minutes=-1.0,
    batch_size=-1, lr=-1.0, warmup=0, lr_decay="linear", weight_decay=-1.0, clip=-1.0,
    weight_bias=-math.inf,
    ema=1.0, seed=-1, out="", resume="yes", log_every=0, eval_every=0, eval_images=-5,
    save_every=0, skip_nonfinite=1, sample_steps=0, amp="no", compile=None)


@pytest.mark.parametrize("name", sorted(BAD_VALUES))
def test_every_config_field_rejects_an_out_of_range_value(name):
    """[robustness] validate() checks every Config field by its meaning, in one place: each field
    refuses a value out of its range with a one-line error naming it. BAD_VALUES must name every
    field, so a field added without a rule (check_field has no case for it) fails here."""
    assert set(BAD_VALUES) == {f.name for f in dataclasses.fields(de.Config)}
    de.validate(de.Config())                                            # the defaults are valid
    with pytest.raises(de.DiffEncError) as e:
        de.validate(dataclasses.replace(de.Config(), **{name: BAD_VALUES[name]}))
    flag = "the data set" if name == "dataset" else "--" + name.replace("_", "-")
    assert str(e.value).startswith(flag + " must be") and "\n" not in str(e.value)


# --------------------------------------------------------------------------------------- 10. data


def write_idx(path, images, compress):
    """An MNIST idx3 file: big-endian magic 2051, count, rows, cols, then the raw bytes."""
    raw = struct.pack(">IIII", 2051, *images.shape) + images.tobytes()
    with open(path, "wb") as f:
        f.write(gzip.compress(raw) if compress else raw)
    return raw


@pytest.mark.parametrize("compress", [True, False])
def test_mnist_loader_reads_official_idx_files_and_checks_md5(tmp_path, monkeypatch, compress):
    """[data] MNIST idx images (gzip or not) are read as (N, 1, 28, 28) uint8 when the md5 of the
    decompressed file matches, and refused with a one-line DiffEncError when it does not."""
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    name = de.MNIST_FILES["test"][0]
    raw = write_idx(tmp_path / (name + (".gz" if compress else "")), images, compress)
    monkeypatch.setitem(de.MNIST_FILES, "test", (name, de.md5(raw)))
    x = de.load_dataset("mnist", str(tmp_path), "test")
    assert x.dtype == torch.uint8 and x.shape == (5, 1, 28, 28)
    assert np.array_equal(x[:, 0].numpy(), images)
    monkeypatch.setitem(de.MNIST_FILES, "test", (name, "0" * 32))
    with pytest.raises(de.DiffEncError, match="md5"):
        de.load_dataset("mnist", str(tmp_path), "test")


def write_labels(path, labels, compress=True):
    """An MNIST idx1 file: big-endian magic 2049, count, then one byte per label."""
    raw = struct.pack(">II", 2049, len(labels)) + np.asarray(labels, np.uint8).tobytes()
    with open(path, "wb") as f:
        f.write(gzip.compress(raw) if compress else raw)
    return raw


def test_mnist_labels_are_read_from_idx1_files_in_image_order_and_md5_checked(tmp_path,
                                                                             monkeypatch):
    """[data] MNIST labels (idx1: magic 2049, count, one byte each) are read as (N,) int64 in the
    file's order, md5-checked like the images; offline, the missing label file is named with its
    URL (a label file is fetched only by the classifier: training needs none)."""
    name = de.MNIST_LABEL_FILES["test"][0]
    labels = [7, 2, 1, 0, 4, 1, 9]
    raw = write_labels(tmp_path / (name + ".gz"), labels)
    monkeypatch.setitem(de.MNIST_LABEL_FILES, "test", (name, de.md5(raw)))
    y = de.load_mnist_labels(str(tmp_path), "test")
    assert y.dtype == torch.int64 and y.tolist() == labels
    monkeypatch.setitem(de.MNIST_LABEL_FILES, "test", (name, "0" * 32))
    with pytest.raises(de.DiffEncError, match="md5"):
        de.load_mnist_labels(str(tmp_path), "test")

    def offline(*a, **k):
        raise urllib.error.URLError("network is unreachable")
    monkeypatch.setattr(de.urllib.request, "urlopen", offline)
    with pytest.raises(de.DiffEncError, match="train-labels-idx1-ubyte.gz ->"):
        de.load_mnist_labels(str(tmp_path), "train")
    assert all("labels" not in url for url, _, _ in de.data_files("mnist", str(tmp_path)))


def separable_digits(n, seed, noise=60):
    """n (1, 28, 28) uint8 images of 10 classes, class k a fixed random binary template (the same
    templates for every seed) plus pixel noise: a task a working classifier learns from a few
    hundred images. Returns (images, labels)."""
    templates = np.random.default_rng(123).random((10, 28, 28)) < 0.3        # (10, 28, 28)
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    x = 255 * templates[labels] * 0.8 + rng.normal(0, noise, (n, 28, 28)) + 25
    images = torch.from_numpy(np.clip(x, 0, 255).astype(np.uint8)[:, None])
    return images, torch.from_numpy(labels)


def test_the_classifier_learns_the_labels_and_nothing_from_shuffled_ones():
    """[sample quality] train_classifier fits the labels: on held-out images of separable classes
    its accuracy is near 1, and trained on the same images with the labels shuffled it is near
    chance (0.1); the same seed gives the same weights (the cache is reproducible)."""
    x, y = separable_digits(600, seed=0)
    x_test, y_test = separable_digits(300, seed=1)
    acc = lambda net: (de.class_probs(net, x_test).argmax(1) == y_test).double().mean().item()
    torch.manual_seed(0)
    net = de.train_classifier(x, y, epochs=3, batch_size=32, lr=1e-3, seed=0)
    assert acc(net) > 0.95
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
    assert acc(de.train_classifier(x, shuffled, epochs=3, batch_size=32, lr=1e-3, seed=0)) < 0.3
    torch.manual_seed(12345)               # whatever the global RNG holds, the seed decides
    again = de.train_classifier(x, y, epochs=3, batch_size=32, lr=1e-3, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(),
                                                 again.state_dict().values()))


def fake_mnist(folder, monkeypatch):
    """MNIST's four idx files in folder, holding separable_digits (600 training, 200 test images),
    their md5s patched in, and a classifier recipe that learns them in a second."""
    for split, seed, n in (("train", 0, 600), ("test", 1, 200)):
        x, y = separable_digits(n, seed)
        images, labels = de.MNIST_FILES[split][0], de.MNIST_LABEL_FILES[split][0]
        monkeypatch.setitem(de.MNIST_FILES, split, (images, de.md5(
            write_idx(folder / (images + ".gz"), x[:, 0].numpy(), True))))
        monkeypatch.setitem(de.MNIST_LABEL_FILES, split, (labels, de.md5(
            write_labels(folder / (labels + ".gz"), y.numpy()))))
    monkeypatch.setattr(de, "CLASSIFIER", dict(epochs=3, batch_size=32, lr=1e-3, seed=0))


def test_the_classifier_is_trained_once_cached_atomically_and_retrained_for_another_recipe(
        tmp_path, monkeypatch, capsys):
    """[sample quality] mnist_classifier trains on the training split, reports its accuracy on the
    test split, and caches both in --data-dir; the next call loads the cache without training, a
    cache of another recipe is retrained, and an unreadable cache is refused with one line that
    says to delete it; a folder it cannot write to (read-only data) costs the cache, said in one
    line, not the scores."""
    fake_mnist(tmp_path, monkeypatch)
    net, accuracy = de.mnist_classifier(str(tmp_path))
    probs = de.class_probs(net, de.load_dataset("mnist", str(tmp_path), "test"))
    assert accuracy > 0.95 and accuracy == pytest.approx(
        (probs.argmax(1) == de.load_mnist_labels(str(tmp_path), "test")).double().mean().item())
    trained = []
    real_train = de.train_classifier
    monkeypatch.setattr(de, "train_classifier", lambda *a, **k: trained.append(1) or real_train(
        *a, **k))
    cached, cached_accuracy = de.mnist_classifier(str(tmp_path))
    assert not trained and cached_accuracy == accuracy
    assert torch.equal(de.class_probs(cached, de.load_dataset("mnist", str(tmp_path), "test")),
                       probs)
    monkeypatch.setattr(de, "CLASSIFIER", dict(epochs=1, batch_size=32, lr=1e-3, seed=0))
    de.mnist_classifier(str(tmp_path))
    assert trained == [1]
    (tmp_path / de.CLASSIFIER_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(de.DiffEncError, match="delete it") as e:
        de.mnist_classifier(str(tmp_path))
    assert "\n" not in str(e.value)
    (tmp_path / de.CLASSIFIER_FILE).unlink()

    def read_only(path, write):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(de, "atomic_write", read_only)       # a data folder it may not write to
    monkeypatch.setattr(de, "CLASSIFIER", dict(epochs=3, batch_size=32, lr=1e-3, seed=0))
    _, uncached_accuracy = de.mnist_classifier(str(tmp_path))   # the first recipe again
    assert uncached_accuracy == accuracy and not (tmp_path / de.CLASSIFIER_FILE).exists()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "could not be cached" in err and "Permission denied" in err


def mutual_information(p):
    """I(x; y) = H(p(y)) - E_x H(p(y|x)) of the empirical joint of images and classes, in numpy
    float64: the Inception score is its exponential (an independent route to the same number)."""
    p = np.asarray(p, np.float64)
    H = lambda q: -(q * np.log(np.where(q > 0, q, 1))).sum(-1)
    return H(p.mean(0)) - H(p).mean()


@given(st.integers(2, 40), st.integers(2, 10), st.floats(0.05, 5), st.integers(0, 2**31 - 1))
@settings(deadline=None)
def test_the_is_like_score_is_exp_mutual_information_between_image_and_class(n, k, conc, seed):
    """[sample quality] IS-like = exp(E_x KL(p(y|x) || p(y))) with p(y) the mean over the *set*
    equals exp(I(x; y)) computed from entropies, lies in [1, K], and the confidence is the mean
    top-class probability. The random sets make the KL's direction matter: its reverse,
    E_x KL(p(y) || p(y|x)), differs (checked non-trivial here)."""
    p = torch.from_numpy(np.random.default_rng(seed).dirichlet([conc] * k, n))   # (n, k)
    score, confidence = de.sample_quality(p)
    assert score == pytest.approx(math.exp(mutual_information(p.numpy())), rel=1e-9)
    assert 1 - 1e-9 <= score <= k + 1e-9
    assert confidence == pytest.approx(p.max(1).values.mean().item(), rel=1e-12)
    p_y = p.mean(0)
    reverse = math.exp((p_y * (p_y.log() - p.log())).sum(1).mean().item())
    if mutual_information(p.numpy()) > 1e-3:
        assert abs(reverse - score) > 1e-6 * score


def test_the_is_like_score_is_ten_for_certain_balanced_digits_and_one_for_a_single_class():
    """[sample quality] Ten classes, each image certainly one of them, equally often: IS-like =
    10 and confidence 1; every image certainly the same class: IS-like = 1 (p(y) taken per image
    instead of over the set would give 1 in both cases); every image spread evenly over the ten
    classes: IS-like 1, confidence 0.1."""
    certain = torch.eye(10, dtype=torch.float64).repeat(3, 1)                  # (30, 10)
    assert de.sample_quality(certain) == pytest.approx((10.0, 1.0))
    one_class = torch.zeros(30, 10, dtype=torch.float64).index_fill(1, torch.tensor([3]), 1.0)
    assert de.sample_quality(one_class) == pytest.approx((1.0, 1.0))
    spread = torch.full((10, 10), 0.1, dtype=torch.float64)
    assert de.sample_quality(spread) == pytest.approx((1.0, 0.1))


def test_sample_quality_of_real_images_is_the_ceiling_and_noise_scores_low(tmp_path, monkeypatch,
                                                                          capsys):
    """[sample quality] report_sample_quality scores N samples and, beside them, the first N test
    images: given those very test images as the 'samples' it prints the ceiling twice (the same
    numbers), and given pixel noise a far lower IS-like score; each with a bootstrap s.e. > 0."""
    x, y = separable_digits(600, 0)
    net = de.train_classifier(x, y, epochs=3, batch_size=32, lr=1e-3, seed=0)
    test, _ = separable_digits(200, 1)
    monkeypatch.setattr(de, "mnist_classifier", lambda data_dir: (net, 0.97))
    monkeypatch.setattr(de, "load_dataset", lambda name, data_dir, split: test)
    ((is_x, se), (conf, conf_se)), real = de.report_sample_quality(test[:100], str(tmp_path), 0)
    out = capsys.readouterr().out
    assert f"IS-like {is_x:.2f} ± {se:.2f} (real test images: {is_x:.2f} ± {se:.2f})" in out, out
    assert real == ((is_x, se), (conf, conf_se))
    assert "97.0 %" in out and is_x > 7 and 0 < se < 1 and 0 < conf_se < conf
    noise = torch.from_numpy(np.random.default_rng(5).integers(0, 256, (100, 1, 28, 28),
                                                                dtype=np.uint8))
    ((is_noise, _), _), real_again = de.report_sample_quality(noise, str(tmp_path), 0)
    assert is_noise < is_x / 2 and real_again == real


def write_cifar(path, n_per_batch=3):
    """A CIFAR-10 python archive: cifar-10-batches-py/{data_batch_1..5,test_batch} Python pickles.
    """
    rng = np.random.default_rng(1)
    batches = {}
    with tarfile.open(path, "w:gz") as tar:
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            data = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
            blob = pickle.dumps({"data": data, "labels": [0] * n_per_batch}, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
            batches[name] = data
    return batches


def test_cifar10_loader_reads_the_official_archive_layout(tmp_path, monkeypatch):
    """[data] CIFAR-10: 5 training pickles and a test pickle in the archive, 'data' rows as R, G, B
    planes of 32x32 -> (N, 3, 32, 32) uint8; a wrong md5 (e.g. a truncated download) is refused."""
    path = tmp_path / "cifar-10-python.tar.gz"
    batches = write_cifar(path)
    monkeypatch.setattr(de, "CIFAR10_MD5", de.md5(path.read_bytes()))
    train = de.load_dataset("cifar10", str(tmp_path), "train")
    test = de.load_dataset("cifar10", str(tmp_path), "test")
    assert train.shape == (15, 3, 32, 32) and test.shape == (3, 3, 32, 32)
    # blue plane of image 1
    assert np.array_equal(test[1, 2].numpy().ravel(), batches["test_batch"][1, 2048:])
    path.write_bytes(path.read_bytes()[:-100])  # truncated
    with pytest.raises(de.DiffEncError, match="md5"):
        de.load_dataset("cifar10", str(tmp_path), "train")


def test_missing_files_without_network_name_every_file_its_url_and_place(tmp_path, monkeypatch,
                                                                        capsys):
    """[data] With no file and no network, one error (one line) lists every missing file that is
    needed, each with its URL and the path to place it at: a split's own file(s) for --eval, and
    for training both splits' (MNIST's training and test images) in one message; files already
    there are not listed, and no partial file is left behind to be mistaken for a download."""
    def offline(*a, **k):
        raise urllib.error.URLError("network is unreachable")
    monkeypatch.setattr(de.urllib.request, "urlopen", offline)
    url = lambda name, f: f"{de.data_files(name, '')[0][0].rsplit('/', 1)[0]}/{f} -> {tmp_path / f}"
    mnist = ["train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz"]
    for name, split, expected in (("mnist", "train", mnist[:1]), ("mnist", "test", mnist[1:]),
                                  ("cifar10", "train", ["cifar-10-python.tar.gz"])):
        with pytest.raises(de.DiffEncError) as e:
            de.load_dataset(name, str(tmp_path), split)
        message = str(e.value)
        assert "\n" not in message and f"{len(expected)} file(s)" in message, message
        assert all(url(name, f) in message for f in expected), message
    code, err = main_error(capsys, "--train", "mnist", *TINY, "--data-dir", tmp_path, "--out",
                           tmp_path / "run")
    assert code == 2 and err.count("\n") == 1 and all(url("mnist", f) in err for f in mnist)
    assert os.listdir(tmp_path) == []
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"")                 # one of them is there
    code, err = main_error(capsys, "--train", "mnist", *TINY, "--data-dir", tmp_path, "--out",
                           tmp_path / "run")
    assert code == 2 and "1 file(s)" in err and "t10k" not in err, err


def test_batches_cover_each_epoch_once_and_differ_between_epochs():
    """[training data order] Within an epoch the batches are disjoint and cover n - n mod B images;
    the next epoch uses a new order; the order is a function of (seed, step) alone."""
    n, B = 50, 8
    epoch0 = torch.cat([de.batch_indices(n, B, s, 0) for s in range(n // B)])
    assert len(set(epoch0.tolist())) == (n // B) * B
    assert not torch.equal(de.batch_indices(n, B, 0, 0), de.batch_indices(n, B, n // B, 0))
    assert torch.equal(de.batch_indices(n, B, 3, 7), de.batch_indices(n, B, 3, 7))


def test_low_discrepancy_times_split_over_ranks_equal_the_global_batch():
    """[VDM: low-discrepancy sampler] t_i = (u + i/B) mod 1 are B evenly spaced points in [0, 1);
    the slices that DDP ranks draw concatenate to the single-process batch."""
    u = torch.tensor([0.731])
    t = de.low_discrepancy_times(u, 8)
    assert torch.allclose(torch.sort(t).values.diff(), torch.full((7,), 1 / 8))
    parts = torch.cat([de.low_discrepancy_times(u, 8, offset=4 * r, n=4) for r in range(2)])
    assert torch.equal(parts, t)


@given(u=st.floats(0, 1, exclude_max=True), n=st.integers(1, 300))
@example(u=1 - 2 ** -53, n=2)  # u + 1/2 rounds up to 3/2 exactly: t = 1/2, not just below it
def test_low_discrepancy_times_are_in_the_unit_interval_one_per_stratum(u, n):
    """[VDM: low-discrepancy sampler] t_i = (u + i/n) mod 1 lie in [0, 1) and, sorted, are 1/n
    apart starting below 1/n: one in each stratum of width 1/n (1e-12: rounding, which can put a
    t on a stratum's upper edge)."""
    t = de.low_discrepancy_times(torch.tensor([u]), n).sort().values
    assert (t >= 0).all() and (t < 1).all() and t[0] < 1 / n + 1e-12
    assert torch.allclose(t.diff(), torch.full((n - 1,), 1 / n), rtol=0, atol=1e-12)


def test_eval_noise_is_a_function_of_the_image_index_alone():
    """[evaluation, paired] The t, eps and eps_0 of a test image do not depend on which batch it is
    evaluated in, so --eval pairs two checkpoints for any batch sizes: per-image bpd with batch 3
    equals that with batch 8 (float64 rounding). t lies in [0, 1) and is evenly spread for any
    run of N consecutive images: no gap between neighbours (on the circle) exceeds 2/N (the
    golden-ratio sequence's largest gap is at most ~1.9/N; N uniform draws leave ~ln(N)/N)."""
    model = randomize(small_model("learned", image=(1, 16, 16))).eval()
    data = de.synthetic("test")[:10]
    a, b = de.evaluate(model, data, 3, seed=1), de.evaluate(model, data, 8, seed=1)
    assert torch.allclose(a, b, rtol=1e-12, atol=0) and not torch.equal(a[0], a[1])
    t, eps, _ = de.eval_noise(1, torch.arange(20, 30), (1, 16, 16))
    t_again, eps_again, _ = de.eval_noise(1, torch.tensor([25]), (1, 16, 16))
    assert t_again == t[5] and torch.equal(eps_again[0], eps[5])
    assert (t >= 0).all() and (t < 1).all()
    for n in (10, 100):
        t = de.eval_noise(1, torch.arange(7, 7 + n), (1, 1, 1))[0].sort().values
        assert torch.cat([t.diff(), t[:1] + 1 - t[-1:]]).max() < 2 / n


# ----------------------------------------------------------------------------------- 11. training


def tiny_config(out, **kw):
    run = dict(dataset="synthetic", size="tiny", **NET, batch_size=8, eval_images=16,
               eval_every=1000, save_every=2, log_every=1, out=str(out))
    return de.Config(**{**de.PRESETS["tiny"], **run, **kw})


@pytest.fixture
def float32():
    """The training code runs in float32, as users run it."""
    torch.set_default_dtype(torch.float32)
    yield
    torch.set_default_dtype(torch.float64)


def nan_from_step(monkeypatch, bad_steps):
    """Make DiffEnc.forward return NaN losses at the given training steps (counted by calls)."""
    forward, calls = de.DiffEnc.forward, [0]
    def poisoned(self, *args):
        terms = forward(self, *args)
        calls[0] += 1
        if self.training and calls[0] - 1 in bad_steps:
            return tuple(t * float("nan") for t in terms)
        return terms
    monkeypatch.setattr(de.DiffEnc, "forward", poisoned)


def test_ema_is_the_exponential_moving_average_with_a_warm_up():
    """[training: EMA] update_ema sets ema <- decay * ema + (1 - decay) * weights for every tensor;
    the decay warms up from 0.1 at step 0, never falls, never exceeds --ema, and reaches it.
    (float32 weights: 1e-6 of their scale, a few roundings of 2^-24; a wrong decay moves them by
    more than 1e-2.)"""
    ema, model = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in ema.parameters()]
    de.update_ema(ema, model, 0.9)
    for e, b, p in zip(ema.parameters(), before, model.parameters()):
        # float32 weights: lerp and this expression round differently (fused or not, by CPU),
        # by a few units of 2^-24 of the weights' scale
        assert close_to_scale(e, 0.9 * b + 0.1 * p, 1e-6)
    cfg = de.Config(ema=0.999)
    decays = [de.ema_decay(cfg, n) for n in range(0, 20000, 7)]
    assert decays[0] == pytest.approx(0.1) and max(decays) == 0.999 == decays[-1]
    assert all(a <= b for a, b in zip(decays, decays[1:]))


def log_rows(path):
    """log.csv as {step: row}; a step logged twice (re-run after a kill) keeps its last row."""
    lines = open(path).read().splitlines()[1:]
    return {int(l.split(",")[0]): l for l in lines}


def start_training(out, steps, *extra):
    return subprocess.Popen([sys.executable, os.path.join(HERE, "diffenc.py"), "--train",
                             "synthetic", *TINY, "--steps", str(steps), "--save-every", "2",
                             "--eval-every", "1000", "--out", str(out), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_step(out, step, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(out / "log.csv") and max(log_rows(out / "log.csv"), default=0) >= step:
            return
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    raise AssertionError(f"no step {step} within {timeout} s")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("schedule", ["fixed", "scalar"])
def test_cuda_graphs_give_the_eager_loss_and_gradients(tmp_path, monkeypatch, float32, schedule):
    """[--compile, CUDA] compile_model replays the learned encoder's two calls of a training step
    as CUDA graphs: three training steps of a graphed and an eager copy of the same model on the
    same batches report the same losses (rel 1e-5: float32, cuDNN may pick other algorithms in a
    graph), the first step's gradients agree to 1e-4 of their largest entry, for the encoder and
    (scalar) for the schedule's learned endpoints through gamma; the graphed model never runs the
    eager jvp; in eval mode, on another batch size, both calls run eagerly to the same terms.
    torch.compile of the score network is left out (its own rounding is not this claim's)."""
    device, B = torch.device("cuda"), 8
    cfg = tiny_config(tmp_path, encoder="learned", schedule=schedule, dropout=0.0,
                      enc_dropout=0.0, enc_levels=2, batch_size=B)
    torch.manual_seed(0)
    eager = randomize(de.DiffEnc(cfg, (1, 16, 16))).to(device)  # dy/dgamma far from 0
    graphed = copy.deepcopy(eager)
    state = {m: (copy.deepcopy(m).eval(), de.make_optimizer(m, cfg, device))  # (EMA, AdamW),
             for m in (eager, graphed)}                             # copied before the capture
    monkeypatch.setattr(graphed.score, "compile", lambda: None)
    de.compile_model(graphed, B, device)
    calls, jvp = [0], de.encoder_jvp
    monkeypatch.setattr(de, "encoder_jvp", lambda *a: calls.__setitem__(0, calls[0] + 1) or jvp(*a))
    x_int = de.synthetic("train")[:B].to(device)                                 # (B, 1, 16, 16)
    runs = {}
    for name, model in (("eager", eager), ("graphed", graphed)):
        (ema, opt), calls[0], reports = state[model], 0, []
        for k in range(3):
            batch = (x_int, *(a.to(device) for a in de.draw_noise(0, k, B, (1, 16, 16))))
            reports.append(de.train_step(model, model, ema, opt, cfg, k, batch, 1))
            if k == 0:
                grads = {n: p.grad.clone() for n, p in model.named_parameters()
                         if p.grad is not None}
        runs[name] = torch.stack(reports), grads, calls[0]
    (rep_e, grad_e, calls_e), (rep_g, grad_g, calls_g) = runs["eager"], runs["graphed"]
    assert (calls_e, calls_g) == (3, 0)
    assert torch.allclose(rep_g, rep_e, rtol=1e-5, atol=0) and not torch.equal(rep_e[0], rep_e[1])
    assert grad_g.keys() == grad_e.keys()
    # the loss reaches the encoder's output conv and time embedding, and (scalar) the schedule
    felt = ["enc.conv_out.weight", "enc.temb.0.weight"] + ["schedule.b"] * (schedule == "scalar")
    assert all(grad_e[n].abs().max() > 0 for n in felt)
    for n in grad_e:
        assert (grad_g[n] - grad_e[n]).abs().max() <= 1e-4 * grad_e[n].abs().max() + 1e-12, n
    eager.eval()
    graphed.eval()
    draw = [a[:3].to(device) for a in de.draw_noise(0, 9, B, (1, 16, 16))]  # 3 images, not B
    with torch.no_grad():
        ends = [torch.stack(m(x_int[:3], *draw)) for m in (eager, graphed)]  # (3 terms, 3)
    assert torch.allclose(ends[1], ends[0], rtol=1e-5, atol=0)


def test_sigterm_then_sigkill_and_resume_reproduce_the_uninterrupted_run_bit_for_bit(
        tmp_path, monkeypatch, capsys, float32):
    """[robustness] SIGTERM (as from a cluster's pre-emption; Ctrl-C is SIGINT, handled the same)
    finishes the current step, saves latest.pt at that step, exits 128 + 15 with a message that
    names --resume, and prints no traceback. SIGKILL, which nothing can catch, leaves the last
    checkpoint loadable. A run stopped both ways (SIGTERM in step 3, SIGKILL after step 6 of the
    resumed run) and resumed ends with the same log.csv (every row once, every digit) and the
    same weights, optimiser and EMA (torch.equal) as an uninterrupted run with the same seed: data
    order, t, eps and dropout are functions of (seed, step), and every checkpoint on disk was
    complete when it was renamed. The SIGKILL hits a process of its own; the other runs are
    main() in this one (float32 and the same threads as that process), which saves processes'
    start-up; that they all match bit for bit is part of the claim."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    common = ["--train", "synthetic", *TINY, "--steps", 8, "--save-every", 2, "--eval-every", 1000]
    de.main([str(a) for a in (*common, "--out", straight)])
    forward, calls = de.DiffEnc.forward, [0]
    def terminated_in_step_3(self, *args):  # one forward per training step (no evaluation)
        calls[0] += 1
        if calls[0] == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return forward(self, *args)
    monkeypatch.setattr(de.DiffEnc, "forward", terminated_in_step_3)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        de.main([str(a) for a in (*common, "--out", killed)])
    monkeypatch.setattr(de.DiffEnc, "forward", forward)
    err = capsys.readouterr().err
    assert e.value.code == 128 + signal.SIGTERM and "--resume" in err and "Traceback" not in err
    assert de.load_checkpoint(str(killed / "latest.pt"))["step"] == 3 == max(log_rows(killed /
                                                                                    "log.csv"))
    proc = start_training(killed, 8, "--resume")
    wait_for_step(killed, 6, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    de.load_checkpoint(str(killed / "latest.pt"))  # loadable after the kill
    de.main([str(a) for a in (*common, "--out", killed, "--resume")])
    # row for row, every row once
    assert (straight / "log.csv").read_text() == (killed / "log.csv").read_text()
    a, b = (de.load_checkpoint(str(d / "latest.pt")) for d in (straight, killed))
    assert a["step"] == b["step"] == 8
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    sa, sb = a["opt"]["state"], b["opt"]["state"]
    assert all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, float32):
    """[robustness] A NaN loss at step 4 stops training with a message naming the step and the
    checkpoint that is kept; latest.pt still holds step 2 and its weights are finite."""
    cfg = tiny_config(tmp_path / "run", steps=6)
    nan_from_step(monkeypatch, {3})
    with pytest.raises(SystemExit, match="non-finite loss .* at step 4") as e:
        de.train(cfg)
    assert "latest.pt holds step 2" in str(e.value.code) and "--resume" in str(e.value.code)
    ckpt = de.load_checkpoint(str(tmp_path / "run" / "latest.pt"))
    assert ckpt["step"] == 2 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_nonfinite_loss_before_the_first_checkpoint_promises_none(tmp_path, monkeypatch, float32):
    """[robustness] A NaN loss before the first save says that no checkpoint was written and does
    not suggest --resume (there is nothing to resume)."""
    nan_from_step(monkeypatch, {0})
    with pytest.raises(SystemExit, match="at step 1") as e:
        de.train(tiny_config(tmp_path / "run", steps=4))
    assert "no checkpoint was written yet" in e.value.code and "--resume" not in e.value.code
    assert not (tmp_path / "run" / "latest.pt").exists()


def test_skip_nonfinite_skips_only_the_bad_batch(tmp_path, monkeypatch, float32):
    """[robustness] With --skip-nonfinite a NaN batch is skipped: training reaches its last step
    with finite weights, and the skipped step is missing from the log."""
    cfg = tiny_config(tmp_path / "run", steps=5, skip_nonfinite=True)
    nan_from_step(monkeypatch, {2})
    model, _ = de.train(cfg)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # the 3rd batch (logged as 3) skipped
    assert sorted(log_rows(tmp_path / "run" / "log.csv")) == [1, 2, 4, 5]


def test_skipped_batches_still_save_stop_on_a_signal_and_give_up_in_the_end(tmp_path, monkeypatch,
                                                                            float32):
    """[robustness] Skipping a batch does not skip the rest of the step: with NaN losses from step 3
    on, checkpoints are still written on schedule; SIGTERM during the skipping still saves and
    exits 143; and after MAX_SKIPPED non-finite losses in a row the run gives up (exit 1) with a
    message saying which checkpoint is kept."""
    nan_from_step(monkeypatch, set(range(2, 1000)))
    with pytest.raises(SystemExit, match="in a row") as e:
        de.train(tiny_config(tmp_path / "a", steps=100, skip_nonfinite=True, save_every=3))
    gave_up_at = 2 + de.MAX_SKIPPED                       # steps 3 .. 12 are skipped
    last_save = (gave_up_at - 1) // 3 * 3    # step 12 itself is not saved: the run gave up in it
    assert f"up to step {gave_up_at}" in e.value.code and f"holds step {last_save}" in e.value.code
    assert de.load_checkpoint(str(tmp_path / "a" / "latest.pt"))["step"] == last_save
    forward, calls = de.DiffEnc.forward, [0]
    def terminated_at_5(self, *args):  # NaN from the 3rd batch, and a SIGTERM during the 5th
        calls[0] += 1
        if calls[0] == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return forward(self, *args)
    monkeypatch.setattr(de.DiffEnc, "forward", terminated_at_5)
    nan_from_step(monkeypatch, set(range(2, 1000)))
    with pytest.raises(SystemExit) as e:
        de.train(tiny_config(tmp_path / "b", steps=100, skip_nonfinite=True, save_every=50))
    assert e.value.code == 128 + signal.SIGTERM
    assert de.load_checkpoint(str(tmp_path / "b" / "latest.pt"))["step"] == 5


@pytest.mark.parametrize("error, words", [
    (OSError(28, "No space left on device"), "No space left on device"),
    (RuntimeError("[enforce fail at inline_container.cc:783] . PytorchStreamWriter failed writing "
                  "file data/3: file write failed\nException raised from ..."),
     "PytorchStreamWriter failed writing file")])
def test_a_failed_final_save_keeps_the_previous_checkpoint_and_exits_nonzero(
        tmp_path, monkeypatch, float32, capsys, error, words):
    """[robustness] Disk full (OSError) or a failed write inside torch.save (RuntimeError, as
    PyTorch raises it) while writing the final checkpoint: the previous latest.pt is untouched
    and loadable, no temporary file is left, and the run exits non-zero with one message naming
    the step that latest.pt holds (no traceback)."""
    save = torch.save
    def failing_save(obj, f):
        if obj["step"] == 4:
            f.write(b"half a checkpoint")
            raise error
        save(obj, f)
    monkeypatch.setattr(de.torch, "save", failing_save)
    with pytest.raises(SystemExit) as e:
        de.train(tiny_config(tmp_path / "run", steps=4))
    assert "could not be written" in e.value.code and "latest.pt holds step 2" in e.value.code
    assert de.load_checkpoint(str(tmp_path / "run" / "latest.pt"))["step"] == 2
    assert not any(name.endswith(".tmp") for name in os.listdir(tmp_path / "run"))
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err and "Exception raised from" not in err


class Killed(BaseException):
    """Stands for a SIGKILL in the middle of a step: nothing after it runs."""


def test_log_after_a_kill_and_resume_equals_the_uninterrupted_log(tmp_path, monkeypatch, float32):
    """[robustness] A run killed after it logged step 6 but before it saved it (latest.pt holds
    step 4), then resumed, writes log.csv exactly as an uninterrupted run does, row for row: the
    rows after the checkpoint are cut and written again once, and the row at step 6 averages
    steps 4-6 with the step-4 part of its window restored from the checkpoint."""
    kw = dict(steps=8, log_every=3, save_every=4)
    de.train(tiny_config(tmp_path / "straight", **kw))
    step_fn = de.train_step
    def killed_at_7(net, model, ema, opt, cfg, step, *args):
        if step == 6:
            raise Killed
        return step_fn(net, model, ema, opt, cfg, step, *args)
    monkeypatch.setattr(de, "train_step", killed_at_7)
    with pytest.raises(Killed):
        de.train(tiny_config(tmp_path / "killed", **kw))
    assert sorted(log_rows(tmp_path / "killed" / "log.csv")) == [3, 6]
    monkeypatch.setattr(de, "train_step", step_fn)
    de.train(tiny_config(tmp_path / "killed", resume=True, **kw))
    killed, straight = (tmp_path / name / "log.csv" for name in ("killed", "straight"))
    assert killed.read_text() == straight.read_text()


def test_a_changed_byte_in_a_checkpoint_never_loads_as_different_content(tmp_path, float32):
    """[robustness] Flipping any one of 32 bytes spread over latest.pt either makes load_checkpoint
    refuse the file with a one-line error naming it (unreadable, or content that does not match
    the digest saved with it), or, where the byte held nothing that is read back (zip padding,
    CRCs), loads exactly the content that was saved."""
    de.train(tiny_config(tmp_path / "run", steps=2))
    path = tmp_path / "run" / "latest.pt"
    good, data = de.load_checkpoint(str(path)), bytearray(path.read_bytes())
    refused = 0
    for pos in np.linspace(0, len(data) - 1, 32).astype(int):
        flipped = data.copy()
        flipped[pos] ^= 0xFF
        path.write_bytes(flipped)
        try:
            loaded = de.load_checkpoint(str(path))
        except de.DiffEncError as e:
            assert str(path) in str(e) and "\n" not in str(e)
            refused += 1
            continue
        assert de.content_digest(loaded) == de.content_digest(good)
    assert refused > 16


def test_same_seed_and_flags_give_the_same_loss_trace(tmp_path, float32):
    """[determinism] Two runs with the same seed and flags log identical losses (every digit), and
    a different seed changes them."""
    traces = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        de.train(tiny_config(tmp_path / name, steps=3, seed=seed))
        traces.append(log_rows(tmp_path / name / "log.csv"))
    assert traces[0] == traces[1] and traces[0] != traces[2]


def test_a_second_run_in_the_same_folder_is_refused_and_a_dead_runs_lock_is_not(tmp_path, capsys,
                                                                                 float32):
    """[robustness] While a run holds --out (its lock on run.lock), a second training there, with
    or without --resume, is refused with one line naming the holder's process id, and writes
    nothing. A lock file left by a run that died (no process holds the lock) does not block."""
    out = tmp_path / "run"
    de.train(tiny_config(out, steps=2))
    (out / "run.lock").write_text("999999")                              # a dead run's lock file
    de.train(tiny_config(out, steps=3, resume=True))                    # not blocked by it
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    held = de.lock_run_folder(str(out))                           # a live run holds the folder
    try:
        for extra in ([], ["--resume"]):
            argv = ["--train", "synthetic", *TINY, "--steps", 5, "--out", out, *extra]
            code, err = main_error(capsys, *argv)
            assert code == 2 and f"process {os.getpid()}" in err and err.count("\n") == 1
    finally:
        held.close()
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != "run.lock"} == {
        k: v for k, v in before.items() if k != "run.lock"}


def test_runs_started_in_the_same_instant_in_one_folder_are_told_it_is_in_use(tmp_path):
    """[robustness] Eight runs that start in the same instant in one --out (threads released by
    one barrier; 5 rounds, a new folder each): in every round exactly one gets the folder, and
    every other is told that the folder is in use by another run, never that it cannot be written
    (which a write test done before the lock, under a file name all runs shared, told most of
    them: 96 of 100 in a measurement from the command line)."""
    import threading
    for round_ in range(5):
        cfg = de.Config(out=str(tmp_path / f"run{round_}"))
        barrier, results = threading.Barrier(8), []

        def start():
            barrier.wait()
            try:
                results.append(de.prepare_out(cfg))
            except de.DiffEncError as e:
                results.append(str(e))
        threads = [threading.Thread(target=start) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        locks = [r for r in results if not isinstance(r, str)]
        for lock in locks:
            lock.close()
        refused = [r for r in results if isinstance(r, str)]
        assert len(locks) == 1 and len(refused) == 7
        assert all("in use by another training run" in r for r in refused), refused
        assert sorted(os.listdir(cfg.out)) == ["run.lock"]             # no test file left behind


def test_a_corrupt_log_is_cut_to_its_good_rows_and_a_log_or_lock_that_is_a_folder_is_named(
        tmp_path, capsys, float32):
    """[robustness] --resume keeps the rows of log.csv that parse (an integer step, numbers, the
    right count) and drops the rest, as it drops rows a kill cut short: a row whose step is not a
    number and bytes that are not text are gone, the good rows are kept byte for byte. A log.csv
    or a run.lock that is a folder gets one line naming it and exit code 2, and the run folder is
    left as it was."""
    out = tmp_path / "run"
    train = lambda steps, *extra: de.main(["--train", "synthetic", *map(str, TINY), "--steps",
                                           str(steps), "--save-every", "2", "--out", str(out),
                                           *extra])
    train(2)
    log = out / "log.csv"
    good = log.read_bytes()
    log.write_bytes(good + b"nan,1,2,3,4,5\nstep,1,2,3,4,5\n\xff\xfe\x00\x81garbage,,\n")
    train(3, "--resume")
    lines = log.read_bytes().splitlines(keepends=True)
    assert b"".join(lines[:3]) == good and len(lines) == 4 and lines[3].startswith(b"3,")
    for name in ("log.csv", "run.lock"):
        os.replace(out / name, tmp_path / name)
        (out / name).mkdir()
        before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
        capsys.readouterr()
        code, err = main_error(capsys, "--train", "synthetic", *TINY, "--steps", 4, "--out", out,
                               "--resume")
        assert code == 2 and err.count("\n") == 1 and str(out / name) in err, err
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
        (out / name).rmdir()
        os.replace(tmp_path / name, out / name)


def test_a_resume_that_changes_a_setting_says_so_and_uses_the_new_value(tmp_path, capsys, float32):
    """[usability] --resume with an optimisation setting other than the checkpoint's run (here
    --lr left at its default after a run at 1e-3, and --weight-decay 0.05) prints one line naming
    each, old and new, and the run uses the new values, weight decay included (AdamW's restored
    state would otherwise keep the old one silently). The same command plus --resume says
    nothing."""
    out = tmp_path / "run"
    run = lambda *extra: de.main(["--train", "synthetic", *map(str, TINY), "--steps", "2",
                                  "--out", str(out), *map(str, extra)])
    run("--lr", 1e-3)
    capsys.readouterr()
    run("--lr", 1e-3, "--steps", 2, "--resume")
    assert "settings other than" not in capsys.readouterr().out
    run("--weight-decay", 0.05, "--steps", 3, "--resume")
    note = [l for l in capsys.readouterr().out.splitlines() if "settings other than" in l]
    assert len(note) == 1 and "--lr 0.0002 (was 0.001)" in note[0], note
    assert "--weight-decay 0.05 (was 0.01)" in note[0] and "--steps 3 (was 2)" in note[0]
    groups = de.load_checkpoint(str(out / "latest.pt"))["opt"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    assert groups[0]["lr"] == pytest.approx(2e-4 * 3 / 100)                  # warm-up, new lr


def test_a_checkpoint_whose_optimiser_moments_do_not_fit_is_refused_in_one_line(tmp_path, capsys,
                                                                                 float32):
    """[robustness] The optimiser's state is saved by parameter position: a checkpoint written by
    a diffenc.py that built its layers in another order (simulated: two moments' positions
    swapped, digest recomputed) is refused on --resume with one line naming the fix, exit code 2,
    and the checkpoint is left as it was (a traceback from inside AdamW's first step before)."""
    out = tmp_path / "run"
    argv = ["--train", "synthetic", *TINY, "--steps", 2, "--out", out]
    de.main([str(a) for a in argv])
    ckpt = de.load_checkpoint(str(out / "latest.pt"))
    ckpt.pop("sha256")
    state = ckpt["opt"]["state"]
    i, j = next((i, j) for i in state for j in state
                if state[i]["exp_avg"].shape != state[j]["exp_avg"].shape)
    state[i], state[j] = state[j], state[i]
    de.save_checkpoint(ckpt, str(out / "latest.pt"))
    before = (out / "latest.pt").read_bytes()
    code, err = main_error(capsys, *argv[:-4], "--steps", 3, "--out", out, "--resume")
    assert code == 2 and err.count("\n") == 1 and "in another order" in err, err
    assert (out / "latest.pt").read_bytes() == before


# --------------------------------------------------------------------- 12. evaluation and figures


def test_png_writer_round_trips_through_zlib(tmp_path):
    """[output] write_png emits a valid PNG: signature, IHDR with the size and colour type, and an
    IDAT whose zlib stream decodes to the rows (each prefixed by filter byte 0), CRCs correct."""
    img = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    de.write_png(tmp_path / "a.png", img)
    data = (tmp_path / "a.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (length,), tag = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        crc = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])[0]
        assert zlib.crc32(tag + body) == crc
        chunks[tag] = body
        pos += 12 + length
    assert struct.unpack(">IIBB", chunks[b"IHDR"][:10]) == (7, 5, 8, 2)
    rows = zlib.decompress(chunks[b"IDAT"])
    assert rows == b"".join(b"\x00" + img[r].tobytes() for r in range(5))


def read_png(path):
    """Decode a PNG written by write_png (8-bit, filter 0 on every row) -> (H, W, C) uint8."""
    data, pos, chunks = open(path, "rb").read(), 8, {}
    while pos < len(data):
        (length,), tag = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        chunks[tag] = chunks.get(tag, b"") + data[pos + 8:pos + 8 + length]
        pos += 12 + length
    W, H, _, colour = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    C = 3 if colour == 2 else 1
    rows = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(H, 1 + W * C)
    assert (rows[:, 0] == 0).all()
    return rows[:, 1:].reshape(H, W, C)


def save_model(model, path, step=0):
    """A checkpoint of `model` (weights and EMA alike), as train() writes it."""
    assert de.save_checkpoint(de.checkpoint_state(model.cfg, model, model, None, step), path)
    return path


def test_bwr_colour_map_is_white_at_zero_red_above_blue_below():
    """[figures] The diverging map of the heat maps: 0 -> white, +lim -> pure red, -lim -> pure
    blue, clipped beyond +-lim; red never falls and blue never rises with the value, so colour
    reads as a signed scale."""
    # (1, 1, 401): -2 .. 2 in steps of 0.01
    v = torch.linspace(-2, 2, 401)[None, None]
    r, g, b = de.bwr(v, 1.0)[0, :, 0].int()                            # each (401,)
    assert (r[200], g[200], b[200]) == (255, 255, 255)
    assert (r[300], g[300], b[300]) == (255, 0, 0) and (r[100], g[100], b[100]) == (0, 0, 255)
    assert (r[300:] == 255).all() and (b[:100] == 255).all()
    assert (g[:100] == 0).all() and (g[300:] == 0).all()
    assert (r.diff() >= 0).all() and (b.diff() <= 0).all()


@given(lo=st.floats(-1e3, 1e3), width=st.floats(1e-3, 1e3))
def test_tick_values_are_round_evenly_spaced_and_inside_the_range(lo, width):
    """[figures] Axis ticks: 2 to 6 values inside [lo, hi], one step apart, the step 1, 2 or 5 times
    a power of ten, and labels with enough decimals that no two ticks read the same."""
    hi = lo + width
    ticks, dec = de.nice_ticks(lo, hi)
    step = ticks[1] - ticks[0]
    mantissa = step / 10 ** math.floor(math.log10(step) + 1e-9)
    assert 2 <= len(ticks) <= 6
    assert ticks[0] >= lo - 1e-9 * max(1, abs(lo)) and ticks[-1] <= hi + 1e-9 * max(1, abs(hi))
    assert np.allclose(np.diff(ticks), step) and min(abs(mantissa - m) for m in (1, 2, 5)) < 1e-6
    assert len({f"{v:.{dec}f}" for v in ticks}) == len(ticks)


def svg_curves(path):
    """The polylines of an SVG written by svg_plot: {stroke colour: points (n, 2)}, and its texts.
    """
    import xml.etree.ElementTree as ET
    root = ET.parse(path).getroot()
    ns = "{http://www.w3.org/2000/svg}"
    curves = {p.get("stroke"): np.array([[float(v) for v in pt.split(",")]
                                         for pt in p.get("points").split()])
              for p in root.iter(ns + "polyline")}
    return curves, [t.text for t in root.iter(ns + "text")]


def test_svg_plot_draws_straight_data_as_a_straight_rising_line_with_real_text(tmp_path):
    """[figures] svg_plot maps data to the page linearly: y = 2x + 1 is a straight polyline
    (residual < 0.01 px, the rounding of the file, from a fitted line) that rises to the right
    across most of the plot; a curve above it in data lies above it on the page; the axis labels,
    tick labels and legend are SVG text (escaped: a label with & and < reads back as written), the
    legend lies under the plot (below every curve and the x labels), and the file is well-formed
    XML."""
    x = np.linspace(0, 1, 11)
    de.svg_plot(tmp_path / "p.svg", x, [(2 * x + 1, "red", "low & <early>", False),
                                         (2 * x + 1.5, "blue", "high", True)], "t", "bpd")
    curves, texts = svg_curves(tmp_path / "p.svg")
    (cols, rows), above = curves["red"].T, curves["blue"]
    slope, icpt = np.polyfit(cols, rows, 1)
    assert np.abs(rows - (slope * cols + icpt)).max() < 0.01
    assert slope < 0 and cols.max() - cols.min() > 0.8 * 480
    assert (above[:, 1] < rows).all() and np.allclose(above[:, 0], cols)
    assert {"t", "bpd", "low & <early>", "high", "0.0", "1.0"} <= set(texts)
    import xml.etree.ElementTree as ET                                  # the legend: under the plot
    legend_y = [float(e.get("y")) for e in ET.parse(tmp_path / "p.svg").getroot().iter()
                if e.text in ("low & <early>", "high")]
    assert len(legend_y) == 2 and min(legend_y) > max(rows.max(), above[:, 1].max()) + 20


def test_inspect_shows_an_encoder_that_starts_at_the_data_and_stays_in_range(tmp_path):
    """[figures] --inspect of a learned encoder with random (non-trivial) weights: the learned
    part x_phi - alpha^2 x = sigma^2 y is at most sigma_0^2 = 1.7e-6 at t = 0 (the encoder starts
    at the data) and visible later; x_phi stays in (-1, 1) at every t (a convex mix of x and
    y = tanh(.)), and at t = 0 its min/mean/max are the data's to within 2 sigma_0^2. The grid has
    two rows per image (x_phi, learned part) and a column per t."""
    model = small_model("learned", image=(1, 16, 16), dataset="synthetic", batch_size=8)
    ckpt = save_model(model, tmp_path / "enc.pt")
    args = de.build_parser().parse_args(["--inspect", str(ckpt)])
    added, rate, stats = de.run_inspect(args.inspect, args)
    sigma2_0 = torch.sigmoid(torch.tensor(-13.3)).item()
    assert added[:, 0].abs().max() <= sigma2_0 and added[:, -1].abs().max() > 0.05
    assert rate.shape[:2] == (de.INSPECT_ROWS, len(de.RATE_TS)) and rate.isfinite().all()
    x = de.scale_pixels(de.synthetic("test")[:8])
    assert np.allclose(stats[0], [x.min(), x.mean(), x.max()], atol=2 * sigma2_0)
    assert (stats[:, 0] <= stats[:, 1]).all() and (stats[:, 1] <= stats[:, 2]).all()
    assert (stats[:, 0] > -1).all() and (stats[:, 2] < 1).all()
    csv = (tmp_path / "inspect_step0_range.csv").read_text().splitlines()
    assert csv[0] == "t,min,mean,max" and len(csv) == 1 + len(de.RANGE_TS)
    grid = read_png(tmp_path / "inspect_step0_grid.png")
    # panels are upscaled to >= 96 px
    k = 96 // 16
    assert grid.shape == (k * (2 * de.INSPECT_ROWS * 18 + 2), k * (len(de.INSPECT_TS) * 18 + 2), 3)
    curves, _ = svg_curves(tmp_path / "inspect_step0_range.svg")              # min, mean, max
    assert all(len(c) == len(de.RANGE_TS) for c in curves.values()) and len(curves) == 3


def test_per_t_curve_at_initialisation_matches_its_closed_form_and_pairs_checkpoints(tmp_path,
                                                                                     capsys):
    """[figures] --eval --per-t evaluates the diffusion-loss integrand at fixed t. At initialisation
    the VDM's score net is its base measure, v_hat = z, so err = alpha ((alpha + sigma) x +
    (sigma - alpha) eps) and E_eps of the integrand is gamma'/2 alpha^2 ((alpha + sigma)^2 |x|^2 / d
    + (sigma - alpha)^2) / ln 2 bpd; the curve must match it within 5 standard errors at every t.
    Two checkpoints see the same images and eps: a checkpoint against itself differs by exactly 0,
    per t and in total."""
    model = small_model("none", image=(1, 16, 16), dataset="synthetic")
    ckpt = save_model(model, tmp_path / "vdm.pt")
    args = de.build_parser().parse_args(["--eval", str(ckpt), str(ckpt), "--per-t", "--eval-images",
                                         "32", "--eval-samples", "2", "--batch-size", "32"])
    curves = de.run_eval(args.eval, args)
    x = de.scale_pixels(de.synthetic("test")[:32])
    gamma, dgamma = torch.func.jvp(model.schedule, (torch.tensor(de.PER_T),),
                                   (torch.ones(len(de.PER_T)),))
    alpha, sigma = de.alpha_sigma(gamma)
    x2 = x.pow(2).flatten(1).mean(1)[:, None]                          # (32, 1): |x|^2 / d
    exact = (dgamma / 2 * alpha ** 2 * ((alpha + sigma) ** 2 * x2 + (sigma - alpha) ** 2)
             / math.log(2)).mean(0)
    se = curves[0].std(0) / math.sqrt(32)
    assert ((curves[0].mean(0) - exact).abs() <= 5 * se + 1e-9).all()
    assert torch.equal(curves[0], curves[1])
    table = (tmp_path / "per_t.csv").read_text().splitlines()
    assert table[0] == "t,mean_1,se_1,mean_2,se_2,diff_2_1,se_diff"
    assert len(table) == 1 + len(de.PER_T)
    assert all(float(v) == 0 for row in table[1:] for v in row.split(",")[5:])
    assert "+0.0000 ± 0.0000 bpd (paired" in capsys.readouterr().out


# ---------------------------------------------------------------------------------- 13. benchmark


def test_bench_times_vdm_and_diffenc_and_counts_the_encoders_flops(capsys, float32):
    """[scale] --bench times VDM (encoder none) and DiffEnc (learned) on the same data and prints
    their paired ratio; the FLOP counter sees the encoder (its jvp and its boundary call), so
    DiffEnc's count is the larger. Sampling is timed as users sample: in eval mode (no dropout),
    once per variant and round."""
    cfg = tiny_config("unused", dataset="synthetic", batch_size=4)
    modes, sample = [], de.sample
    def recording_sample(model, *args, **kw):
        modes.append(model.training)
        return sample(model, *args, **kw)
    try:
        de.sample = recording_sample
        results = de.bench(cfg, rounds=2, warmup=0, sample_batch=2)
    finally:
        de.sample = sample
    assert modes == [False] * 4
    out = capsys.readouterr().out
    assert "learned/none amp=0 compile=0: train" in out and out.count("GFLOP/step") == 2
    assert set(results) == {("none", False, False), ("learned", False, False)}
    assert results["none", False, False]["flops"] < results["learned", False, False]["flops"]
    assert all(r[key] > 0 for r in results.values() for key in ("train", "sample", "flops"))


def test_flop_count_includes_the_fused_attention():
    """[scale] The FLOP count of a training step is the same whether the score network's
    attention runs fused or plain: PyTorch's counter has no rule for the CPU's fused kernel, so
    step_flops counts attention in its plain form (else MFU would omit the attention's work)."""
    model = small_model(encoder="none")
    x = torch.randint(0, 256, (2, 1, 8, 8))
    batch = (x, *de.draw_noise(0, 0, 2, (1, 8, 8)))
    count = {}
    for fused in (True, False):
        model.score.attn.fused = fused
        count[fused] = de.step_flops(lambda: model(*batch)[0].sum().backward())
    assert count[True] == count[False] > 0


# ------------------------------------------------------------------------------- 14. command line


def run_cli(*args, check=True, **kw):
    """Run `python diffenc.py ARGS` in a fresh process (as a user would); returns CompletedProcess.
    """
    proc = subprocess.run([sys.executable, os.path.join(HERE, "diffenc.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=300, **kw)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


TINY = ["--size", "tiny", "--n-embd", "8", "--norm-groups", "4", "--enc-ch", "8",
        "--enc-norm-groups", "2", "--batch-size", "8", "--eval-images", "16",
        "--log-every", "1", "--sample-steps", "10"]


def test_cli_trains_resumes_evaluates_and_samples(tmp_path, capsys, float32):
    """[CLI] The user's path end to end on the built-in synthetic set, through main() with the
    command line's arguments: train 4 steps (checkpoint), resume to 6, evaluate (BPD with standard
    error and its split) and sample a PNG grid. (`python diffenc.py` as a process of its own, whose
    start-up costs seconds, runs in the tests of torchrun, SIGKILL and bad input from a shell.)"""
    out = tmp_path / "run"
    de.main([str(a) for a in ("--train", "synthetic", *TINY, "--steps", 4, "--save-every", 2,
                              "--eval-every", 4, "--out", out)])
    assert {"latest.pt", "best.pt", "log.csv"} <= set(os.listdir(out))
    de.main([str(a) for a in ("--train", "synthetic", *TINY, "--steps", 6, "--save-every", 2,
                              "--eval-every", 4, "--out", out, "--resume")])
    assert "from step 4 to 6" in capsys.readouterr().out
    de.main(["--eval", str(out / "latest.pt"), "--batch-size", "64", "--eval-images", "64"])
    ev = capsys.readouterr().out
    assert "test bpd" in ev and "±" in ev and "64 images" in ev
    assert all(name in ev for name in ("diffusion", "latent", "recon"))
    de.main(["--sample", str(out / "latest.pt"), "--n-samples", "4"])
    png = (out / "samples_step6_T10.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_minutes_ends_training_as_a_last_step_and_resume_continues_bit_exactly(tmp_path,
                                                                               capsys):
    """[training] --minutes M stops training once M minutes have passed, at a step boundary, and
    treats that step as the last: a checkpoint and a test evaluation there. The checkpoint is the
    one a run of exactly that many steps writes, so --resume (no limit) continues bit for bit
    (with --downsample 1: the score U-Net's resampling layers resume too; with --lr-decay cosine:
    the learning rate is a function of the step and the run's --steps alone)."""
    common = ["--train", "synthetic", *TINY, "--downsample", "1", "--steps", "3", "--lr-decay",
              "cosine"]
    de.main(common + ["--minutes", "1e-9", "--out", str(tmp_path / "cut")])   # stops at step 1
    out = capsys.readouterr().out
    assert "--minutes 1e-09 reached after step 1" in out and "step 1 | test bpd" in out, out
    assert torch.load(tmp_path / "cut" / "latest.pt", weights_only=True)["step"] == 1
    de.main(common + ["--out", str(tmp_path / "cut"), "--resume"])
    de.main(common + ["--out", str(tmp_path / "whole")])
    cut, whole = (torch.load(tmp_path / r / "latest.pt", weights_only=True)
                  for r in ("cut", "whole"))
    assert cut["step"] == whole["step"] == 3
    assert all(torch.equal(cut[part][k], whole[part][k]) for part in ("model", "ema")
               for k in whole[part])


def test_race_trains_both_models_for_the_wall_time_and_tables_bpd_and_sample_quality(
        tmp_path, monkeypatch, capsys):
    """[CLI] --race mnist trains the VDM and DiffEnc (--out/vdm, --out/diffenc) for --minutes
    each, evaluates both on the same test images (the paired difference is the difference of
    the two bpd columns), samples each with its sample quality, and prints one table with the
    real images' ceiling; --encoder, --increment, --resume and --model em are refused."""
    fake_mnist(tmp_path, monkeypatch)
    out = tmp_path / "race"
    argv = ["--race", "mnist", *TINY, "--minutes", "1e-9", "--n-samples", "4", "--data-dir",
            tmp_path, "--out", out]
    rows = de.run_race(de.build_parser().parse_args([str(a) for a in argv]))
    table = capsys.readouterr().out.split("race: mnist")[1]
    for (name, step, total, quality), encoder in zip(rows, ("none", "learned")):
        ckpt = torch.load(out / name / "latest.pt", weights_only=True)
        assert ckpt["config"]["encoder"] == encoder and ckpt["config"]["minutes"] == 1e-9
        assert step == ckpt["step"] == 1 and len(total) == 16
        model = de.model_from_checkpoint(ckpt, torch.device("cpu"))   # the same t and eps for both
        test = de.load_dataset("mnist", str(tmp_path), "test")
        assert torch.equal(total, de.evaluate(model, test, 8, 0, 16).sum(1))
        assert f"{total.mean():.4f} ± {de.std_err(total):.4f}" in table
        assert f"{quality[0][0][0]:.3f} ± {quality[0][0][1]:.3f}" in table
        assert list((out / name).glob("samples_step1_T10.png"))
    d = rows[1][2] - rows[0][2]
    assert f"{d.mean():+.4f} ± {de.std_err(d):.4f} bpd" in table and d.abs().max() > 0
    assert f"ceiling): IS-like {rows[0][3][1][0][0]:.3f}" in table
    for extra, words in ((["--encoder", "none"], "--encoder means nothing to --race"),
                         (["--increment", "exp"], "--increment means nothing to --race"),
                         (["--model", "em"], "drop --model em"),
                         (["--beta", "0.5"], "add --model em")):
        code, err = main_error(capsys, *argv, *extra)
        assert code == 2 and err.count("\n") == 1 and words in err, (extra, err)


def main_error(capsys, *argv):
    """Run main() in-process; return the exit code and stderr (the message a user sees)."""
    with pytest.raises(SystemExit) as e:
        de.main([str(a) for a in argv])
    return e.value.code, capsys.readouterr().err


def test_sample_prints_the_quality_of_mnist_samples_for_diffenc_and_em_checkpoints(
        tmp_path, monkeypatch, capsys, float32):
    """[sample quality] --sample on an MNIST checkpoint, of --model diffenc and of --model em (its
    generations), prints the sample-quality line for its n samples beside the ceiling of the first
    n test images, and for em the class agreement of its reconstructions, as --eval of the em
    checkpoint does; on another data set it prints none (the classifier knows MNIST only)."""
    fake_mnist(tmp_path, monkeypatch)
    for name, kw in (("diffenc", {}), ("em", dict(model="em", encoder="none", latent_dim=4,
                                                  latent_width=8, latent_steps=3,
                                                  langevin_steps=2))):
        de.train(tiny_config(tmp_path / name, dataset="mnist", data_dir=str(tmp_path), steps=1,
                             **kw))
        capsys.readouterr()
        de.main(["--sample", str(tmp_path / name / "latest.pt"), "--n-samples", "4",
                 "--sample-steps", "3"])
        out = capsys.readouterr().out
        assert "sample quality (4 images; MNIST classifier" in out, name
        assert ("class agreement" in out) == (name == "em"), out
    de.main(["--eval", str(tmp_path / "em" / "latest.pt"), "--eval-images", "6", "--batch-size",
             "3", "--sample-steps", "2"])
    assert "class agreement" in capsys.readouterr().out
    de.train(tiny_config(tmp_path / "synthetic", steps=1))
    capsys.readouterr()
    de.main(["--sample", str(tmp_path / "synthetic" / "latest.pt"), "--n-samples", "4",
             "--sample-steps", "3"])
    assert "sample quality" not in capsys.readouterr().out


def test_em_mode_trains_resumes_bit_exactly_evaluates_pairs_and_samples(tmp_path, capsys,
                                                                       float32):
    """[Diffusion Encoder: the mode] --model em end to end on the synthetic set: 4 steps straight,
    and 2 steps then --resume to 4, give the same log.csv (with the encoder's loss and Delta U
    columns) and the same weights, EMA and optimiser state, bit for bit; --eval prints the bound
    D + R with D, R and D_prior - D, each with a standard error, and pairs it with a VDM
    checkpoint, and plots the run's log (bpd, encoder loss, Delta U); --sample writes the
    generation and reconstruction grids. Combinations the mode does not support are refused with
    one line and exit code 2, and so are its training options given to --eval, --sample or
    --tune-schedule (the checkpoint holds them), and --latent-steps for a checkpoint that has no
    latent encoder."""
    em = lambda out, **kw: tiny_config(out, model="em", encoder="none", latent_dim=4,
                                       latent_width=8, latent_steps=3, langevin_steps=2,
                                       latent_cond="spatial", latent_gate=True, beta_warmup=3,
                                       latent_skip=True, **kw)  # the warm-up spans the resume
    straight, resumed, vdm = tmp_path / "straight", tmp_path / "resumed", tmp_path / "vdm"
    de.train(em(straight, steps=4))
    de.train(em(resumed, steps=2))
    de.train(em(resumed, steps=4, resume=True))
    assert (straight / "log.csv").read_text() == (resumed / "log.csv").read_text()
    header, *rows = (straight / "log.csv").read_text().splitlines()
    assert header == "step,bpd,diffusion,latent,recon,enc_nll,delta_U,lr" and len(rows) == 4
    a, b = (de.load_checkpoint(str(d / "latest.pt")) for d in (straight, resumed))
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    assert all(torch.equal(a["opt"]["state"][i][k], b["opt"]["state"][i][k])
               for i in a["opt"]["state"] for k in a["opt"]["state"][i])
    de.train(tiny_config(vdm, steps=1, encoder="none"))
    capsys.readouterr()
    de.main(["--eval", str(straight / "latest.pt"), str(vdm / "latest.pt"), "--batch-size", "8",
             "--sample-steps", "3", "--eval-images", "32"])
    out = capsys.readouterr().out
    for words in ("= D + R, an upper bound", "D_prior - D", "D_other - D", "minus", "recon",
                  "em_log_dU.svg", "distance ratio", "3 decoder steps",
                  "E-step: D_other - D of its z_K"):
        assert words in out, out
    assert (straight / "em_log_dU.svg").read_text().startswith("<svg")
    assert all(" ± " in line for line in out.splitlines() if line.strip()[:1] in ("D", "R"))
    de.main(["--sample", str(straight / "latest.pt"), "--n-samples", "4", "--sample-steps", "3"])
    for grid in ("samples", "recon"):
        assert (straight / f"em_step4_T3_{grid}.png").read_bytes()[:4] == b"\x89PNG"
    ckpt = straight / "latest.pt"
    for argv, words in (
            (["--train", "synthetic", *TINY, "--model", "em", "--T", 5], "drop --T 5"),
            (["--train", "synthetic", *TINY, "--model", "em", "--compile"], "drop --compile"),
            (["--train", "synthetic", *TINY, "--model", "em", "--weight-bias", 2, "--steps", 1,
              "--out", tmp_path / "em_weighted"], "drop --weight-bias"),
            (["--bench", "synthetic", "--model", "em"], "drop --model em"),
            (["--eval", ckpt, "--per-t"], "drop --T, --per-t"),
            (["--tune-schedule", ckpt, "--T", 4], "--model em checkpoint"),
            (["--sample", ckpt, "--sigma-p", "optimal"], "drop --sigma-p optimal"),
            (["--train", "synthetic", *TINY, "--model", "em", "--latent-dim", 65], "--latent-dim"),
            (["--train", "synthetic", *TINY, "--model", "em", "--lam", 1], "--lam must be"),
            (["--train", "synthetic", *TINY, "--model", "em", "--langevin-shared", "--lam", 0.5,
              "--out", tmp_path / "em_shared"], "--lam 0"),
            (["--train", "synthetic", *TINY, "--model", "em", "--langevin-shared",
              "--langevin-steps", 0, "--out", tmp_path / "em_shared"], "--langevin-steps >= 1"),
            (["--train", "synthetic", *TINY, "--model", "em", "--latent-encoder", "gaussian",
              "--langevin-shared"], "drop --langevin-shared"),
            (["--train", "synthetic", *TINY, "--langevin-shared"],
             "--langevin-shared is an option of --model em"),
            (["--train", "synthetic", *TINY, "--steps", 1, "--out", tmp_path / "vdm_beta",
              "--beta", 0.5], "--beta is an option of --model em"),
            (["--eval", ckpt, "--beta", 0.5], "--beta is a training option of --model em"),
            (["--sample", ckpt, "--langevin-eta", 0.1], "drop --langevin-eta"),
            (["--eval", vdm / "latest.pt", "--latent-steps", 5], "drop --latent-steps"),
            (["--eval", vdm / "latest.pt", "--sample-steps", 5], "drop --sample-steps"),
            (["--eval", vdm / "latest.pt", "--depths", 2, "--sample-steps", 5],
             "drop --T, --per-t, --sigma-p and --sample-steps"),
            (["--sample", vdm / "latest.pt", "--latent-steps", 5], "drop --latent-steps"),
            (["--tune-schedule", vdm / "latest.pt", "--T", 4, "--latent-steps", 5],
             "drop --latent-steps")):
        code, err = main_error(capsys, *argv)
        assert code == 2 and err.count("\n") == 1 and words in err, (argv, err)


def test_the_shared_e_step_resumes_bit_exactly(tmp_path, float32):
    """[Diffusion Encoder: --langevin-shared, resume] 4 steps straight, and 2 then --resume to 4,
    give the same log.csv and weights, bit for bit: the shared M-step's dropout masks and their
    replay for Delta U are functions of the step, like every other draw."""
    em = lambda out, **kw: tiny_config(out, model="em", encoder="none", latent_dim=4,
                                       latent_width=8, latent_steps=3, langevin_steps=2,
                                       langevin_shared=True, langevin_precond=True,
                                       langevin_eta=0.3, latent_skip=True, **kw)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    de.train(em(straight, steps=4))
    de.train(em(resumed, steps=2))
    de.train(em(resumed, steps=4, resume=True))
    log = (straight / "log.csv").read_text()
    assert log == (resumed / "log.csv").read_text() and len(log.splitlines()) == 5
    a, b = (de.load_checkpoint(str(d / "latest.pt")) for d in (straight, resumed))
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])


def test_gaussian_encoder_trains_resumes_bit_exactly_evaluates_and_samples(tmp_path, capsys,
                                                                          float32):
    """[Gaussian encoder: the mode] --model em --latent-encoder gaussian end to end on the synthetic
    set: 6 steps straight, and 3 then --resume to 6, give the same log.csv (with the rate column,
    which is positive: the encoder left the prior) and the same weights bit for bit; --eval prints
    D + R with R from the exact Gaussian log q, D_prior - D and the distance ratio, and with two
    checkpoints their rate-distortion table and rd.svg; --sample
    writes both grids; with --latent-cond film (and the em test's spatial with --latent-gate),
    resume stays bit-exact.
    --latent-encoder or --latent-cond outside its choices, or without --model em, or given to
    --eval, and the diffusion encoder's options given with gaussian (to --train, or
    --latent-steps to --eval of its checkpoint), get one line and exit code 2."""
    gauss = lambda out, **kw: tiny_config(out, model="em", encoder="none", latent_dim=4,
                                          latent_width=8, latent_encoder="gaussian", lr=1e-2,
                                          warmup=1, latent_cond="film", **kw)  # lr: leave the prior
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    de.train(gauss(straight, steps=6))   # z reaches the decoder's output from step 3 (ScoreUNet)
    de.train(gauss(resumed, steps=3))
    de.train(gauss(resumed, steps=6, resume=True))
    log = (straight / "log.csv").read_text()
    assert log == (resumed / "log.csv").read_text()
    header, *rows = log.splitlines()
    assert header == "step,bpd,diffusion,latent,recon,rate,lr" and len(rows) == 6
    assert float(rows[-1].split(",")[5]) > 0
    a, b = (de.load_checkpoint(str(d / "latest.pt")) for d in (straight, resumed))
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    assert isinstance(de.model_from_checkpoint(a, torch.device("cpu")).latent_enc,
                      de.GaussianEncoder)
    capsys.readouterr()
    ckpt = straight / "latest.pt"
    de.main(["--eval", str(ckpt), str(ckpt), "--batch-size", "8", "--sample-steps", "3",
             "--eval-images", "32"])
    out = capsys.readouterr().out
    for words in ("= D + R, an upper bound", "the Gaussian encoder, mu + sigma xi,", "D_prior - D",
                  "distance ratio", "em_log_rate.svg", "| gaussian | 1 | 6 |", "rd.svg"):
        assert words in out, out
    assert (straight / "rd.svg").read_text().count("<circle") == 2 + 2  # two dots, two legend
    de.main(["--sample", str(ckpt), "--n-samples", "4", "--sample-steps", "3"])
    for grid in ("samples", "recon"):
        assert (straight / f"em_step6_T3_{grid}.png").read_bytes()[:4] == b"\x89PNG"
    em = ["--train", "synthetic", *TINY, "--model", "em", "--steps", 1, "--out", tmp_path / "new"]
    for argv, words in (
            ([*em, "--latent-encoder", "vae"], "--latent-encoder: invalid choice: 'vae'"),
            ([*em, "--latent-cond", "concat"], "--latent-cond: invalid choice: 'concat'"),
            (["--train", "synthetic", *TINY, "--latent-cond", "film"],
             "--latent-cond is an option of --model em"),
            (["--eval", ckpt, "--latent-cond", "spatial"], "--latent-cond is a training option"),
            (["--train", "synthetic", *TINY, "--latent-encoder", "gaussian"],
             "--latent-encoder is an option of --model em"),
            ([*em, "--latent-encoder", "gaussian", "--langevin-eta", 0.1], "drop --langevin-eta"),
            ([*em, "--latent-encoder", "gaussian", "--latent-steps", 5], "drop --latent-steps"),
            ([*em, "--latent-encoder", "gaussian", "--latent-skip"], "drop --latent-skip"),
            (["--train", "synthetic", *TINY, "--steps", 1, "--latent-skip"],
             "--latent-skip is an option of --model em"),
            (["--eval", ckpt, "--latent-steps", 5], "--latent-encoder gaussian checkpoint"),
            (["--sample", ckpt, "--latent-steps", 5], "--latent-encoder gaussian checkpoint")):
        code, err = main_error(capsys, *argv)
        assert code == 2 and err.count("\n") == 1 and words in err, (argv, err)


def test_the_rate_distortion_report_tables_each_checkpoint_and_plots_d_against_r(tmp_path,
                                                                              capsys):
    """[rate-distortion picture] report_rate_distortion prints one table row per checkpoint
    (encoder, beta, step, D + R, R, D, agreement in %, distance ratio, each mean ± standard error
    over images) and draws rd.svg with R across and D up: the checkpoint with the larger rate is
    the dot further right, the one with the larger distortion the dot higher up (smaller SVG y),
    each labelled by its encoder's initial and beta."""
    cfg = lambda enc, beta: de.Config(model="em", latent_encoder=enc, beta=beta)
    one = torch.ones(4)
    bpd_a = torch.stack([1.0 * one, 0.1 * one, 0.1 * one, 0.02 * one, one, one], 1)  # D 1.2
    bpd_b = torch.stack([0.5 * one, 0.1 * one, 0.1 * one, 0.30 * one, one, one], 1)  # D 0.7
    rows = [(str(tmp_path / "a" / "latest.pt"), cfg("diffusion", 1.0), 7, bpd_a, 0.9 * one,
             0.5 * one), (str(tmp_path / "b.pt"), cfg("gaussian", 0.1), 9, bpd_b, 0.5 * one, None)]
    (tmp_path / "a").mkdir()
    de.report_rate_distortion(rows)
    out = capsys.readouterr().out
    assert "| diffusion | 1 | 7 | 1.2200 ± 0.0000 | 0.02000 ± 0.00000 | 1.2000 ± 0.0000 | " \
           "50.0 ± 0.0 | 0.900 ± 0.000 |" in out, out
    assert "| gaussian | 0.1 | 9 | 1.0000 ± 0.0000 | 0.30000 ± 0.00000 | 0.7000 ± 0.0000 |  | " \
           "0.500 ± 0.000 |" in out, out
    svg = (tmp_path / "a" / "rd.svg").read_text()
    dots = re.findall(r'<circle cx="([\d.]+)" cy="([\d.]+)" r="4" fill="[^"]+"/>\n<text[^>]*>'
                      r'([^<]+)</text>', svg)
    (xa, ya, la), (xb, yb, lb) = [(float(x), float(y), label) for x, y, label in dots[:2]]
    assert (la, lb) == ("d 1", "g 0.1")
    assert xb > xa and ya < yb                     # b: more rate (right), a: more distortion (up)
    assert "R (bpd)" in svg and "D (bpd)" in svg


def test_the_rate_distortion_report_pairs_the_two_encoders_at_each_beta(tmp_path, capsys):
    """[rate-distortion picture] At a beta with both encoders the report prints the diffusion
    encoder minus the Gaussian one per image, then its mean and standard error: here D + R is
    larger by exactly 0.0100 bpd on every image (D by 0.008, R by 0.002) while both vary across
    images, so the paired standard error is 0 and an unpaired one would not be; agreement differs
    on one image of four (+25 ± 25 points), the distance ratio by exactly 0.1. A beta with one
    encoder (1 here) gets no such line."""
    cfg = lambda enc, beta: de.Config(model="em", latent_encoder=enc, beta=beta)
    base = torch.tensor([1.0, 1.3, 0.7, 1.1])                        # varies across images
    zero, one = torch.zeros(4), torch.ones(4)
    bpd = lambda dd, dr: torch.stack([base + dd, zero, zero, 0.02 * one + dr, one, one], 1)
    ratio = torch.tensor([0.5, 0.9, 0.6, 0.8])
    rows = [(str(tmp_path / "d.pt"), cfg("diffusion", 0.1), 5, bpd(0.008, 0.002), ratio + 0.1,
             torch.tensor([1.0, 1, 0, 0])),
            (str(tmp_path / "g.pt"), cfg("gaussian", 0.1), 5, bpd(0, 0), ratio,
             torch.tensor([1.0, 0, 0, 0])),
            (str(tmp_path / "g1.pt"), cfg("gaussian", 1.0), 5, bpd(0, 0), ratio, None)]
    de.report_rate_distortion(rows)
    lines = [l for l in capsys.readouterr().out.splitlines() if "minus Gaussian" in l]
    assert len(lines) == 1 and "beta 0.1," in lines[0], lines
    assert ("D + R +0.0100 ± 0.0000 bpd, class agreement +25.0 ± 25.0 points, distance ratio "
            "+0.100 ± 0.000") in lines[0], lines


def test_an_unstable_e_step_stops_before_touching_the_weights_and_names_the_step_size(tmp_path,
                                                                                     float32):
    """[Diffusion Encoder: NaN handling] A Langevin step far too large (eta = 1e30) sends the
    E-step's latents to infinity and the report to NaN at the first step: training stops as for a
    non-finite loss, writes no checkpoint, and the message names --langevin-eta as well as --lr."""
    cfg = tiny_config(tmp_path / "run", steps=4, model="em", encoder="none", latent_dim=4,
                      latent_width=8, latent_steps=3, langevin_steps=2, langevin_eta=1e30)
    with pytest.raises(SystemExit, match="non-finite loss .* at step 1") as e:
        de.train(cfg)
    assert "--langevin-eta" in str(e.value.code) and not (tmp_path / "run" / "latest.pt").exists()


def test_bad_input_gets_one_line_naming_the_fix_with_exit_code_2(tmp_path, monkeypatch, capsys,
                                                                 float32):
    """[robustness] Each bad input ends with exit code 2 and exactly one line on stderr that says
    what is wrong and what to do, in every mode (--train, --eval, --sample), and nothing is
    overwritten or created: a --resume of a missing folder does not create it. An option that the
    mode does not read (--out for --eval, --T for --inspect, ...) is refused, not ignored."""
    offline = lambda *a, **k: (_ for _ in ()).throw(urllib.error.URLError("offline"))
    monkeypatch.setattr(de.urllib.request, "urlopen", offline)
    run = tmp_path / "run"
    de.train(tiny_config(run, steps=2))
    vdm = tmp_path / "vdm"
    de.train(tiny_config(vdm, steps=1, encoder="none"))
    not_ckpt, truncated = tmp_path / "notes.txt", tmp_path / "trunc.pt"
    not_ckpt.write_text("hello")
    truncated.write_bytes((run / "latest.pt").read_bytes()[:2000])
    a_file = tmp_path / "file"
    a_file.write_text("x")
    base = ["--size", "tiny", "--n-embd", 8, "--norm-groups", 4, "--enc-ch", 8,
            "--enc-norm-groups", 2, "--batch-size", 8]
    cases = [  # (argv, words the message must contain)
        (["--train", "imagenet", *base], "the data set must be one of"),
        (["--train", "mnist", *base, "--data-dir", tmp_path / "empty", "--out", tmp_path / "o1"],
         "train-images-idx3-ubyte.gz"),
        (["--eval", truncated], "truncated or corrupt"),
        (["--eval", not_ckpt], "truncated or corrupt"),
        (["--eval", tmp_path / "missing.pt"], "no checkpoint"),
        (["--train", "synthetic", *base, "--n-embd", 16, "--out", run, "--resume"], "--n-embd 8"),
        (["--train", "synthetic", *base, "--out", run], "--resume"),
        (["--train", "synthetic", *base, "--enc-levels", 5, "--out", tmp_path / "o2"],
         "--enc-levels"),
        (["--train", "synthetic", *base, "--downsample", 5, "--out", tmp_path / "o6"],
         "lower --downsample"),
        (["--train", "synthetic", "--size", "tiny", "--norm-groups", 32, "--out", tmp_path / "o3"],
         "--norm-groups"),
        (["--train", "synthetic", *base, "--steps", 0], "--steps must be positive"),
        (["--train", "synthetic", *base[:-1], -4], "--batch-size must be positive"),
        (["--train", "synthetic", *base, "--lr", -1], "--lr must be positive"),
        (["--train", "synthetic", *base, "--warmup", 0], "--warmup must be at least 1"),
        (["--train", "synthetic", *base, "--warmup", -1], "--warmup must be at least 1"),
        (["--train", "synthetic", *base, "--dropout", 1.5], "--dropout must be in [0, 1)"),
        (["--train", "synthetic", *base, "--seed", -1], "--seed must be in"),
        (["--train", "synthetic", *base, "--weight-decay", -1], "--weight-decay must be 0 or more"),
        (["--train", "synthetic", *base, "--eval-images", -5], "--eval-images must be"),
        (["--train", "synthetic", "--size", "tiny", "--n-embd", 1, "--out", tmp_path / "o4"],
         "--norm-groups"),
        (["--train", "synthetic", *base, "--data-dir", a_file], "--data-dir must be a folder"),
        (["--train", "synthetic", *base, "--out", tmp_path / "never", "--resume"], "no checkpoint"),
        (["--eval", run / "latest.pt", "--batch-size", -1], "--batch-size must be positive"),
        (["--eval", run / "latest.pt", "--eval-images", -1], "--eval-images must be"),
        (["--sample", run / "latest.pt", "--sample-steps", -3], "--sample-steps must be positive"),
        (["--sample", run / "latest.pt", "--sample-steps", 0], "--sample-steps must be positive"),
        (["--train", "synthetic", *base, "--out", a_file / "sub"], "writable"),
        (["--inspect", vdm / "latest.pt"], "--encoder learned"),
        (["--sample", run / "latest.pt", "--per-t"], "--per-t is an option of --eval"),
        (["--eval", run / "latest.pt", "--out", tmp_path / "o5"], "--out means nothing to --eval"),
        (["--inspect", run / "latest.pt", "--T", 5], "--T means nothing to --inspect"),
        (["--sample", run / "latest.pt", "--eval-images", 5], "drop --eval-images"),
        (["--tune-schedule", run / "latest.pt", "--T", 4, "--n-samples", 5], "drop --n-samples"),
        (["--train", "synthetic", *base, "--n-samples", 4], "--n-samples means nothing to"),
        (["--bench", "synthetic", "--steps", 3], "--steps means nothing to --bench"),
        (["--bench", "synthetic", "--minutes", 1], "--minutes means nothing to --bench"),
        (["--sample", run / "latest.pt", "--minutes", 1], "--minutes means nothing to --sample"),
    ]
    before = (run / "latest.pt").read_bytes()
    for argv, words in cases:
        code, err = main_error(capsys, *argv)
        assert code == 2, (argv, err)
        assert err.count("\n") == 1 and err.startswith("diffenc: ") and words in err, (argv, err)
    assert (run / "latest.pt").read_bytes() == before
    assert not (tmp_path / "never").exists()


def test_ctrl_c_during_start_up_prints_one_line_and_exits_130(tmp_path, monkeypatch, capsys):
    """[robustness] Ctrl-C before training has installed its signal handler (here: while the data
    loads) ends with exit code 130 and one line, not a KeyboardInterrupt traceback."""
    def interrupted(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(de, "load_dataset", interrupted)
    code, err = main_error(capsys, "--train", "synthetic", *TINY, "--out", tmp_path / "run")
    assert code == 130 and err.count("\n") == 1 and "interrupted" in err


def test_a_checkpoint_whose_settings_break_the_rules_is_refused_in_one_line(tmp_path, capsys):
    """[robustness] A checkpoint is checked as flags are: one saved with a setting out of range
    (here --dropout 1.5, with a valid digest: intact, but not something diffenc.py writes) gets
    one line naming the setting and exit code 2 from --sample, --eval and --resume, not a
    traceback from deep inside the model's construction."""
    model = small_model("none", image=(1, 4, 4))
    bad = dataclasses.replace(model.cfg, dropout=1.5, dataset="synthetic", out=str(tmp_path))
    path = tmp_path / "latest.pt"
    assert de.save_checkpoint(de.checkpoint_state(bad, model, model, None, 0), path)
    for argv in (["--sample", path], ["--eval", path],
                 ["--train", "synthetic", *TINY, "--out", tmp_path, "--resume"]):
        code, err = main_error(capsys, *argv)
        assert code == 2 and err.count("\n") == 1 and "--dropout must be in [0, 1)" in err, err


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="watches /proc/PID/maps")
def test_ctrl_c_while_torch_loads_prints_one_line_and_exits_130(tmp_path):
    """[robustness] Ctrl-C during the first second, while `import torch` runs (the signal is sent
    as soon as libtorch is mapped into the process), ends with exit code 130 and one line, as it
    does later, not with a traceback from inside the imports."""
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "diffenc.py"), "--eval",
                             str(tmp_path / "missing.pt")], stderr=subprocess.PIPE, text=True)
    deadline, maps = time.time() + 60, f"/proc/{proc.pid}/maps"
    while time.time() < deadline and proc.poll() is None:
        try:
            if "libtorch" in open(maps).read():
                break
        except OSError:
            pass
        time.sleep(0.002)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    if proc.returncode == 2 and "no checkpoint" in err:  # this process was descheduled too long
        pytest.skip("the signal arrived after start-up had ended (a loaded machine); not tested")
    assert proc.returncode == 130 and err.count("\n") == 1 and "while starting" in err, err


def test_long_phases_show_progress_on_a_terminal_and_a_final_line_in_a_log(tmp_path, capsys,
                                                                          monkeypatch):
    """[usability] --eval and --sample report their progress on stdout: in a log (stdout not a
    terminal) one final line per phase (images or steps, time, rate) and nothing that rewrites a
    line; on a terminal also lines that update in place ("\\r", done / total, ETA)."""
    model = small_model("learned", image=(1, 16, 16), dataset="synthetic")
    ckpt = str(save_model(model, tmp_path / "m.pt"))
    evaluate = ["--eval", ckpt, "--eval-images", "16", "--batch-size", "4"]
    de.main(evaluate)
    out = capsys.readouterr().out
    assert out.count("evaluated: 16 images in") == 1 and "\r" not in out, out
    de.main(["--sample", ckpt, "--sample-steps", "3", "--n-samples", "2"])
    assert "sampled: 3 steps in" in capsys.readouterr().out
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    de.main(evaluate)
    out = capsys.readouterr().out
    assert "\r  evaluated: 4/16 images" in out and "ETA" in out and "16 images in" in out


def readme_use_block():
    """The commands of the README's Use block (the first code block after '## Use'), as argv
    lists of `python diffenc.py` lines, comments dropped."""
    import shlex
    text = open(os.path.join(HERE, "README.md"), encoding="utf-8").read()
    block = text.split("\n## Use\n", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    lines = [shlex.split(line, comments=True) for line in block.splitlines()]
    return [words[2:] for words in lines if words[:2] == ["python", "diffenc.py"]]


def test_the_readme_use_block_runs_top_to_bottom():
    """[usability] Every line of the README's Use block parses as diffenc.py's command line, and
    every checkpoint a line reads (--eval, --sample, --inspect, --tune-schedule, --resume) is
    written by an earlier line: --train writes OUT/latest.pt and best.pt (OUT: --out, default
    runs/diffenc), --race writes OUT/vdm and OUT/diffenc's, --tune-schedule CKPT --T T writes
    tuned_T{T}.pt beside CKPT. (The README
    before this test failed here: its lines evaluated runs/vdm and runs/em, which no line wrote.)
    """
    parser, written, commands = de.build_parser(), set(), readme_use_block()
    assert len(commands) >= 10
    for argv in commands:
        args = parser.parse_args(argv)
        reads = list(args.eval or []) + [c for c in (args.sample, args.inspect, args.tune_schedule)
                                         if c]
        out = os.path.normpath(args.out or de.Config.out)
        if args.train and args.resume:
            reads.append(os.path.join(out, "latest.pt"))
        missing = [r for r in reads if os.path.normpath(r) not in written]
        assert not missing, f"{' '.join(argv)} reads {missing}, which no earlier line writes"
        if args.train:
            written |= {os.path.join(out, name) for name in ("latest.pt", "best.pt")}
        if args.race:
            written |= {os.path.join(out, run, name) for run in ("vdm", "diffenc")
                        for name in ("latest.pt", "best.pt")}
        if args.tune_schedule:
            written.add(os.path.join(os.path.dirname(os.path.normpath(args.tune_schedule)),
                                     f"tuned_T{args.T}.pt"))


def test_bad_input_prints_no_traceback_from_the_command_line(tmp_path):
    """[robustness] From a real shell: a truncated checkpoint gives exit code 2 and one line."""
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"PK\x03\x04 truncated")
    proc = run_cli("--eval", bad, check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------- data parallel (DDP)


def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tmp_path, float32):
    """[scale] torchrun with 2 CPU processes (gloo) trains like 1 process on the same global batch:
    each rank takes its half of the batch and of the global noise, DDP averages the gradients, so
    the global losses logged at steps 1-3 (bpd and its three terms) agree to 1e-5 bpd absolute
    (observed <= 2e-6 bpd: float32 summation order, and the tiny latent term, ~4e-5 bpd, feels the
    Adam effect described below through the encoder at t = 1). lr 1e-2 without warm-up makes every
    Adam step ~1e-2, so ranks that stepped on their own half-batch gradients would change the losses
    of steps 2 and 3 by orders of magnitude more. (Weights are not compared entrywise: Adam's first
    steps are ~lr * sign(g), which turns float noise in near-zero gradients into lr-sized
    differences.) Dropout is 0 because masks are drawn per rank. The one process is this one
    (main(), at one thread as each rank), run while torchrun starts: a third process would add
    seconds of start-up."""
    common = ["--train", "synthetic", *TINY, "--steps", 3, "--dropout", 0, "--enc-dropout", 0,
              "--eval-every", 1000, "--lr", 1e-2, "--warmup", 1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same threading on both sides
    with socket.socket() as s:  # a free port for the rendezvous, not a fixed one that may be taken
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             f"--master_port={port}", os.path.join(HERE, "diffenc.py"),
                             *map(str, common), "--out", str(tmp_path / "two")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        de.main([str(a) for a in (*common, "--out", tmp_path / "one")])
    finally:
        torch.set_num_threads(threads)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    one, two = (torch.load(tmp_path / d / "latest.pt", weights_only=True) for d in ("one", "two"))
    assert one["step"] == two["step"] == 3
    rows_one = log_rows(tmp_path / "one" / "log.csv")
    rows_two = log_rows(tmp_path / "two" / "log.csv")
    assert sorted(rows_one) == sorted(rows_two) == [1, 2, 3]
    for step in rows_one:
        assert np.allclose([float(v) for v in rows_one[step].split(",")],
                           [float(v) for v in rows_two[step].split(",")], rtol=0, atol=1e-5)
