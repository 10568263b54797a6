"""DiffEnc: Variational Diffusion with a Learned Encoder — a single-file reference implementation.

Paper: Nielsen, Christensen, Dittadi, Winther, "DiffEnc: Variational Diffusion with a Learned
Encoder", ICLR 2024, arXiv:2310.19789. Official JAX code: github.com/bemigini/DiffEnc.

What DiffEnc is, in one paragraph. A variational diffusion model (VDM; Kingma et al. 2021)
noises data with q(z_t | x) = N(alpha_t x, sigma_t^2 I). DiffEnc lets the *mean* of that
forward process be learned and time dependent:

    q(z_t | x) = N(alpha_t x_phi(x, lambda_t), sigma_t^2 I),   lambda_t = log SNR(t) = -gamma_t,

where the encoder x_phi(x, lambda) = alpha^2 x + sigma^2 y_phi(x, lambda) starts at x (t = 0) and
may move the mean anywhere near the prior end (t = 1). Because the mean now depends on lambda,
the diffusion loss gains a derivative term dx_phi/dlambda, and the generative model predicts it
as sigma_t^2 x_hat. The encoder is used only in training: sampling is a plain VDM sampler with
one extra Euler term, exactly as fast as without the encoder. The paper also frees the ratio
w = sigma_Q^2 / sigma_P^2 of the reverse-process variances and shows that the ELBO stays finite
as T -> infinity only when w -> 1 (section 4 below).

Citations. "[DiffEnc: <topic>]" points to the part of the paper that states the result;
"[VDM]" to Kingma et al. (2021); "[code: file]" to the authors' JAX code. Equation numbers are
deliberately not quoted (we could not verify them against the final paper). Derivations that
the paper leaves implicit are written out in the docstrings, so this file stands on its own.

How to run (every flag is a field of Config, section 9; `--help` lists them):
    pip install -r requirements.txt
    python diffenc.py --train cifar10                        # the paper's 8-block DiffEnc model
    python diffenc.py --train mnist --size tiny --steps 300  # ~3 min on 2 CPU cores (README)
    python diffenc.py --eval runs/diffenc/latest.pt          # test bits/dim with standard error
    python diffenc.py --sample runs/diffenc/latest.pt        # PNG grids of samples and x_hat
    python diffenc.py --inspect runs/diffenc/latest.pt       # what the encoder does over t
    python diffenc.py --eval A/latest.pt B/latest.pt --per-t # loss per t, paired
    python diffenc.py --eval A/latest.pt --T 10 --sigma-p optimal  # finite depth (section 7)
    python diffenc.py --eval A/latest.pt --depths 5 10 100   # T-step bpd, both --increment models
    python diffenc.py --bench --size tiny                    # seconds per step, memory, ratios
    python diffenc.py --train mnist --model em --size tiny   # the Diffusion Encoder (section 8)
    torchrun --nproc_per_node=4 diffenc.py --train cifar10   # data-parallel on 4 GPUs
    pytest -q                                                # the theory, checked numerically

Sections. The method, in the order in which the paper builds it (read these to learn DiffEnc):
    1. Noise schedule          gamma(t), alpha, sigma, SNR; learned endpoints and shape
    2. Encoder                 x_phi(x, lambda) and dx_phi/dlambda (none / fixed / learned)
    3. Networks                VDM score U-Net, encoder U-Net
    4. Losses                  continuous and discrete diffusion loss (the increment's model:
                               Euler or exact exp), variance ratio, prior, recon
    5. The model and the ELBO  DiffEnc.forward: recon + prior + diffusion, in bits per dimension
    6. Sampling                the ancestral sampler, which never calls the encoder
    7. Finite depth            optimal sigma_P per step; a schedule tuned for T-step inference
    8. The Diffusion Encoder   a latent diffusion encoder trained by EM (--model em): E-step
                               (Langevin), latent sampler, exact log q, M-steps, the D + R bound
The machinery (read these to train):
    9. Configuration  10. Data  11. Training  12. Evaluation, sampling and figures
    13. Benchmark (optional)  14. Command line
Where things are: the encoder's derivative term dx_phi/dlambda is section 2: `encoder_mean` (its
formula) and `encoder_jvp` (the network's dy/dgamma by forward-mode AD); the loss that uses it is
`diffusion_loss_continuous`; the bound is `DiffEnc.forward` (its three terms) and `bits_per_dim`.
The Diffusion Encoder's EM iteration is `em_losses` (E-step `em_e_step`, M-steps after it); its
bound D + R is `distortion_rate` with `latent_log_q`, evaluated by `evaluate_em`.
"""

import argparse
import copy
import dataclasses
import gzip
import hashlib
import math
import os
import pickle
import signal
import struct
import sys
import tarfile
import time
import urllib.request
import zlib
from dataclasses import dataclass, field
from xml.sax.saxutils import escape


def interrupted_while_starting(signum, frame):
    """Ctrl-C while torch loads (a second or more, before main() runs): one line and exit 130, as
    Ctrl-C anywhere later, instead of a traceback from inside the imports."""
    print("diffenc: interrupted while starting; nothing was written", file=sys.stderr)
    raise SystemExit(130)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, interrupted_while_starting)  # main() restores Python's default

try:
    import fcntl  # locks the run folder (POSIX)
except ImportError:
    fcntl = None

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


class DiffEncError(Exception):
    """A problem with the user's input or files. main() prints it on one line and exits 2."""


# -------------------------------------------------------------------------------------------------
# 1. Noise schedule [VDM; DiffEnc: background]
#
# Everything is parameterised by gamma = -log SNR = -lambda. Variance preserving:
#     sigma_t^2 = sigmoid(gamma_t),   alpha_t^2 = sigmoid(-gamma_t) = 1 - sigma_t^2,
#     SNR_t = alpha_t^2 / sigma_t^2 = exp(-gamma_t),
#     d alpha^2 / d lambda = alpha^2 sigma^2,   d sigma^2 / d lambda = -alpha^2 sigma^2.
# gamma(t) rises from gamma_min = -13.3 (SNR 6e5, almost clean) to gamma_max = 5 (SNR 7e-3,
# almost pure noise). Only the endpoints enter the continuous-time ELBO [VDM: invariance].
# -------------------------------------------------------------------------------------------------

def alpha_sigma(gamma):
    """alpha = sqrt(sigmoid(-gamma)), sigma = sqrt(sigmoid(gamma)), without cancellation."""
    return torch.sigmoid(-gamma).sqrt(), torch.sigmoid(gamma).sqrt()


class NoiseSchedule(nn.Module):
    """gamma(t) = gamma_0 + (gamma_1 - gamma_0) s(t) for t in [0, 1]: the endpoints
    gamma_0 <= gamma_1 and a shape s, non-decreasing from s(0) = 0 to s(1) = 1.

    fixed:  gamma_0 = gamma_min, gamma_1 = gamma_max, s(t) = t          [code: noise_schedules.py]
    scalar: gamma_0 = b, gamma_1 = b + |w|, learned (the paper's `train_scalar`), init at fixed;
            s(t) = t.
    net:    the endpoints as in `scalar`, and s(t) = (g(t) - g(0)) / (g(1) - g(0)) with g VDM's
            monotone network (dense layers with positive weights, a 1024-unit sigmoid layer)
            [VDM: learned noise schedule]. The normalisation keeps the learned endpoints and the
            learned shape separate (VDM's public code lets the network move the endpoints too;
            google-research/vdm issue 11), which is what lets them have different objectives.
    """

    def __init__(self, kind, gamma_min, gamma_max, n_hidden=1024):  # 1024: VDM's NNet width
        super().__init__()
        self.kind = kind
        learn = kind != "fixed"
        self.b = nn.Parameter(torch.tensor(float(gamma_min)), requires_grad=learn)
        self.w = nn.Parameter(torch.tensor(float(gamma_max - gamma_min)), requires_grad=learn)
        if kind == "net":
            self.l1 = nn.Linear(1, 1)
            self.l2 = nn.Linear(1, n_hidden)
            self.l3 = nn.Linear(n_hidden, 1, bias=False)

    def _monotone(self, t):  # (N,) -> (N,), increasing in t because every weight is used as |w|
        h = t[:, None]
        h = F.linear(h, self.l1.weight.abs(), self.l1.bias)
        u = torch.sigmoid(F.linear(2 * (t[:, None] - 0.5), self.l2.weight.abs(), self.l2.bias))
        return (h + F.linear(2 * (u - 0.5), self.l3.weight.abs()) / u.shape[1])[:, 0]

    def endpoints(self):  # (gamma_0, gamma_1), scalars
        return self.b, self.b + self.w.abs()

    def shape(self, t):  # t: (N,) -> s(t): (N,)
        if self.kind != "net":
            return t
        ends = self._monotone(torch.tensor([0.0, 1.0], device=t.device, dtype=t.dtype))
        return (self._monotone(t) - ends[0]) / (ends[1] - ends[0])

    def forward(self, t):  # t: (N,) -> gamma: (N,)
        gamma_0, gamma_1 = self.endpoints()
        return gamma_0 + (gamma_1 - gamma_0) * self.shape(t)


def variance_gradient(shape_values, loss):
    """Make the gradient that reaches the schedule's shape that of E[loss^2] instead of E[loss]
    [VDM: Appendix I.2, minimising the variance of the diffusion loss estimator].

    In continuous time the ELBO depends on gamma's endpoints only, so for the shape (`net`) the
    gradient of E[loss] is zero-mean noise. Since E[loss^2] = Var[loss] + E[loss]^2 and E[loss]
    does not depend on the shape, the shape should descend E[loss^2]: multiplying each example's
    gradient into its shape values by 2 * loss gives exactly 2 loss dloss/ds = d(loss^2)/ds, in the
    same backward pass. The endpoints' gradient, which does not pass through s, stays the ELBO's.
    shape_values: tensors (B,) (s(t), ds/dt) that the loss was computed from; loss: (B,), detached.
    """
    for v in shape_values:
        v.register_hook(lambda grad: grad * 2 * loss)


# -------------------------------------------------------------------------------------------------
# 2. Encoder [DiffEnc: the encoder and its parameterisation]
#
#     none:    x_phi = x                                    VDM; dx_phi/dlambda = 0
#     fixed:   x_phi = alpha^2 x                            DiffEnc-nt; dx/dlambda = a^2 s^2 x
#     learned: x_phi = alpha^2 x + sigma^2 y_phi(x, lambda) DiffEnc; y_phi a U-Net, tanh output
# For `learned`, with d(alpha^2)/dlambda = alpha^2 sigma^2 = -d(sigma^2)/dlambda and
# dy/dlambda = -dy/dgamma:
#     dx_phi/dlambda = alpha^2 sigma^2 (x - y) - sigma^2 dy/dgamma.
# y's last conv is zero-initialised, so tanh(0) = 0 and `learned` starts exactly as `fixed`.
# At t = 0, sigma^2 = 1.7e-6: x_phi(lambda_0) = x up to 1.7e-6 (the decoder sees the data);
# at t = 1, sigma^2 = 0.993: the encoder almost fully controls the mean the prior must match.
# -------------------------------------------------------------------------------------------------

def encoder_mean(kind, x, gamma, y=None, dy_dgamma=None):
    """x_phi(x, lambda) and dx_phi/dlambda for an encoder `kind` (y and dy/dgamma for `learned`).

    x: (B, ...) scaled data; gamma broadcastable to x; y, dy_dgamma: like x (learned only).
    Returns (x_enc, dx_enc_dlam); dx_enc_dlam is None when dy_dgamma is not given for `learned`.
    """
    if kind == "none":
        return x, torch.zeros_like(x)
    alpha2, sigma2 = torch.sigmoid(-gamma), torch.sigmoid(gamma)
    if kind == "fixed":
        return alpha2 * x, alpha2 * sigma2 * x
    x_enc = alpha2 * x + sigma2 * y
    dx_enc = None if dy_dgamma is None else alpha2 * sigma2 * (x - y) - sigma2 * dy_dgamma
    return x_enc, dx_enc


def encoder_jvp(enc, x, gamma):
    """y = enc(x, gamma) and dy/dgamma of the encoder network (section 3), each (B, C, H, W), by
    forward-mode AD with tangent 1 for every sample's gamma (B,): one pass, exact (no finite
    differences) and per sample (the U-Net has no cross-batch operations). Their combination into
    dx_phi/dlambda is encoder_mean's."""
    return torch.func.jvp(lambda gm: enc(x, gm), (gamma,), (torch.ones_like(gamma),))


# -------------------------------------------------------------------------------------------------
# 3. Networks [VDM: architecture; DiffEnc: experiments]
#
# Score network: VDM's U-Net without resampling. Input z and Fourier features sin/cos(2^k 2 pi z)
# for k = 6, 7 (they resolve the fine detail that the likelihood rewards [VDM: Fourier
# features]); n_layer ResNet blocks "down", a middle ResNet + self-attention + ResNet, n_layer + 1
# blocks "up" on concatenated skips, all at full resolution. The output is added to z (VDM's base
# measure), and every last layer is zero-initialised, so at init v_hat = z.
# Encoder network y_phi: a small U-Net with max-pool / transposed-conv resampling on the clean
# image only (no z) [code: trainable_encoder_sigma3_param.py, unet.py].
# Both take gamma and normalise it with the *configured* endpoints, as the official code does.
# -------------------------------------------------------------------------------------------------

def timestep_embedding(t_in, dim):
    """Sinusoidal embedding (B,) -> (B, dim), Transformer style [code: time_embedding.py]."""
    half = dim // 2
    k = torch.arange(half, device=t_in.device, dtype=t_in.dtype)
    freqs = torch.exp(-math.log(10000) * k / (half - 1))                # 1 .. 1/10000
    args = t_in[:, None] * freqs[None]
    return torch.cat([args.sin(), args.cos()], dim=1)


def fourier_features(z, ks=(6, 7)):
    """sin and cos of 2^k 2 pi z for k in ks: (B, C, H, W) -> (B, 2 len(ks) C, H, W) [VDM]."""
    freqs = torch.tensor([2.0 ** k * 2 * math.pi for k in ks], device=z.device, dtype=z.dtype)
    h = (z[:, :, None] * freqs[:, None, None]).flatten(1, 2)  # (B, C * len(ks), H, W)
    return torch.cat([h.sin(), h.cos()], dim=1)


def group_norm(channels, groups):
    """GroupNorm with Flax's eps 1e-6 (the official code's). A group of one channel would subtract
    that channel's spatial mean, and with it the time embedding, a per-channel constant added just
    before norm2 in every ResBlock: the network could not see t. So each group must hold >= 2."""
    if channels % groups or channels // groups < 2:
        raise DiffEncError(f"GroupNorm of {channels} channels cannot use {groups} groups (each "
                           f"group needs 2 or more channels, and groups must divide channels); "
                           f"lower --norm-groups / --enc-norm-groups or raise --n-embd / --enc-ch")
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResBlock(nn.Module):
    """GN -> SiLU -> conv3x3 -> + Dense(temb) -> GN -> SiLU -> dropout -> conv3x3 (zero init)
    -> + skip. With film_dim (--latent-cond film, section 8): the second GN's output is scaled
    and shifted by the latent's embedding, (1 + s(z)) GN(h) + b(z) [FiLM, Perez et al. 2018; the
    AdaGN of diffusion autoencoders, Preechakul et al. 2022]; s, b start at zero (the identity)."""

    def __init__(self, c_in, c_out, temb_dim, groups, dropout, film_dim=0):
        super().__init__()
        self.norm1, self.conv1 = group_norm(c_in, groups), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.temb = nn.Linear(temb_dim, c_out, bias=False)
        self.norm2, self.conv2 = group_norm(c_out, groups), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        self.film = nn.Linear(film_dim, 2 * c_out) if film_dim else None
        zero_init(self.temb, self.conv2, *([self.film] if film_dim else []))

    def forward(self, x, temb, zemb=None):
        # x: (B, c_in, H, W), temb: (B, temb_dim), zemb: (B, film_dim) -> (B, c_out, H, W)
        h = self.norm2(self.conv1(F.silu(self.norm1(x))) + self.temb(temb)[:, :, None, None])
        if self.film is not None:
            scale, shift = self.film(zemb)[:, :, None, None].chunk(2, dim=1)    # (B, c_out, 1, 1)
            h = (1 + scale) * h + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, residual, zero-initialised output.

    fused: q, k, v as (B, heads = 1, HW, C), the 4-D form that PyTorch's fused (flash) attention
    kernels take on CPU and CUDA; they never build the (HW, HW) matrix and are faster (1.6x for
    forward + backward at 32x32 on CPU). They have no forward-mode rule, so the encoder, which runs
    under torch.func.jvp, keeps the 3-D form (the plain softmax(q k^T / sqrt(C)) v). Same maths;
    test_fused_attention_gives_the_plain_attentions_loss_and_gradients pins the two together."""

    def __init__(self, c, groups, fused):
        super().__init__()
        self.norm, self.fused = group_norm(c, groups), fused
        self.qkv, self.proj = nn.Conv2d(c, 3 * c, 1), nn.Conv2d(c, c, 1)
        zero_init(self.proj)

    def forward(self, x):  # (B, C, H, W)
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).flatten(2).transpose(1, 2)  # (B, HW, 3C)
        if self.fused:  # the kernels want the channels contiguous (the conv gave them strided)
            qkv = qkv.contiguous()[:, None]                       # (B, 1, HW, 3C)
        q, k, v = qkv.chunk(3, dim=-1)                            # 3 x (B, [1,] HW, C)
        h = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v, like q
        return x + self.proj(h.transpose(-1, -2).reshape(B, C, H, W))


def time_mlp(n):
    # Two Dense + SiLU layers of width 4n on the sinusoidal embedding [code: time_embedding.py].
    return nn.Sequential(nn.Linear(n, 4 * n), nn.SiLU(), nn.Linear(4 * n, 4 * n), nn.SiLU())


def zero_init(*modules):
    for m in modules:
        nn.init.zeros_(m.weight)
        if getattr(m, "bias", None) is not None:
            nn.init.zeros_(m.bias)


def lecun_init(module):
    """Flax's default init (truncated-normal LeCun, zero bias), which the official code uses, for
    every conv and dense layer; PyTorch's default is ~sqrt(3) smaller. Layers whose weight is all
    zero were zero-initialised on purpose (zero_init) and are left alone."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)) and m.weight.any():
            w = m.weight  # (out, in, k, k); a transposed conv's is (in, out, k, k)
            transposed = isinstance(m, nn.ConvTranspose2d)
            fan_in = w.shape[0] * w[0, 0].numel() if transposed else w[0].numel()
            # 0.8796: std of a unit normal truncated to [-2, 2]; dividing by it keeps Var = 1/fan_in
            std = 1 / math.sqrt(fan_in) / 0.87962566103423978
            nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


LATENT_MAP = 4  # --latent-cond spatial: channels of z's map, as many as z_t's Fourier features


class ScoreUNet(nn.Module):
    """VDM's score network: (z_t (B, C, H, W), gamma_t (B,)) -> v_hat or eps_hat (B, C, H, W);
    with --model em also given cond, the latent z (B, d) that the decoder is conditioned on.
    Its output is added to z_t, VDM's "base measure" [official code], except for --param
    v-nobase: the same function class and loss at equal outputs, but at initialisation (the last
    conv is zero) v_hat = 0, the target's mean, instead of z_t, which at low noise is about x and
    far from v = alpha eps - sigma x; it starts closer and learns faster early (README).

    VDM's network never changes resolution: n_layer ResBlocks down, middle ResBlock + attention +
    ResBlock, n_layer + 1 ResBlocks up, each up block reading one skip. With --downsample L
    (default 0, the paper's) it becomes a U-Net in the style of DDPM's [Ho et al. 2020, appendix
    B]: after the blocks of resolution k < L a stride-2 conv halves H and W (its output a skip
    too), the blocks of resolution k have n 2^k channels (DDPM's CIFAR-10 net: n (1, 2, 2, 2)),
    the middle runs at H / 2^L, and the up path mirrors it with nearest-neighbour upsampling +
    conv. At L = 0 the modules, their order and the forward are VDM's exactly. Why offer it: on a
    CPU budget (README, digits on a CPU) the global shape of a digit is far cheaper to model at
    7 x 7 than at 28 x 28."""

    def __init__(self, cfg, image_shape):
        super().__init__()
        C, H, W = image_shape
        n, groups = cfg.n_embd, cfg.norm_groups  # GroupNorm(32) [VDM]
        self.gamma_min, self.gamma_max, self.n = cfg.gamma_min, cfg.gamma_max, n
        self.param, self.n_layer = cfg.param, cfg.n_layer
        # --model em's reading of z (section 8), decided first: conv_in's width depends on it.
        em, route = cfg.model == "em", cfg.latent_cond
        self.gate = em and cfg.latent_gate
        c_map = LATENT_MAP if em and route == "spatial" else 0
        film = 4 * n if em and route == "film" else 0
        self.temb = time_mlp(n)
        self.conv_in = nn.Conv2d(5 * C + c_map, n, 3, padding=1)  # z + 4 Fourier channels each
        block = lambda c_in, c_out: ResBlock(c_in, c_out, 4 * n, groups, cfg.dropout, film)
        L, widths = cfg.downsample, [n * 2 ** k for k in range(cfg.downsample + 1)]
        self.down, self.halve = nn.ModuleList(), nn.ModuleList()
        c, skips = n, [n]                                 # channels of h, and of each skip
        for k, c_k in enumerate(widths):                  # resolution k: H / 2^k, n 2^k channels
            for _ in range(cfg.n_layer):
                self.down.append(block(c, c_k))
                c = c_k
                skips.append(c)
            if k < L:
                self.halve.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                skips.append(c)
        self.mid1, self.attn, self.mid2 = block(c, c), AttnBlock(c, groups, fused=True), block(c, c)
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for k in reversed(range(L + 1)):
            for _ in range(cfg.n_layer + 1):
                self.up.append(block(c + skips.pop(), widths[k]))
                c = widths[k]
            if k > 0:
                self.upsample.append(nn.Conv2d(c, c, 3, padding=1))  # after 2x nearest upsampling
        self.norm_out, self.conv_out = group_norm(n, groups), nn.Conv2d(n, C, 3, padding=1)
        zero_init(self.conv_out)
        # --model em (section 8): the latent z (B, d) enters as t does, added to the time
        # embedding through two Dense layers; not zero-initialised, because a decoder blind to z
        # is a fixed point of EM (the posterior is then the prior, and nothing moves z). The
        # layers after the embedding start at zero as in VDM; z reaches the output from step 3.
        # --latent-cond film also scales and shifts every ResBlock by it; spatial also paints it
        # onto the canvas: Dense(z) -> LATENT_MAP channels at H x W, input channels beside z_t's.
        # (Built last, so that the layers above draw the same initial weights as before they
        # existed: earlier checkpoints and README runs stay reproducible.)
        self.zemb = (nn.Sequential(nn.Linear(cfg.latent_dim, 4 * n), nn.SiLU(),
                                   nn.Linear(4 * n, 4 * n)) if em else None)
        self.zmap = nn.Linear(cfg.latent_dim, c_map * H * W) if c_map else None

    def forward(self, z, gamma, cond=None):
        t_in = (gamma - self.gamma_min) / (self.gamma_max - self.gamma_min)  # (B,), in [0, 1]
        temb = self.temb(timestep_embedding(1000 * t_in, self.n))            # (B, 4n)
        zemb, h = None, [z, fourier_features(z)]
        if self.gate:  # --latent-gate: z read as sigma_t z, nothing at low noise (section 8)
            cond = alpha_sigma(gamma[:, None])[1] * cond                     # (B, d)
        if self.zemb is not None:                                            # p_theta(x | z)
            zemb = self.zemb(cond)                                           # (B, 4n)
            temb = temb + zemb
        if self.zmap is not None:
            h.append(self.zmap(cond).view(len(z), LATENT_MAP, *z.shape[2:]))  # (B, 4, H, W)
        hs = [self.conv_in(torch.cat(h, dim=1))]                             # (B, n, H, W)
        down, halve, up, upsample = map(iter, (self.down, self.halve, self.up, self.upsample))
        for k in range(len(self.halve) + 1):                   # at H / 2^k: (B, n 2^k, ...)
            for _ in range(self.n_layer):
                hs.append(next(down)(hs[-1], temb, zemb))
            if k < len(self.halve):
                hs.append(next(halve)(hs[-1]))                 # (B, n 2^k, H / 2^(k+1), ...)
        h = self.mid2(self.attn(self.mid1(hs[-1], temb, zemb)), temb, zemb)
        for k in reversed(range(len(self.halve) + 1)):
            for _ in range(self.n_layer + 1):
                h = next(up)(torch.cat([h, hs.pop()], dim=1), temb, zemb)   # (B, n 2^k, ...)
            if k > 0:
                h = next(upsample)(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        out = self.conv_out(F.silu(self.norm_out(h)))                        # (B, C, H, W)
        return out if self.param == "v-nobase" else out + z              # base measure: + z


class EncoderUNet(nn.Module):
    """The learned part of DiffEnc's encoder: (x (B, C, H, W), gamma (B,)) -> y in (-1, 1)^(C H W).

    Level i (resolution H / 2^i) has enc_ch * 2^i channels; down = ResBlocks then 2x2 max-pool;
    middle = ResBlock + attention + ResBlock; up = 2x2 transposed conv, concat skip, ResBlocks;
    GN + SiLU + zero-init conv_out; tanh [code: unet.py, trainable_encoder_sigma3_param.py]. The
    level blocks and the attention use Flax's default GroupNorm(32), the middle ResBlocks and the
    output norm the encoder config's 16 [code: downblock.py, upblock.py, nn_blocks.py, unet.py].
    H and W must be divisible by 2^enc_levels (28 -> 14 -> 7 for MNIST, 32 -> 16 -> 8 for CIFAR-10).
    """

    def __init__(self, cfg, channels):
        super().__init__()
        c0, levels = cfg.enc_ch, cfg.enc_levels
        self.gamma_min, self.gamma_max, self.c0 = cfg.gamma_min, cfg.gamma_max, c0
        self.temb = time_mlp(c0)
        blocks = lambda c_in, c_out, groups: nn.ModuleList(  # enc_blocks ResBlocks, c_in -> c_out
            ResBlock(c_in if j == 0 else c_out, c_out, 4 * c0, groups, cfg.enc_dropout)
            for j in range(cfg.enc_blocks))
        self.conv_in = nn.Conv2d(channels, c0, 3, padding=1)
        self.down, self.upsample, self.up = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for i in range(levels):
            c = c0 * 2 ** i                                       # channels at level i
            c_above = c0 * 2 ** (i - 1) if i > 0 else c0          # from level i - 1 (or conv_in)
            c_below = c0 * 2 ** (i + 1) if i < levels - 1 else c  # from level i + 1 (or the middle)
            self.down.append(blocks(c_above, c, cfg.norm_groups))
            self.upsample.append(nn.ConvTranspose2d(c_below, c, 2, stride=2))
            self.up.append(blocks(2 * c, c, cfg.norm_groups))    # input: upsampled + skip
        c_mid = c0 * 2 ** (levels - 1)
        self.mid1 = ResBlock(c_mid, c_mid, 4 * c0, cfg.enc_norm_groups, cfg.enc_dropout)
        self.attn = AttnBlock(c_mid, cfg.norm_groups, fused=False)  # jvp
        self.mid2 = ResBlock(c_mid, c_mid, 4 * c0, cfg.enc_norm_groups, cfg.enc_dropout)
        self.norm_out = group_norm(c0, cfg.enc_norm_groups)
        self.conv_out = nn.Conv2d(c0, channels, 3, padding=1)
        zero_init(self.conv_out)

    def forward(self, x, gamma):
        t_in = (gamma - self.gamma_min) / (self.gamma_max - self.gamma_min)
        temb = self.temb(timestep_embedding(1000 * t_in, self.c0))  # (B, 4 c0)
        h, skips = self.conv_in(x), []
        for blocks in self.down:
            for blk in blocks:
                h = blk(h, temb)
            skips.append(h)
            h = F.max_pool2d(h, 2)                                   # (B, c_i, H / 2^(i+1), ...)
        h = self.mid2(self.attn(self.mid1(h, temb)), temb)
        for i in reversed(range(len(self.up))):
            h = torch.cat([self.upsample[i](h), skips[i]], dim=1)    # (B, 2 c_i, H / 2^i, ...)
            for blk in self.up[i]:
                h = blk(h, temb)
        return torch.tanh(self.conv_out(F.silu(self.norm_out(h))))  # y in (-1, 1)


# -------------------------------------------------------------------------------------------------
# 4. Losses [DiffEnc: diffusion loss with a learned encoder; variance ratio]
#
# Reverse processes. For s < t, write kappa = 1 - SNR_t/SNR_s = -expm1(gamma_s - gamma_t). The
# reverse encoder q(z_s | z_t, x) that is consistent with the marginals N(alpha x_phi, sigma^2) is
#     mu_Q = (alpha_s/alpha_t)(SNR_t/SNR_s) z_t + alpha_s kappa x_phi(t)
#            + alpha_s (x_phi(s) - x_phi(t)),
#     sigma_Q^2 = kappa sigma_s^2.
# The generative model p(z_s | z_t) replaces x_phi(t) by its prediction x_hat(z_t, t) and the
# encoder increment x_phi(s) - x_phi(t) by the Euler step (lambda_s - lambda_t) sigma_t^2 x_hat,
# i.e. it models dx_phi/dlambda by sigma_t^2 x_hat (exact in form for the fixed encoder,
# dx/dlambda = sigma^2 x_phi). With sigma_P = sigma_Q each step costs
#     KL_i = ||mu_Q - mu_P||^2 / (2 sigma_Q^2)
#          = 1/2 (SNR_s - SNR_t) || x_phi(t) - x_hat + [increment - Euler step] / kappa ||^2,
#     increment = x_phi(s) - x_phi(t),   Euler step = (lambda_s - lambda_t) sigma_t^2 x_hat,
# and L_T = sum_i KL_i. As T -> infinity, kappa -> (lambda_s - lambda_t), the bracket / kappa ->
# dx_phi/dlambda - sigma_t^2 x_hat, and SNR_s - SNR_t -> gamma'(t) SNR_t dt, giving
#     L_inf = 1/2 E_t [gamma'(t) SNR_t ||(x_phi + dx_phi/dlambda) - (x_hat + sigma_t^2 x_hat)||^2].
# For the plain VDM (x_phi = x, no Euler term) these are VDM's discrete and continuous losses.
#
# Few steps: the increment's model (--increment). The Euler step is first order in the step, so
# at T = 10 it misses (README, finite depth); the paper leaves better "approximations of the
# gradient term" to future work. `exp` integrates the model's own ODE dx/dlambda = sigma^2 x
# exactly from x_hat at t: since d alpha^2 / dlambda = alpha^2 sigma^2, x(lambda_s) =
# x_hat alpha_s^2 / alpha_t^2, an increment of
#     x_hat (alpha_s^2 / alpha_t^2 - 1) = sigma_s^2 expm1(gamma_t - gamma_s) x_hat
# (the right side has no cancellation in float32). For the fixed encoder x_phi = alpha^2 x it is
# the exact increment whenever x_hat = x_phi(t); for the learned one it agrees with the Euler step
# to first order in the step, so L_T has the same limit L_inf. Only the T-step loss, the sampler
# (p_reverse) and what builds on them (sigma_P*, --tune-schedule) see it; L_inf does not.
#
# Numerics. SNR_t reaches 6e5 near t = 0, where x_phi - x_hat is a tiny difference of O(1)
# numbers. We therefore never form it: with z_t = alpha x_phi + sigma eps,
#     (alpha/sigma)(x_phi - x_hat) = eps_hat - eps         (eps-prediction)
#                                  = alpha (v_hat - v)     (v-prediction, v = alpha eps - sigma x),
# both O(1) at every t, and every loss below is written in terms of this `scaled error`.
# -------------------------------------------------------------------------------------------------

def predict_x(out, z, alpha, sigma, param):
    """x_hat from the network's output: alpha z - sigma v_hat, or (z - sigma eps_hat) / alpha."""
    return (z - sigma * out) / alpha if param == "eps" else alpha * z - sigma * out


def scaled_error(out, eps, x_enc, alpha, sigma, param):
    """(alpha/sigma)(x_phi - x_hat), computed in eps- or v-space so that it is exact in float32."""
    if param == "eps":
        return out - eps
    return alpha * (out - (alpha * eps - sigma * x_enc))


def sum_dims(a):
    """Sum over every dimension but the batch: (B, ...) -> (B,)."""
    return a.flatten(1).sum(1)


def diffusion_loss_continuous(dgamma_dt, alpha, sigma, scaled_err, dx_enc, dx_hat):
    """The continuous-time diffusion loss integrand, per sample (nats):

        1/2 gamma'(t) SNR_t || (x_phi - x_hat) + (dx_phi/dlambda - dx_hat/dlambda) ||^2
      = 1/2 gamma'(t) || scaled_err + (alpha/sigma)(dx_phi/dlambda - dx_hat/dlambda) ||^2.

    scaled_err = scaled_error(...); dx_enc = dx_phi/dlambda; dx_hat = sigma^2 x_hat (DiffEnc) or
    0 (VDM).
    dgamma_dt, alpha, sigma: broadcastable to scaled_err (B, ...). Returns (B,).
    With dx_enc = dx_hat = 0 this is VDM's 1/2 gamma' ||eps - eps_hat||^2
    = 1/2 gamma' alpha^2 ||v - v_hat||^2.
    """
    r = scaled_err + (alpha / sigma) * (dx_enc - dx_hat)  # (alpha/sigma) (residual of x + dx)
    return sum_dims(0.5 * dgamma_dt * r.square())


def loss_weight(gamma_t, b):
    """w(lambda_t) = sigmoid(b - lambda_t), lambda = -gamma = log SNR: a training-only weight on
    the diffusion integrand at t, not the paper's. b = inf gives w = 1, the ELBO (the paper's).

    Kingma & Gao (2023, "Understanding diffusion objectives as the ELBO with simple data
    augmentation"): a weighted diffusion loss int w(lambda) (-dL/dlambda) dlambda with w
    non-increasing in lambda is a positive mixture of the partial bounds L(lambda) from noise level
    lambda to t = 1 (each, up to a constant, the -ELBO of the data with Gaussian noise added to that
    level), so it stays a likelihood objective; the sigmoid is one of their weightings. It moves
    the loss's weight from low noise, where most of the bound's bits are (pixel detail), to high
    noise, where an image's shape is decided (README, "Training weighted toward high noise").
    DiffEnc's integrand is the derivative of its own partial bounds (each a KL from t to 1) as
    VDM's is, so the weight applies to it the same way. gamma_t (B,) must carry no gradient: the
    schedule is not to learn where the weight is small. The training log's diffusion column shows
    the weighted term.
    """
    return torch.sigmoid(b + gamma_t)


def increment_hat(x_hat, gamma_s, gamma_t, increment):
    """The generative model's x_phi(lambda_s) - x_phi(lambda_t), from x_hat at t (see the head):
    "euler" (the paper's) (lambda_s - lambda_t) sigma_t^2 x_hat, "exp" sigma_s^2 expm1(gamma_t -
    gamma_s) x_hat, None (the VDM, x_phi = x) 0. lambda_s - lambda_t = gamma_t - gamma_s."""
    if increment == "euler":
        return (gamma_t - gamma_s) * torch.sigmoid(gamma_t) * x_hat
    if increment == "exp":
        return torch.sigmoid(gamma_s) * torch.expm1(gamma_t - gamma_s) * x_hat
    return 0.0


def diffusion_loss_discrete(gamma_s, gamma_t, alpha_t, sigma_t, scaled_err, x_enc_s, x_enc_t,
                            x_hat, increment):
    """The exact KL(q(z_s|z_t,x) || p(z_s|z_t)) of one step, sigma_P = sigma_Q, per sample (nats):

        KL = 1/2 (SNR_s - SNR_t) ||(x_t - x_hat) + [(x_s - x_t) - increment_hat] / kappa||^2
           = 1/2 expm1(gamma_t - gamma_s) || scaled_err + (alpha_t/sigma_t) [...] / kappa ||^2,

    using (SNR_s - SNR_t)/SNR_t = expm1(gamma_t - gamma_s). x_enc_s, x_enc_t: the encoder at s and
    t (the exact increment on the q side); increment: the generative model's increment_hat, "euler"
    (the paper's sigma_t^2 x_hat term) or "exp" for DiffEnc, None for VDM. The T-step loss is
    L_T = sum_i KL_i = T E_i[KL_i].
    """
    kappa = -torch.expm1(gamma_s - gamma_t)
    miss = x_enc_s - x_enc_t - increment_hat(x_hat, gamma_s, gamma_t, increment)
    r = scaled_err + (alpha_t / sigma_t) * miss / kappa
    return sum_dims(0.5 * torch.expm1(gamma_t - gamma_s) * r.square())


def q_reverse(z_t, x_enc_s, x_enc_t, gamma_s, gamma_t):
    """The reverse encoder q(z_s | z_t, x) for s < t: (mean, variance), see the section head."""
    alpha_s, sigma_s = alpha_sigma(gamma_s)
    alpha_t, _ = alpha_sigma(gamma_t)
    kappa = -torch.expm1(gamma_s - gamma_t)
    coef = alpha_s / alpha_t * torch.exp(gamma_s - gamma_t)  # (alpha_s/alpha_t) SNR_t/SNR_s
    mean = coef * z_t + alpha_s * kappa * x_enc_t + alpha_s * (x_enc_s - x_enc_t)
    return mean, kappa * sigma_s ** 2


def p_reverse(z_t, x_hat, gamma_s, gamma_t, increment):
    """The generative step p(z_s | z_t) = q(z_s | z_t, x) with x_phi(t) -> x_hat and the encoder
    increment -> increment_hat (the Euler step by default; None for the VDM). Returns (mean,
    variance) with sigma_P^2 = sigma_Q^2, which keeps the ELBO finite as T grows."""
    step = increment_hat(x_hat, gamma_s, gamma_t, increment)
    return q_reverse(z_t, x_hat + step, x_hat, gamma_s, gamma_t)


def gaussian_kl(mean_q, var_q, mean_p, var_p):
    """KL(N(mean_q, var_q) || N(mean_p, var_p)) elementwise (nats)."""
    return 0.5 * (torch.log(var_p / var_q) + (var_q + (mean_q - mean_p) ** 2) / var_p - 1)


# Variance ratio [DiffEnc: the weight w = sigma_Q^2 / sigma_P^2]. With isotropic variances in d
# dimensions and A = ||mu_Q - mu_P||^2 / (2 sigma_Q^2) (the equal-variance KL above),
#     KL(w) = d/2 (w - 1 - log w) + w A.
# For fixed w_i the ELBO is a per-step weighted diffusion loss plus a constant. Minimising over w
# gives w* = d / (d + 2 E[A]), i.e. sigma_P*^2 = sigma_Q^2 + E||mu_Q - mu_P||^2 / d. Since E[A] =
# O(1/T), w* -> 1 at rate 1/T; a fixed w != 1 adds T d/2 (w - 1 - log w), which grows linearly in
# T: the infinite-depth ELBO is finite only for w -> 1. test_diffenc.py checks all of this.

def weighted_step_kl(A, w, d):
    """KL of one step with sigma_P^2 = sigma_Q^2 / w, from its equal-variance value A (nats)."""
    return d / 2 * (w - 1 - torch.log(w)) + w * A


def optimal_sigma_p2(sigma_q2, mean_sq_err):
    """The sigma_P^2 that minimises E KL for a finite step: sigma_Q^2 + E||mu_Q - mu_P||^2 / d.
    mean_sq_err is E||mu_Q - mu_P||^2 / d (or per dimension, for per-dimension variances)."""
    return sigma_q2 + mean_sq_err


def prior_loss(x_enc_1, gamma_1):
    """KL(q(z_1|x) || N(0, I)) = 1/2 sum(alpha_1^2 x_phi(1)^2 + sigma_1^2 - log sigma_1^2 - 1),
    per sample (nats).
    DiffEnc evaluates it at the encoder's x_phi(lambda_1) [code: sigma3_v_approx_model.py]."""
    alpha_1, sigma_1 = alpha_sigma(gamma_1)
    var = sigma_1 ** 2 * torch.ones_like(x_enc_1)
    prior_mean, prior_var = torch.zeros_like(var), torch.ones_like(var)
    return sum_dims(gaussian_kl(alpha_1 * x_enc_1, var, prior_mean, prior_var))


PIXEL_GRID = 2 * (torch.arange(256) + 0.5) / 256 - 1  # the 256 values a scaled pixel can take


def scale_pixels(x_int, dtype=None):
    """{0..255} -> centres of 256 bins in (-1, 1): x = 2(x_int + 0.5)/256 - 1
    [code: encode_decode/util.py]."""
    return 2 * (x_int.to(dtype or torch.get_default_dtype()) + 0.5) / 256 - 1


def recon_loss(x_int, x_enc_0, gamma_0, eps_0):
    """-log p(x | z_0) with VDM's discretised decoder, per sample (nats).

    z_0/alpha_0 = x_phi(lambda_0) + exp(gamma_0/2) eps_0, and each sub-pixel has a 256-way softmax
    over the grid values x_k with logits -(z_0/alpha_0 - x_k)^2 / (2 exp(gamma_0)) [VDM]. At
    gamma_0 = -13.3 this costs ~7e-3 nats per sub-pixel. Memory: B*C*H*W*256 floats.
    """
    u = x_enc_0 + torch.exp(gamma_0 / 2) * eps_0                          # (B, C, H, W)
    grid = PIXEL_GRID.to(u)
    logits = -0.5 * (u[..., None] - grid) ** 2 / torch.exp(gamma_0)[..., None]  # (B, C, H, W, 256)
    logp = torch.log_softmax(logits, dim=-1).gather(-1, x_int.long()[..., None])[..., 0]
    return -sum_dims(logp)


def decode(z_0, gamma_0):
    """The decoder's argmax: the grid value nearest to z_0/alpha_0, since the logits above are a
    downward parabola centred there. (N, C, H, W) -> uint8 in {0..255}."""
    alpha_0, _ = alpha_sigma(gamma_0)
    return ((z_0 / alpha_0 + 1) * 128 - 0.5).round().clamp(0, 255).to(torch.uint8)


def low_discrepancy_times(u, n_total, offset=0, n=None):
    """t_i = (u + i / n_total) mod 1 for i = offset .. offset + n - 1 [VDM: variance reduction].
    One uniform u per step spreads the batch evenly over [0, 1); a DDP rank takes its slice."""
    n = n_total if n is None else n
    i = torch.arange(offset, offset + n, device=u.device, dtype=u.dtype)
    return torch.remainder(u + i / n_total, 1.0)


# -------------------------------------------------------------------------------------------------
# 5. The model and the ELBO in bits per dimension [DiffEnc: training objective]
#
#     -ELBO(x) = recon (t = 0) + prior (t = 1) + diffusion (0 < t < 1),
#     bpd = -ELBO / (d ln 2),  d = C H W.
# The training loss is exactly this bpd, estimated with one t and one eps per image. One call of
# the encoder gives y and dy/dgamma together (torch.func.jvp, forward mode, one dropout mask);
# the two boundary terms need x_phi at gamma_0 and gamma_1: in training one plain call on the
# batch, each image at the end nearer its t (an unbiased estimate, see forward); in evaluation
# both ends for every image.
# -------------------------------------------------------------------------------------------------

class DiffEnc(nn.Module):
    """Parameters of the schedule, the score network and (for encoder="learned") the encoder.
    forward() returns the three -ELBO terms per image; the math lives in the functions above."""

    def __init__(self, cfg, image_shape):
        super().__init__()
        C, H, W = image_shape
        if cfg.encoder == "learned" and (H % 2 ** cfg.enc_levels or W % 2 ** cfg.enc_levels):
            raise DiffEncError(f"images of {H}x{W} do not fit an encoder U-Net with "
                               f"{cfg.enc_levels} levels (H, W must be divisible by "
                               f"{2 ** cfg.enc_levels}); lower --enc-levels")
        if H % 2 ** cfg.downsample or W % 2 ** cfg.downsample:
            raise DiffEncError(f"images of {H}x{W} cannot be halved {cfg.downsample} times by the "
                               f"score U-Net (H, W must be divisible by {2 ** cfg.downsample}); "
                               f"lower --downsample")
        self.cfg, self.image_shape = cfg, tuple(image_shape)
        self.schedule = NoiseSchedule(cfg.schedule, cfg.gamma_min, cfg.gamma_max)
        self.score = ScoreUNet(cfg, image_shape)
        self.enc = EncoderUNet(cfg, C) if cfg.encoder == "learned" else None
        self.graphed_jvp = None  # --compile on CUDA: encoder_jvp as a CUDA graph (section 11)
        # --model em: q_phi(z | x), a diffusion model in latent space (section 8)
        encoder = GaussianEncoder if cfg.latent_encoder == "gaussian" else LatentEncoder
        self.latent_enc = encoder(cfg, image_shape) if cfg.model == "em" else None
        for net in (self.score, self.enc, self.latent_enc):
            if net is not None:
                lecun_init(net)

    def encode(self, x, gamma, derivative):
        """x_phi(x, lambda) and (if derivative) dx_phi/dlambda. x: (B, C, H, W), gamma: (B,)."""
        g = gamma[:, None, None, None]
        if self.enc is None:
            return encoder_mean(self.cfg.encoder, x, g)
        if not derivative:
            return encoder_mean("learned", x, g, self.enc(x, gamma))
        jvp = self.graphed_jvp if self.training and self.graphed_jvp else encoder_jvp
        y, dy_dgamma = jvp(self.enc, x, gamma)
        return encoder_mean("learned", x, g, y, dy_dgamma)

    def predict(self, z, gamma, cond=None):
        """The score network's output (v_hat or eps_hat, like z) in z's dtype. --amp runs it, and
        only it, under bf16 autocast: the encoder and its jvp stay in full precision (autocast does
        not reach the tangents of torch.func.jvp, so conv weights and inputs would disagree).
        cond (B, d): the latent z that --model em's decoder is conditioned on (section 8)."""
        with torch.autocast(z.device.type, torch.bfloat16, enabled=self.cfg.amp):
            return self.score(z, gamma, cond).to(z.dtype)

    def forward(self, x_int, t, eps, eps_0, cond=None):
        """-ELBO terms per image (nats): (diffusion, latent, recon), each (B,).

        x_int: (B, C, H, W) integers in 0..255; t: (B,) in [0, 1]; eps, eps_0: (B, C, H, W),
        N(0, I); cond: (B, d), --model em's latent z (only the diffusion term depends on it).
        The model computes in eps's dtype (float32 in training, float64 in the theory tests).
        """
        B = x_int.shape[0]
        x = scale_pixels(x_int, eps.dtype)                                        # (B, C, H, W)
        gamma_0, gamma_1 = self.schedule(torch.tensor([0.0, 1.0], device=t.device, dtype=t.dtype))
        if self.training:  # 1. and 2., estimated from the end nearer each image's t
            recon, latent = self._boundary_terms_estimate(x_int, x, t, eps_0, gamma_0, gamma_1)
        else:              # 1. and 2., exactly: x_phi at both ends for every image
            gammas = torch.cat([gamma_0.expand(B), gamma_1.expand(B)])            # (2B,)
            x_enc_0, x_enc_1 = self.encode(torch.cat([x, x]), gammas, False)[0].chunk(2)
            recon = recon_loss(x_int, x_enc_0, gamma_0, eps_0)  # 1. reconstruction, -log p(x | z_0)
            latent = prior_loss(x_enc_1, gamma_1)               # 2. prior, KL(q(z_1|x) || N(0, I))
        # 3. diffusion, 0 < t < 1: the continuous-time loss (the paper) or the exact T-step loss.
        diff = self._continuous(x, t, eps, cond) if self.cfg.T == 0 else self._discrete(x, t, eps)
        return diff, latent, recon

    def _boundary_terms_estimate(self, x_int, x, t, eps_0, gamma_0, gamma_1):
        """Training's unbiased estimate of the reconstruction and prior terms from ONE encoder
        call on the batch: each image pays the term of the end nearer its t, counted twice.

        Why unbiased: t ~ U[0, 1) is independent of x and eps_0, and E_t[2 * 1{t >= 1/2}] =
        E_t[2 * 1{t < 1/2}] = 1, so E_t[2 * 1{t >= 1/2} * prior] = prior (the same for recon).
        Evaluation computes both terms exactly. The terms are O(1e-3) bpd, so the added variance
        is negligible next to the diffusion term's; the saving is a second encoder call on B
        images and half the 256-way decoder's work. Returns (recon, latent), each (B,).
        """
        prior_end = t >= 0.5                          # (B,): images that pay the t = 1 term
        data_end = ~prior_end                         # (B,): images that pay the t = 0 term
        x_enc_end, _ = self.encode(x, torch.where(prior_end, gamma_1, gamma_0), derivative=False)
        latent = torch.where(prior_end, 2 * prior_loss(x_enc_end, gamma_1), 0.0)
        recon = 2 * recon_loss(x_int[data_end], x_enc_end[data_end], gamma_0, eps_0[data_end])
        return x.new_zeros(len(x)).index_put((data_end,), recon), latent

    def _continuous(self, x, t, eps, cond=None):
        """The continuous-time diffusion loss at one t per image (section 4), (B,) nats."""
        s, ds_dt = torch.func.jvp(self.schedule.shape, (t,), (torch.ones_like(t),))  # (B,) each
        gamma_0, gamma_1 = self.schedule.endpoints()
        gamma_t, dgamma_dt = gamma_0 + (gamma_1 - gamma_0) * s, (gamma_1 - gamma_0) * ds_dt
        g = gamma_t[:, None, None, None]
        alpha, sigma = alpha_sigma(g)
        x_enc, dx_enc = self.encode(x, gamma_t, derivative=True)       # x_phi, dx_phi/dlambda
        z_t = alpha * x_enc + sigma * eps                                        # ~ q(z_t | x)
        out = self.predict(z_t, gamma_t, cond)
        x_hat = predict_x(out, z_t, alpha, sigma, self.cfg.param)
        euler_step = self.cfg.encoder != "none"
        # the generative model's dx_phi/dlambda: sigma^2 x_hat (DiffEnc), 0 (VDM)
        dx_hat = sigma ** 2 * x_hat if euler_step else torch.zeros_like(x_hat)
        scaled_err = scaled_error(out, eps, x_enc, alpha, sigma, self.cfg.param)
        dgamma = dgamma_dt[:, None, None, None]
        diff = diffusion_loss_continuous(dgamma, alpha, sigma, scaled_err, dx_enc, dx_hat)
        if self.training and self.cfg.schedule == "net":
            variance_gradient((s, ds_dt), bits_per_dim([diff.detach()], self.image_shape))
        return diff

    def _discrete(self, x, t, eps):
        """T times the KL of the step that contains t, (B,) nats: an unbiased estimate of L_T."""
        T = self.cfg.T
        i = discrete_step(t, T)                                # (B,) in 1..T
        gamma_s, gamma_t = self.schedule((i - 1) / T), self.schedule(i / T)       # (B,) each
        # x_phi at s and at t from the same dropout mask: their difference is divided by
        # kappa ~ 18/T, so independent masks would turn dropout noise into a loss growing as T^2.
        ends = same_dropout_mask(x.device, lambda: self.encode(x, gamma_s, False),
                                 lambda: self.encode(x, gamma_t, False))
        x_enc_s, x_enc_t = (x_enc for x_enc, _ in ends)
        gamma_s, gamma_t = gamma_s[:, None, None, None], gamma_t[:, None, None, None]
        alpha_t, sigma_t = alpha_sigma(gamma_t)
        z_t = alpha_t * x_enc_t + sigma_t * eps
        out = self.predict(z_t, gamma_t.flatten())
        x_hat = predict_x(out, z_t, alpha_t, sigma_t, self.cfg.param)
        scaled_err = scaled_error(out, eps, x_enc_t, alpha_t, sigma_t, self.cfg.param)
        kl = diffusion_loss_discrete(gamma_s, gamma_t, alpha_t, sigma_t, scaled_err, x_enc_s,
                                     x_enc_t, x_hat, self.increment)
        return T * kl

    @property
    def increment(self):
        """The T-step model's increment_hat: cfg.increment for DiffEnc, None for the VDM."""
        return None if self.cfg.encoder == "none" else self.cfg.increment


def discrete_step(t, T):
    """The step i in 1..T whose interval [(i-1)/T, i/T) holds t; t = 1 belongs to step T."""
    return (torch.floor(t * T) + 1).clamp(max=T)


def forked_rng(device):
    """A context that restores the random state (CPU, and device's) on exit: dropout inside it
    draws the masks that the next call after it draws again."""
    devices = [] if device.type == "cpu" else [device]
    return torch.random.fork_rng(devices=devices, device_type=device.type)


def same_dropout_mask(device, *calls):
    """Run each call from the same random state, so that dropout draws the same mask in all of
    them (their tensors must have the same shapes); afterwards the state has moved on as after
    one call. Returns the calls' results."""
    outs = []
    for call in calls[:-1]:
        with forked_rng(device):
            outs.append(call())
    return outs + [calls[-1]()]


def bits_per_dim(terms, image_shape):
    """Per-image nats -> bits per dimension: sum of the terms / (d ln 2)."""
    return sum(terms) / (math.prod(image_shape) * math.log(2))


def batch_bpd(terms, image_shape):
    """The batch means of the -ELBO terms (diffusion, latent, recon), each (B,) nats, in bits per
    dimension: (3,). Their sum is the training loss."""
    return torch.stack([bits_per_dim([a], image_shape).mean() for a in terms])


# -------------------------------------------------------------------------------------------------
# 6. Sampling [DiffEnc: the encoder is discarded after training]
#
# Ancestral sampling on the uniform grid t_i = i/T: z_1 ~ N(0, I), then z_s ~ p(z_s | z_t) of
# section 4 (sigma_P = sigma_Q; DiffEnc models add the increment term alpha_s increment_hat, the
# Euler step (lambda_s - lambda_t) sigma_t^2 x_hat or --increment exp's), down to z_0, which is
# decoded by the argmax of the 256-way decoder. Only the schedule and the score network are used,
# so DiffEnc samples exactly as fast as a VDM.
# -------------------------------------------------------------------------------------------------

@torch.no_grad()
def sample(model, n, T, seed, keep=(), var_ratio=None, cond=None, stream=()):
    """n samples with T steps: (x (n, C, H, W) uint8, {step i: x_hat at t = i/T for i in keep}).
    var_ratio (T,): sigma_P^2 / sigma_Q^2 of each step i = 1..T instead of 1 (section 4).
    cond (n, d): --model em's latent z for each sample (section 8). stream: more ints that seed
    the noise, for batches of one set (reconstruct)."""
    device, dtype = model.schedule.b.device, model.schedule.b.dtype
    g = rng(seed, RNG["sample"], *stream)  # drawn on the CPU: the same samples on every device
    noise = lambda: torch.randn((n, *model.image_shape), generator=g, dtype=dtype).to(device)
    z = noise()                                                                 # z_1 ~ N(0, I)
    gammas = model.schedule(torch.linspace(0, 1, T + 1, device=device, dtype=dtype))  # (T + 1,)
    kept, t0 = {}, time.time()
    for i in range(T, 0, -1):
        gamma_t, gamma_s = gammas[i], gammas[i - 1]
        alpha_t, sigma_t = alpha_sigma(gamma_t)
        out = model.predict(z, gamma_t.expand(n), cond)
        x_hat = predict_x(out, z, alpha_t, sigma_t, model.cfg.param)           # (n, C, H, W)
        if i in keep:
            kept[i] = x_hat.cpu()
        mean, var = p_reverse(z, x_hat, gamma_s, gamma_t, model.increment)
        var = var if var_ratio is None else var * var_ratio[i - 1]
        z = mean + var.sqrt() * noise()                      # the last step is stochastic too
        progress("sampled", T - i + 1, T, t0, "steps")
    return decode(z, gammas[0]).cpu(), kept


# -------------------------------------------------------------------------------------------------
# 7. Finite depth on a trained model [DiffEnc: variance ratio; the noise schedule for inference]
#
# For T steps the ELBO's diffusion term is sum_i KL_i. Two things that do not matter as T -> inf
# do matter here: (1) the generative variance of each step, whose optimum is sigma_P*^2 =
# sigma_Q^2 + E||mu_Q - mu_P||^2 / d (section 4), estimated on training images and then used on
# the test set; (2) the schedule's interior, which the T-step loss depends on (the continuous loss
# only on the endpoints), tuned here with the networks frozen. Both are computed from the T-step
# loss, so both use the model's increment (--increment, section 4: euler, the paper's, or exp),
# as do training with --T > 0, --eval --T and the sampler; --eval --depths T [T ...] compares
# the two increments over T (run_depths, section 12).
# -------------------------------------------------------------------------------------------------

SIGMA_P_PAIRS = 20_000  # (training image, eps) pairs that estimate the T per-step variances


@torch.no_grad()
def optimal_variance_ratios(model, data, seed, batch_size, pairs=None):
    """sigma_P*^2 / sigma_Q^2 = 1 + 2 E[KL_i] / d for each step i = 1..T of model.cfg.T, with its
    standard error: (T,), (T,). Since KL_i = ||mu_Q - mu_P||^2 / (2 sigma_Q^2) at equal variances,
    this is section 4's sigma_Q^2 + E||mu_Q - mu_P||^2 / d. Each step is estimated on
    pairs // T training images (pairs: SIGMA_P_PAIRS unless given; --sigma-pairs) in a seeded
    random order, each with its own eps."""
    T, d, p = model.cfg.T, math.prod(model.image_shape), next(model.parameters())
    n = max(2, (pairs or SIGMA_P_PAIRS) // T)                           # pairs per step
    order = torch.randperm(len(data), generator=rng(seed, RNG["sigma_p"]))
    kls, t0 = [], time.time()
    for k0 in range(0, n * T, batch_size):
        k = torch.arange(k0, min(k0 + batch_size, n * T))              # pair k: step k // n + 1
        x = scale_pixels(data[order[k % len(data)]].to(p.device), p.dtype)  # (b, C, H, W)
        t = ((k // n + 0.5) / T).to(p.device, p.dtype)                  # inside that step
        eps, = indexed_normal(k, model.image_shape, 1, seed, RNG["sigma_p"])
        kl = model._discrete(x, t, eps.to(p.device, p.dtype)) / T      # KL_i (b,), nats
        kls.append(kl.double().cpu())
        progress("sigma_P* estimated on", int(k[-1]) + 1, n * T, t0, "pairs")
    kl = torch.cat(kls).view(T, n)
    return 1 + 2 * kl.mean(1) / d, 2 * kl.std(1) / math.sqrt(n) / d


def linear_net_schedule(schedule):
    """A `net` schedule with the endpoints of `schedule` and a shape within 1e-3 of linear: the
    monotone network's linear part set to t, its sigmoid layer's output weights to 1e-3 (not 0:
    |w| has no gradient at 0). The starting point for tuning a fixed or scalar schedule."""
    net = NoiseSchedule("net", 0.0, 1.0).to(schedule.b)
    with torch.no_grad():
        net.b.copy_(schedule.b)
        net.w.copy_(schedule.w)
        net.l1.weight.fill_(1.0)
        net.l1.bias.zero_()
        net.l3.weight.fill_(1e-3)
    return net


def tune_schedule(model, data, T, steps, lr, batch_size, seed):
    """Fit the schedule's shape to T-step inference: minimise the T-step training loss over the
    shape of a `net` schedule (converted from a fixed or scalar one, linear at the start) with the
    networks and gamma's endpoints frozen [DiffEnc: optimizing the noise schedule for inference].
    The shape stays monotone by construction. Returns the tuned model (cfg.schedule "net",
    cfg.T = T) and the training loss (bpd) per step."""
    model.cfg = dataclasses.replace(model.cfg, T=T, schedule="net")
    if model.schedule.kind != "net":
        model.schedule = linear_net_schedule(model.schedule)
    model.eval().requires_grad_(False)
    shape = [p for name, p in model.schedule.named_parameters() if name not in ("b", "w")]
    for p in shape:
        p.requires_grad_(True)
    opt = torch.optim.Adam(shape, lr=lr)
    device, dtype, losses, t0 = model.schedule.b.device, model.schedule.b.dtype, [], time.time()
    for step in range(steps):
        x_int = data[batch_indices(len(data), batch_size, step, seed)].to(device)  # (B, C, H, W)
        noise = draw_noise(seed, step, batch_size, model.image_shape)
        t, eps, _ = (a.to(device, dtype) for a in noise)
        kl_T = model._discrete(scale_pixels(x_int, dtype), t, eps)                # (B,) nats
        loss = bits_per_dim([kl_T], model.image_shape).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        progress("tuned the schedule", step + 1, steps, t0, "steps")
    return model.requires_grad_(False), losses


# -------------------------------------------------------------------------------------------------
# 8. The Diffusion Encoder: a latent diffusion model as the encoder, trained by EM
#    [inspired by Premkumar & Lucioni, "The Diffusion Encoder", arXiv 2605.13399; not a
#    reproduction: only its abstract is public, and the algorithm below is our reading of it]
#
# An autoencoder with latents z in R^d, prior p(z) = N(0, I), a decoder p_theta(x | z) (the model
# above, given z) with loss L_dec(x, z) = -ELBO(x | z), and an encoder q_phi(z | x) that is itself
# a diffusion model in latent space. Per image it minimises
#     F_beta = E_q[L_dec(x, z)] + beta KL(q(z | x) || p(z)),
# an upper bound on -log p(x) at beta = 1; for a fixed decoder the best q is the tempered posterior
# pi_beta(z) ∝ p(z) exp(-L_dec(x, z) / beta). Training alternates, as expectation-maximisation:
#   E-step   z_0 ~ q_phi(z | x) (the latent sampler below), then K steps of unadjusted Langevin
#            dynamics (ULA) on U(z) = |z|^2 / 2 + L_dec(x, z) / beta - lambda log q_phi(z | x):
#                z <- z - eta grad U(z) + sqrt(2 eta) xi,  xi ~ N(0, I).
#            grad_z L_dec is the decoder's pressure on the latent; lambda in [0, 1) keeps the chain
#            near the encoder (it sharpens the target to pi_beta^(1 / (1 - lambda)) at the fixed
#            point, test_the_alignment_term_tempers_the_e_step_by_one_minus_lambda).
#            --langevin-precond divides eta per dimension by the batch's RMS of grad U at the
#            chain's start: a stable eta is set by the stiffest direction (on a trained MNIST
#            decoder at beta 0.1, eta = 1e-2 diverged and 1e-3 was the best), and that eta hardly
#            moves z early in training, while the decoder barely reads the latent.
#   M-steps  the decoder on L_dec(x, z_K), and the encoder on the latent denoising loss of z_K: a
#            maximum-likelihood fit of q_phi to the chain's samples. They touch disjoint weights.
#            --langevin-shared (ours): the decoder's M-step reads z_0 instead, and its backward
#            gives grad_z L_dec(x, z_0) with the weights' gradients, which is the E-step's first
#            step: one decoder pass fewer per iteration (for K = 1 the EM step then costs a
#            Gaussian encoder's step plus the latent sampler and the pass for Delta U). At EM's
#            fixed point q_phi is the chain's stationary law, so z_0 and z_K have one law and the
#            decoder's M-step is the same in expectation; away from it the decoder learns to read
#            the encoder's latents, which are the ones reconstructions use.
# The bound: D + R >= -log p(x), D = E_q[L_dec], R = E_q[log q(z | x) - log p(z)], with log q exact
# for the deterministic (DDIM) sampler: z_0 = f(z_1) with z_1 ~ N(0, I) and f invertible, so
#     log q(z_0) = log N(z_1; 0, I) - sum over steps of log |det dz_s / dz_t|.
# The functions take callables (an energy, a denoiser), so the tests drive them with analytic
# models. A denoiser maps (z_t (B, d), gamma_t (B,)) to eps_hat (B, d), each row from its own row
# (the encoder's conditioning on x is bound inside it). At the end of the section, --model em
# puts them together with networks: the decoder is section 5's model with z added to the score
# U-Net's time embedding (ScoreUNet.zemb; --latent-cond film or spatial add a route, --latent-gate
# hands it sigma_t z), the encoder's denoiser is LatentEncoder, and em_losses is one EM
# iteration on a batch.
# Why a gate: the decoder's -ELBO weighs low noise, where z_t already shows the image and the
# latent cannot help. On MNIST (Gaussian encoder, tiny, beta 0.1) the ungated decoders learnt to
# expect one value of z: q(z | x) narrow around nearly the same point for every image, D_prior
# - D large, reconstructions at chance. sigma_t z keeps the latent out of the low-noise terms (a
# hypothesis and a lever, not a fix: in short runs it moved the class agreement from 10-13 % to
# 16-17 % on 100 images, about one standard error; issue 25).
# -------------------------------------------------------------------------------------------------

# The latent encoder's fixed linear schedule, gamma from -10 to 10: sigma^2 = sigmoid(gamma) is
# 4.5e-5 at t = 0 (z_0 is the latent to that noise) and alpha^2 = 4.5e-5 at t = 1 (z_1 is N(0, I)
# to that signal), so the sampler may start from N(0, I).
LATENT_GAMMA = (-10.0, 10.0)


def latent_gamma(t):
    """gamma(t) of the latent schedule, linear in t in [0, 1]."""
    gamma_0, gamma_1 = LATENT_GAMMA
    return gamma_0 + (gamma_1 - gamma_0) * t


def latent_grid(S, like):
    """gamma at the S + 1 grid times t_i = i / S, in like's dtype and device: (S + 1,)."""
    return latent_gamma(torch.linspace(0, 1, S + 1, dtype=like.dtype, device=like.device))


def log_standard_normal(z):
    """log N(z; 0, I) per row of z (B, d): the prior's log-density, and the sampler's start's."""
    return -0.5 * z.square().sum(-1) - 0.5 * z.shape[-1] * math.log(2 * math.pi)


def langevin_step(z, grad_U, eta, xi):
    """One step of the unadjusted Langevin algorithm: z - eta grad U(z) + sqrt(2 eta) xi. It has
    no accept/reject test, so its stationary law is exp(-U) only as eta -> 0: for U(z) =
    (z - m)^T P (z - m) / 2 it is N(m, (P - eta P^2 / 2)^-1) [Roberts & Tweedie 1996]. eta may be
    a float or a per-dimension step (d,), a constant diagonal preconditioner M times the step
    size: z - eta M grad U + sqrt(2 eta M) xi leaves exp(-U) invariant as eta -> 0 for any such M
    (for diagonal P, dimension j is N(m_j, 1 / (P_j - eta_j P_j^2 / 2)))."""
    return z - eta * grad_U + (2 * eta) ** 0.5 * xi


def posterior_energy(nll, beta=1.0, lam=0.0, log_q=None):
    """U(z) = |z|^2 / 2 + nll(z) / beta - lam log_q(z), per row of z (B, d) -> (B,): exp(-U) is
    the prior times the likelihood tempered by 1 / beta, times q^lam."""
    def U(z):
        u = 0.5 * z.square().sum(-1) + nll(z) / beta
        return u if lam == 0 else u - lam * log_q(z)
    return U


def e_step(z, energy, eta, K, noise, precond=False, first=None):
    """K Langevin steps on energy (z (B, d) -> U (B,)) from z; noise() draws xi (B, d). Returns
    z_K (no graph) and U(z_K) - U(z_0) per row: negative where the chain moved downhill, which it
    must on average when it starts from a proposal worse than the target. K + 1 evaluations of U
    (each a decoder pass in training): U(z_0) is the first step's. K = 0: no step, no evaluation.
    first: (U(z_0) (B,), grad U(z_0) (B, d)) where the caller has them (--langevin-shared), used
    by the first step instead of an evaluation: then K evaluations.
    precond: the step in dimension j is eta / r_j, r_j the root mean square over the batch of the
    first step's dU/dz_j, then held for the K steps (a constant diagonal preconditioner, so the
    chain still targets exp(-U); the RMS scaling of preconditioned SGLD [Li et al. 2016]): each
    dimension moves about eta per step whatever the scale of the decoder's pressure, which is
    small while the decoder barely reads z and large once it does."""
    z, u_0, step = z.detach(), None, eta
    if K == 0:
        return z, z.new_zeros(len(z))
    for k in range(K):
        if k == 0 and first is not None:
            u, grad_U = first
        else:
            z.requires_grad_(True)
            u = energy(z)                                                        # (B,)
            grad_U, = torch.autograd.grad(u.sum(), z)                            # (B, d)
        if u_0 is None:
            u_0 = u.detach()
            if precond:  # r (d,); floored at the dtype's tiniest number: never a division by 0
                step = eta / grad_U.square().mean(0).sqrt().clamp_min(torch.finfo(z.dtype).tiny)
        z = langevin_step(z.detach(), grad_U, step, noise())
    return z, energy(z).detach() - u_0


def latent_step(z_t, eps_hat, gamma_s, gamma_t, xi=None):
    """One reverse step t -> s < t of the latent encoder, with z_0 predicted as
    z_hat = (z_t - sigma_t eps_hat) / alpha_t. With xi ~ N(0, I): ancestral, z_s ~ q(z_s | z_t,
    z_0 = z_hat) (section 4's p_reverse, VDM's step). With xi None: deterministic (DDIM [Song et
    al. 2021]), z_s = alpha_s z_hat + sigma_s eps_hat, the map whose density latent_log_q gives."""
    alpha_t, sigma_t = alpha_sigma(gamma_t)
    z_hat = (z_t - sigma_t * eps_hat) / alpha_t
    if xi is None:
        alpha_s, sigma_s = alpha_sigma(gamma_s)
        return alpha_s * z_hat + sigma_s * eps_hat
    mean, var = p_reverse(z_t, z_hat, gamma_s, gamma_t, increment=None)
    return mean + var.sqrt() * xi


def latent_sample(denoise, z_1, S, noise=None):
    """z_0 (B, d) from z_1 (B, d) in S steps on the uniform grid t_i = i / S: ancestral with
    noise() (a draw of q_phi(z | x)), deterministic with noise None."""
    gammas, z = latent_grid(S, z_1), z_1
    for i in range(S, 0, -1):
        eps_hat = denoise(z, gammas[i].expand(len(z)))
        z = latent_step(z, eps_hat, gammas[i - 1], gammas[i], None if noise is None else noise())
    return z


def latent_log_q(denoise, z_1, S):
    """The deterministic sampler's z_0 (B, d) and its exact log-density log q(z_0) (B,): the
    change of variables from z_1 ~ N(0, I). Each step's Jacobian dz_s / dz_t (B, d, d) is exact
    (torch.func.jacrev: d backward passes of the batch sum, which holds every row's Jacobian since
    rows do not interact; the step itself comes back as jacrev's aux, one denoiser pass per step);
    d <= 64 keeps the S log-determinants cheap."""
    gammas, z, log_q = latent_grid(S, z_1), z_1, log_standard_normal(z_1)
    for i in range(S, 0, -1):
        def step(z_t):  # (B, d) -> (sum over rows (d,), z_s (B, d))
            z_s = latent_step(z_t, denoise(z_t, gammas[i].expand(len(z_t))), gammas[i - 1],
                              gammas[i])
            return z_s.sum(0), z_s
        jac, z = torch.func.jacrev(step, has_aux=True)(z)                       # (d, B, d)
        log_q = log_q - torch.linalg.slogdet(jac.transpose(0, 1)).logabsdet
    return z, log_q


def latent_denoising_loss(denoise, z_0, t, eps):
    """The encoder's M-step loss per row (B,): VDM's continuous-time diffusion loss for data z_0
    (B, d) with eps-prediction, gamma'(t) |eps - eps_hat(z_t, gamma_t)|^2 / 2 (section 4 with
    x_phi = x), at one t (B,) and eps (B, d) per row. With the reconstruction term of a continuous
    z_0, d/2 (log 2 pi + gamma_0 + 1) (a constant: it has no parameters) and the prior term
    (below 1e-4 nats at gamma_1 = 10), its expectation bounds -log q_phi(z_0 | x) from above, so
    minimising it over the chain's samples is maximum likelihood."""
    gamma_t = latent_gamma(t)
    alpha, sigma = alpha_sigma(gamma_t[:, None])
    z_t = alpha * z_0 + sigma * eps
    dgamma_dt = LATENT_GAMMA[1] - LATENT_GAMMA[0]
    return 0.5 * dgamma_dt * (eps - denoise(z_t, gamma_t)).square().sum(-1)


def distortion_rate(nll_z, log_q_z, z):
    """The two parts of the bound per row, in nats: D = L_dec(x, z), R = log q(z | x) - log p(z)
    for latents z (B, d) drawn from q with their exact log q (B,). E_q[D + R] >= -log p(x), equal
    when q is the exact posterior (then D + R = -log p(x) for every z)."""
    return nll_z, log_q_z - log_standard_normal(z)


# --model em, the pieces above with networks. The decoder's -ELBO(x | z) depends on z only through
# its diffusion term (the score network sees z; the boundary terms do not), so the decoder
# pressure grad_z L_dec is the gradient of that term alone, estimated with one (t, eps) per image
# like the training loss. With lambda > 0 the E-step needs log q_phi(z | x) at the chain's z, where
# the deterministic sampler cannot be inverted cheaply; it uses the encoder's own bound instead,
# -log q <= latent_denoising_loss + LATENT_RECON d (tight for the exact denoiser, see there), with
# a fresh (t, eps) per step, as the decoder's term is. Its constant does not move the chain.
LATENT_RECON = 0.5 * (math.log(2 * math.pi) + LATENT_GAMMA[0] + 1)  # per dimension, nats


def conv_embedding(image_shape, w):
    """h(x), (B, C, H, W) -> (B, w): three stride-2 3x3 convs (w/8, w/4, w/2 channels, SiLU), then
    Dense. Both latent encoders (the diffusion one and the Gaussian baseline) read x through it."""
    C, H, W = image_shape
    convs, c_in = [], C
    for c in (w // 8, w // 4, w // 2):  # each halves H and W (rounding up): H -> ceil(H / 8)
        convs += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.SiLU()]
        c_in = c
    n_pos = math.ceil(H / 8) * math.ceil(W / 8)
    return nn.Sequential(*convs, nn.Flatten(), nn.Linear(c_in * n_pos, w))


def gaussian_eps(z_t, gamma, mean, log_var):
    """The exact denoiser of data z_0 ~ N(mean, diag exp(log_var)): E[eps | z_t] = sigma_t (z_t -
    alpha_t mean) / (alpha_t^2 v + sigma_t^2), v = exp(log_var), per dimension (z_t = alpha_t z_0
    + sigma_t eps is Gaussian with that mean and variance, and eps's regression on it is linear).
    z_t, mean, log_var (B, d), gamma (B,) -> (B, d). mean = 0, log_var = 0: sigma_t z_t."""
    alpha, sigma = alpha_sigma(gamma[:, None])                                  # (B, 1) each
    return sigma * (z_t - alpha * mean) / (alpha ** 2 * log_var.exp() + sigma ** 2)


class LatentEncoder(nn.Module):
    """q_phi(z | x)'s denoiser eps_hat(z_t, gamma_t; h(x)): an MLP on (z_t, the time embedding,
    h(x)), h a conv embedding of the image (three stride-2 3x3 convs, then Dense). The network adds
    a Gaussian's exact denoiser to a zero-initialised last layer: N(0, I)'s, sigma_t z_t, or with
    --latent-skip N(m(x), diag v(x))'s (gaussian_eps), (m, log v) a zero-initialised Dense on h(x).
    At init q_phi is the prior either way (exactly in continuous time; its S-step samplers up to
    their discretisation), and the E-step alone moves the latents toward the posterior at first.
    Why the skip (ours): the MLP must learn a shift of z_0's mean as a t-dependent correction,
    under the denoising loss's noise; through m(x) it is one linear map of h(x), and with the MLP
    at zero q_phi is exactly N(m(x), diag v(x)): the diffusion encoder's family contains the
    Gaussian baseline's."""

    def __init__(self, cfg, image_shape):
        super().__init__()
        d, w = cfg.latent_dim, cfg.latent_width
        self.w, self.embed = w, conv_embedding(image_shape, w)
        self.mlp = nn.Sequential(nn.Linear(d + 2 * w, w), nn.SiLU(), nn.Linear(w, w), nn.SiLU(),
                                 nn.Linear(w, d))
        zero_init(self.mlp[-1])
        # h -> (m, log v), zero; skip_init draws no random numbers, so every other weight starts
        # as without the skip (an ablation that differs by the skip alone)
        self.skip = nn.utils.skip_init(nn.Linear, w, 2 * d) if cfg.latent_skip else None
        if self.skip is not None:
            zero_init(self.skip)

    def denoiser(self, x):
        """x (B, C, H, W) in [-1, 1] -> the callable (z_t (B, d), gamma_t (B,)) -> eps_hat (B, d)
        that the functions above take, with h(x) computed once and bound in."""
        h = self.embed(x)                                                        # (B, w)
        if self.skip is not None:
            mean, log_var = self.skip(h).chunk(2, dim=1)                         # (B, d) each

        def denoise(z_t, gamma):
            t_in = (gamma - LATENT_GAMMA[0]) / (LATENT_GAMMA[1] - LATENT_GAMMA[0])
            temb = timestep_embedding(1000 * t_in, self.w)                     # (B, w)
            base = (alpha_sigma(gamma[:, None])[1] * z_t if self.skip is None else
                    gaussian_eps(z_t, gamma, mean, log_var))                     # (B, d)
            return base + self.mlp(torch.cat([z_t, temb, h], 1))
        return denoise


def decoder_nll(model, x, t, eps):
    """z (B, d) -> the decoder's diffusion loss L_diff(x, z) (B,) nats at one (t, eps) per image:
    its -ELBO(x | z) up to the terms that do not depend on z. x (B, C, H, W) in [-1, 1]."""
    return lambda z: model._continuous(x, t, eps, z)


def em_e_step(model, x, z_0, denoise, times, normal, beta=None, shared=None):
    """The E-step on a batch: K ULA steps from z_0 (B, d) on U = |z|^2 / 2 + L_diff(x, z) / beta
    - lam log q_phi(z | x), beta the run's (or, during --beta-warmup, the step's: beta_step).
    Each step draws its own (t, eps) for the decoder's term (times() (B,), normal(*shape));
    U(z_K) reuses U(z_0)'s draw, so Delta U compares the two latents on the same noise (common
    random numbers: its sign is not drowned by the draws' variance). Returns z_K and Delta U
    (B,). shared (--langevin-shared): (L_diff (B,) and its gradient (B, d) at z_0, from the
    decoder's M-step, and z -> L_diff(x, z) on that M-step's draw): the first step uses them
    instead of a decoder pass, and U(z_K) is evaluated on that draw."""
    cfg = model.cfg
    beta = beta or cfg.beta
    draws = [(times(), normal(*x.shape), times(), normal(*z_0.shape))
             for _ in range(cfg.langevin_steps - (shared is not None))]
    first = None
    if shared is not None:  # lam = 0 (validate): U = |z|^2 / 2 + L_diff / beta
        nll_0, grad_0, nll = shared
        first = (0.5 * z_0.square().sum(-1) + nll_0 / beta, z_0 + grad_0 / beta)
    calls = iter(draws + (draws[:1] if shared is None else [None]))

    def energy(z):
        draw = next(calls)
        if draw is None:  # --langevin-shared: U(z_K) on the M-step's draw
            return posterior_energy(nll, beta)(z)
        t_k, eps_k, t_q, eps_q = draw
        log_q = lambda z: -latent_denoising_loss(denoise, z, t_q, eps_q)  # up to its constant
        return posterior_energy(decoder_nll(model, x, t_k, eps_k), beta, cfg.lam, log_q)(z)
    return e_step(z_0, energy, cfg.langevin_eta, cfg.langevin_steps, lambda: normal(*z_0.shape),
                  cfg.langevin_precond, first)


def shared_m_step(model, x_int, t, eps, eps_0, z_0):
    """--langevin-shared: the decoder's M-step on (x, z_0), with its backward run here, once for
    the weights (their .grad) and for z_0. Returns the bpd terms (3,) (no graph), L_diff at z_0
    (B,) nats, its gradient in z_0 (B, d) and z -> L_diff(x, z) on the M-step's (t, eps) and
    dropout masks (its dropout draws from a fork of the random state, which the function replays
    once: Delta U's common random numbers)."""
    z_0 = z_0.detach().requires_grad_(True)
    with forked_rng(eps.device):
        diff, latent, recon = model(x_int, t, eps, eps_0, cond=z_0)             # (B,) each, nats
        terms = batch_bpd((diff, latent, recon), model.image_shape)             # (3,) bpd
        terms.sum().backward()
    # terms.sum() holds L_diff / (B D ln 2) (batch_bpd): z_0.grad back to nats per image
    grad = z_0.grad * len(z_0) * math.prod(model.image_shape) * math.log(2)     # (B, d)

    def nll(z):  # the M-step's pass again: training mode, and the random state it started from
        model.train()
        return model(x_int, t, eps, eps_0, cond=z)[0]
    return terms.detach(), diff.detach(), grad, nll


def em_losses(model, x_int, t, eps, eps_0, g, beta):
    """One EM iteration on a batch. x_int (B, C, H, W) uint8; t (B,), eps, eps_0 (B, C, H, W): the
    decoder's noise for its M-step; g: a CPU generator for the encoder's sampler and the E-step;
    beta: the E-step's temperature at this step (beta_step). With --langevin-shared the decoder's
    M-step reads z_0 and its backward has run here (its loss comes back without a graph).
    Returns the M-steps' two losses, scalars: the decoder's bpd on (x, z_K), and the encoder's
    latent loss on z_K in bits per latent dimension (disjoint weights: one optimiser step on their
    sum does both), and the report (5,): the decoder's (diffusion, latent, recon) bpd, the
    encoder's bound on -log q_phi(z_K | x) in nats per latent dimension, and the mean Delta U of
    the E-step (nats)."""
    cfg, B, d = model.cfg, len(x_int), model.cfg.latent_dim
    x = scale_pixels(x_int, eps.dtype)                                          # (B, C, H, W)
    normal = lambda *shape: torch.randn(shape, generator=g, dtype=eps.dtype).to(eps.device)
    times = lambda: low_discrepancy_times(torch.rand(1, generator=g), B).to(t)  # (B,)
    # One embedding h(x) serves the sampler, the E-step and the encoder's M-step (the E-step
    # differentiates by z alone, so its graph to the weights is used once, by the M-step).
    denoise = model.latent_enc.denoiser(x)
    # 1. z_0 ~ q_phi(z | x): S ancestral steps. 2. E-step. Decoder without dropout; no weights move.
    model.eval()
    with torch.no_grad():
        z_0 = latent_sample(denoise, normal(B, d), cfg.latent_steps, lambda: normal(B, d))
    if cfg.langevin_shared:  # 3. first, on z_0: its backward is also the E-step's first gradient
        model.train()
        terms, *shared = shared_m_step(model, x_int, t, eps, eps_0, z_0)
        model.eval()
        z_K, delta_U = em_e_step(model, x, z_0, denoise, times, normal, beta, shared)
        model.train()
    else:
        z_K, delta_U = em_e_step(model, x, z_0, denoise, times, normal, beta)  # (B, d), (B,)
        model.train()
        # 3. M-step, decoder: its -ELBO on the refined latents (z_K carries no graph).
        diff, latent, recon = model(x_int, t, eps, eps_0, cond=z_K)            # (B,) each, nats
        terms = batch_bpd((diff, latent, recon), model.image_shape)             # (3,) bpd
    # 4. M-step, encoder: maximum likelihood of q_phi on the chain's samples.
    enc = latent_denoising_loss(denoise, z_K, times(), normal(B, d))         # (B,)
    report = torch.cat([terms.detach(), torch.stack([enc.detach().mean() / d + LATENT_RECON,
                                                     delta_U.mean()])])
    return terms.sum(), enc.mean() / (d * math.log(2)), report


# The baseline the seed argues against (--latent-encoder gaussian): a VAE's encoder [Kingma &
# Welling 2014, "Auto-encoding variational Bayes"], q(z | x) = N(mu(x), diag sigma^2(x)) from the
# same embedding h(x), trained jointly with the same decoder on the same F_beta = E_q[L_dec] +
# beta KL(q || p) by the reparameterisation trick z = mu + sigma xi: the decoder's gradient
# reaches the encoder through z itself, so there is no E-step. Its rate is the closed-form KL.

class GaussianEncoder(nn.Module):
    """h(x) -> (mu, log sigma^2) (B, d) each, through a two-layer MLP on conv_embedding. The last
    layer starts at zero, so q(z | x) starts as the prior N(0, I), as the diffusion encoder does."""

    def __init__(self, cfg, image_shape):
        super().__init__()
        d, w = cfg.latent_dim, cfg.latent_width
        self.embed = conv_embedding(image_shape, w)
        self.head = nn.Sequential(nn.Linear(w, w), nn.SiLU(), nn.Linear(w, 2 * d))
        zero_init(self.head[-1])

    def moments(self, x):
        """x (B, C, H, W) in [-1, 1] -> mu, log sigma^2, (B, d) each."""
        return self.head(self.embed(x)).chunk(2, dim=1)


def reparameterise(mu, log_var, xi):
    """z = mu + sigma xi with sigma = exp(log sigma^2 / 2) and xi ~ N(0, I): a draw of N(mu, diag
    sigma^2) that is differentiable in mu and sigma [Kingma & Welling 2014, eq. 10]."""
    return mu + (0.5 * log_var).exp() * xi


def gaussian_log_q(z, mu, log_var):
    """log N(z; mu, diag sigma^2) per row (B,): the baseline's exact log q(z | x)."""
    return -0.5 * ((z - mu).square() / log_var.exp() + log_var + math.log(2 * math.pi)).sum(-1)


def gaussian_rate(mu, log_var):
    """KL(N(mu, diag sigma^2) || N(0, I)) per row (B,), nats: sum (mu^2 + sigma^2 - log sigma^2 -
    1) / 2 [Kingma & Welling 2014, appendix B]; the expectation over q of log q(z|x) - log p(z).
    sigma^2 - 1 as expm1: near the prior (log sigma^2 ~ 1e-5) exp(.) - 1 - log sigma^2 cancels
    to float32's rounding of 1, and the rate of an encoder leaving the prior would read 0."""
    return 0.5 * (mu.square() + torch.expm1(log_var) - log_var).sum(-1)


def gaussian_losses(model, x_int, t, eps, eps_0, g, beta):
    """One step of the Gaussian-encoder baseline on a batch, em_losses' signature and return: the
    decoder's bpd on (x, z) with z = mu + sigma xi carrying the encoder's graph, beta times the
    rate in bpd (one optimiser step on their sum trains both by the reparameterisation trick),
    and the report (4,): the decoder's (diffusion, latent, recon) bpd and the rate in nats."""
    x = scale_pixels(x_int, eps.dtype)                                          # (B, C, H, W)
    mu, log_var = model.latent_enc.moments(x)                                   # (B, d) each
    xi = torch.randn(mu.shape, generator=g, dtype=eps.dtype).to(eps.device)
    diff, latent, recon = model(x_int, t, eps, eps_0, cond=reparameterise(mu, log_var, xi))
    rate = gaussian_rate(mu, log_var)                                           # (B,) nats
    terms = batch_bpd((diff, latent, recon), model.image_shape)                 # (3,) bpd
    kl = batch_bpd((rate,), model.image_shape)[0]
    report = torch.cat([terms.detach(), rate.detach().mean()[None]])
    return terms.sum(), beta * kl, report


def beta_step(cfg, step):
    """beta at training step `step` (from 0): --beta, or with --beta-warmup N, beta (step + 1) / N
    until step N - 1 [KL annealing, Bowman et al. 2016, "Generating sentences from a continuous
    space", section 3.1]. F_beta / beta = E_q[L_dec] / beta + KL: a small beta first weighs the
    reconstruction over the rate, so the latent is used before the prior's pull grows to its
    weight; for the E-step it is a low temperature, a chain that descends L_dec nearly without
    noise (with --langevin-precond, once L_dec / beta dominates U, its noise per step is about
    sqrt(2 eta beta / |dL_dec/dz|))."""
    return cfg.beta * min(1.0, (step + 1) / cfg.beta_warmup) if cfg.beta_warmup else cfg.beta


def encode(model, x, xi, S):
    """z ~ q(z | x) for x (B, C, H, W) in [-1, 1], from standard normal draws xi (S + 1, B, d):
    the diffusion encoder's S-step ancestral sampler (xi[0] its start, xi[i] step i's noise), or
    the Gaussian encoder's mu + sigma xi[0]."""
    enc = model.latent_enc
    if isinstance(enc, GaussianEncoder):
        return reparameterise(*enc.moments(x), xi[0])
    noise = iter(xi[1:])
    return latent_sample(enc.denoiser(x), xi[0], S, lambda: next(noise))


def encode_log_q(model, x, z_1, S):
    """z (B, d) from z_1 ~ N(0, I) (B, d) by a deterministic map whose density is exact, and log
    q(z | x) (B,): the diffusion encoder's S-step DDIM map (latent_log_q), or mu + sigma z_1."""
    enc = model.latent_enc
    if isinstance(enc, GaussianEncoder):
        mu, log_var = enc.moments(x)
        z = reparameterise(mu, log_var, z_1)
        return z, gaussian_log_q(z, mu, log_var)
    return latent_log_q(enc.denoiser(x), z_1, S)


# -------------------------------------------------------------------------------------------------
# 9. Configuration
#
# One dataclass holds every setting; presets are dicts of overrides; argparse is built from the
# dataclass (section 14), so a flag exists exactly when a field does. Defaults are the paper's
# small CIFAR-10 model (DiffEnc-8-2: 8-block score U-Net, 2-level encoder U-Net), trained with
# the official optimiser settings [code: config/config_opt_adamw_0002_no_clip.json].
# -------------------------------------------------------------------------------------------------

def setting(default, help, choices=None):
    """A Config field: its default, the one-line help of its flag, and its allowed values."""
    return field(default=default, metadata=dict(help=help, choices=choices))


@dataclass
class Config:
    # the model: what is modelled, and how (MODEL_FIELDS below must match to resume or evaluate)
    dataset: str = setting("cifar10", "the data set (set by --train or --bench)",
                           ("cifar10", "mnist", "synthetic"))
    encoder: str = setting("learned", "none: VDM (x_phi = x); fixed: x_phi = alpha^2 x; "
                           "learned: DiffEnc", ("none", "fixed", "learned"))
    param: str = setting("v", "the score network predicts v (the paper's choice, z added as VDM's "
                         "base measure), eps (z added too), or v-nobase (v, nothing added: the "
                         "same loss and optimum, learns fastest early; see README)",
                         ("v", "eps", "v-nobase"))
    schedule: str = setting("fixed", "fixed: linear gamma; scalar: learned endpoints; net: and a "
                            "learned shape (section 1)", ("fixed", "scalar", "net"))
    gamma_min: float = setting(-13.3, "gamma(0) = -log SNR at t = 0 (VDM's value)")
    gamma_max: float = setting(5.0, "gamma(1) = -log SNR at t = 1 (VDM's value)")
    T: int = setting(0, "0: continuous-time loss (the paper); T > 0: the T-step loss (also for "
                     "--eval, --sample, --tune-schedule)")
    increment: str = setting("euler", "DiffEnc's T-step model of the encoder's increment: euler "
                             "(the paper's), or exp, exact for the fixed encoder (section 4); "
                             "with --T > 0 or --sample, not for --encoder none",
                             ("euler", "exp"))
    size: str = setting("small", "preset: tiny (CPU, tests), small (8 blocks), large (32 blocks)",
                        ("tiny", "small", "large"))
    n_embd: int = setting(128, "score U-Net channels")
    n_layer: int = setting(8, "score U-Net ResNet blocks per half (8 or 32 in the paper)")
    downsample: int = setting(0, "score U-Net halvings of H, W, each doubling the channels (a "
                              "DDPM-style U-Net); 0: none, VDM's (the paper)")
    dropout: float = setting(0.1, "dropout in the score U-Net")
    norm_groups: int = setting(32, "GroupNorm groups: score U-Net, encoder levels and attention")
    enc_norm_groups: int = setting(16, "GroupNorm groups of the encoder's middle and output")
    enc_ch: int = setting(64, "encoder U-Net channels at full resolution")
    enc_levels: int = setting(2, "encoder U-Net resolution levels (each halves H, W)")
    enc_blocks: int = setting(1, "encoder ResNet blocks per level")
    enc_dropout: float = setting(0.1, "dropout in the encoder U-Net")
    # the Diffusion Encoder (section 8): the options below --model are used only with --model em
    model: str = setting("diffenc", "diffenc: the paper's model; em: an autoencoder whose encoder "
                         "is a latent diffusion model, trained by EM", ("diffenc", "em"))
    latent_encoder: str = setting("diffusion", "q(z | x): diffusion (the seed's, trained by EM) or "
                                  "gaussian (a VAE's, the baseline: reparameterisation trick, "
                                  "no E-step)", ("diffusion", "gaussian"))
    latent_cond: str = setting("temb", "how the decoder reads z: temb (added to the time "
                               "embedding), film (and a scale and shift in every ResBlock) or "
                               "spatial (and a map of z beside the image's channels)",
                               ("temb", "film", "spatial"))
    latent_gate: bool = setting(False, "the decoder reads sigma_t z instead of z: the latent "
                                "acts where the noise hides the image, and not at low noise")
    latent_dim: int = setting(16, "latent size d (at most 64: log q needs d x d Jacobians)")
    latent_width: int = setting(256, "width of the latent encoder's MLP (a multiple of 8)")
    latent_skip: bool = setting(False, "the diffusion encoder's denoiser adds the exact denoiser "
                                "of N(m(x), diag v(x)), learned from h(x), instead of N(0, I)'s")
    latent_steps: int = setting(20, "the latent encoder's sampling steps S")
    langevin_steps: int = setting(10, "E-step: Langevin steps K (0: no E-step, an ablation)")
    langevin_eta: float = setting(1e-3, "E-step: Langevin step size eta")
    langevin_precond: bool = setting(False, "E-step: step eta / r_j in latent dimension j, r_j "
                                     "the batch's RMS of dU/dz_j at the chain's start")
    langevin_shared: bool = setting(False, "E-step: its first gradient from the decoder's M-step, "
                                    "which then reads z_0 ~ q instead of z_K: one decoder pass "
                                    "fewer per step")
    beta: float = setting(1.0, "E-step: beta, the information bottleneck (1: the ELBO)")
    beta_warmup: int = setting(0, "steps over which beta rises linearly from 0 to --beta (KL "
                               "warm-up); 0: --beta from the start")
    lam: float = setting(0.0, "E-step: lambda, the pull toward the encoder, in [0, 1)")
    # optimisation
    steps: int = setting(1_400_000, "training steps (the paper's small models: 1.4M)")
    minutes: float = setting(0.0, "stop training after this many minutes of this invocation "
                             "(wall time; saved and evaluated there), or at --steps; 0: no limit")
    batch_size: int = setting(128, "global batch size (split over DDP ranks)")
    lr: float = setting(2e-4, "AdamW learning rate")
    warmup: int = setting(100, "linear learning-rate warm-up steps")
    lr_decay: str = setting("constant", "the learning rate after the warm-up: constant (the "
                            "paper) or cosine, from --lr at step 0 to 0 at --steps (so a resumed "
                            "run keeps its schedule only with the same --steps)",
                            ("constant", "cosine"))
    weight_decay: float = setting(0.01, "AdamW weight decay (not on biases or the schedule)")
    clip: float = setting(0.0, "gradient-norm clipping; 0 = off (the paper)")
    weight_bias: float = setting(math.inf, "training only: the diffusion loss at t is weighted by "
                                 "sigmoid(b - log SNR_t), b = this (Kingma & Gao 2023; toward "
                                 "high noise, for samples); inf: weight 1, the ELBO (the paper)")
    ema: float = setting(0.9999, "EMA decay of the weights used for eval and sampling")
    seed: int = setting(0, "seed for init, data order, t, eps and dropout")
    amp: bool = setting(False, "bf16 autocast for the score network (CUDA)")
    compile: bool = setting(False, "torch.compile the score network; on CUDA, CUDA graphs of "
                            "the encoder's calls")
    # bookkeeping
    data_dir: str = setting("./data", "where data sets are cached / looked for")
    out: str = setting("runs/diffenc", "run folder: checkpoints, log.csv, samples")
    resume: bool = setting(False, "continue the run in --out from latest.pt")
    log_every: int = setting(100, "steps between progress lines / log.csv rows")
    eval_every: int = setting(2000, "steps between test-bpd evaluations (EMA weights)")
    eval_images: int = setting(0, "test images for periodic evaluation and --eval; 0 = all")
    save_every: int = setting(2000, "steps between checkpoints")
    skip_nonfinite: bool = setting(False, "skip a batch whose loss is NaN/inf instead of stopping")
    sample_steps: int = setting(1000, "sampler steps T (the paper: 1000)")


PRESETS = {
    # Small enough for hundreds of MNIST steps in minutes on 2 CPU cores (measured in README).
    # GroupNorm needs >= 2 channels per group to keep the time embedding (see group_norm): 8 groups
    # of 4 channels in the score net, 8 and 4 groups of >= 2 channels in the encoder.
    "tiny": dict(n_embd=32, n_layer=1, enc_ch=16, norm_groups=8, enc_norm_groups=4,
                 latent_width=64, batch_size=32, log_every=10, eval_every=200, eval_images=1000,
                 save_every=200, ema=0.999),
    "small": dict(),  # the defaults: the paper's DiffEnc-8-2
    # DiffEnc-32-4: 32 blocks; the paper's encoder for it is unet_mult_res_4 (2 levels x 2 blocks).
    "large": dict(n_layer=32, enc_blocks=2),
}

# Fields that define the network and the likelihood: a checkpoint can only be resumed or
# evaluated with the same values (the others, e.g. steps or lr, may change on resume).
# Fields that only --model em reads: given to another model they would do nothing, so they are
# refused (main) rather than ignored.
EM_FIELDS = ("latent_encoder", "latent_cond", "latent_gate", "latent_dim", "latent_width",
             "latent_skip", "latent_steps", "langevin_steps", "langevin_eta", "langevin_precond",
             "langevin_shared", "beta", "beta_warmup", "lam")
# diffusion encoder only:
E_STEP_FIELDS = ("latent_skip", "latent_steps", "langevin_steps", "langevin_eta",
                 "langevin_precond", "langevin_shared", "lam")
MODEL_FIELDS = ("dataset", "encoder", "param", "schedule", "gamma_min", "gamma_max", "n_embd",
                "n_layer", "downsample", "norm_groups", "enc_ch", "enc_levels", "enc_blocks",
                "enc_norm_groups", "model", "latent_encoder", "latent_cond", "latent_gate",
                "latent_dim", "latent_width", "latent_skip")


# What each field's value must be: every Config field has a rule here, a list of choices, or is a
# bool (test_every_config_field_rejects_an_out_of_range_value checks that), so no field can be
# left unchecked. Widths that GroupNorm cannot split, and images that the encoder's levels cannot
# halve, are refused when the model is built.
POSITIVE = (lambda v: 0 < v < math.inf, "positive")
UNIT = (lambda v: 0 <= v < 1, "in [0, 1)")
GAMMA = (lambda v: -30 <= v <= 30,  # beyond, alpha or sigma is below float32's resolution of 1
         "in [-30, 30]")
RULES = dict(
    data_dir=(lambda v: v != "" and not os.path.isfile(v), "a folder, not a file"),
    gamma_min=GAMMA, gamma_max=GAMMA,
    T=(lambda v: v >= 0, "0 (continuous time) or a positive number of steps"),
    n_embd=POSITIVE, n_layer=POSITIVE, downsample=(lambda v: v >= 0, "0 (VDM's) or more"),
    norm_groups=POSITIVE, enc_ch=POSITIVE, enc_levels=POSITIVE,
    enc_blocks=POSITIVE, enc_norm_groups=POSITIVE, dropout=UNIT, enc_dropout=UNIT,
    latent_dim=(lambda v: 1 <= v <= 64, "in 1..64"),
    latent_width=(lambda v: v >= 8 and v % 8 == 0, "a positive multiple of 8"),
    latent_steps=POSITIVE, langevin_steps=(lambda v: v >= 0, "0 (no E-step) or more"),
    langevin_eta=POSITIVE, beta=POSITIVE, beta_warmup=(lambda v: v >= 0, "0 (off) or more"),
    lam=UNIT,
    steps=POSITIVE, batch_size=POSITIVE, lr=POSITIVE,
    minutes=(lambda v: 0 <= v < math.inf, "0 (no limit) or a positive number of minutes"),
    warmup=(lambda v: v >= 1, "at least 1 (1 = no warm-up)"),
    weight_decay=(lambda v: 0 <= v < math.inf, "0 or more"),
    clip=(lambda v: 0 <= v < math.inf, "0 (off) or a positive gradient norm"),
    weight_bias=(lambda v: -math.inf < v <= math.inf, "a number, or inf (the ELBO)"),
    ema=UNIT, seed=(lambda v: 0 <= v < 2 ** 63, "in [0, 2^63)"),
    out=(lambda v: v != "", "a folder"),
    log_every=POSITIVE, eval_every=POSITIVE, save_every=POSITIVE, sample_steps=POSITIVE,
    eval_images=(lambda v: v >= 0, "0 (all) or a positive number of images"),
)


def check_field(name, value):
    """Refuse a value that a Config field cannot take, naming the flag and what it must be."""
    f = next(f for f in dataclasses.fields(Config) if f.name == name)
    if f.type is bool:
        ok, what = isinstance(value, bool), "true or false"
    elif f.metadata["choices"]:
        ok, what = value in f.metadata["choices"], f"one of {', '.join(f.metadata['choices'])}"
    else:
        test, what = RULES[name]
        ok = test(value)
    if not ok:
        flag = "the data set" if name == "dataset" else "--" + name.replace("_", "-")
        raise DiffEncError(f"{flag} must be {what}, got {value!r}")


def validate(cfg):
    """Reject settings that cannot work, with the fix in the message."""
    for f in dataclasses.fields(cfg):
        check_field(f.name, getattr(cfg, f.name))
    if not cfg.gamma_min < cfg.gamma_max:
        raise DiffEncError(f"--gamma-min ({cfg.gamma_min}) must be below --gamma-max "
                           f"({cfg.gamma_max})")
    if cfg.increment != "euler" and cfg.encoder == "none":
        raise DiffEncError(f"--increment {cfg.increment}: the VDM (--encoder none) has no encoder "
                           f"increment to model; drop --increment")
    if cfg.increment != "euler" and not cfg.T:
        raise DiffEncError(f"--increment {cfg.increment} sets the T-step loss's step, and the "
                           f"continuous-time loss (--T 0) has none; add --T or drop --increment")
    if cfg.model == "em" and cfg.T:
        raise DiffEncError(f"--model em trains with the continuous-time loss only; drop "
                           f"--T {cfg.T}")
    if cfg.model == "em" and cfg.weight_bias != math.inf:
        raise DiffEncError("--weight-bias weights the diffusion loss of --model diffenc; --model "
                           "em trains on its ELBO (the E-step's energy); drop --weight-bias")
    if cfg.langevin_shared and (cfg.langevin_steps == 0 or cfg.lam):
        raise DiffEncError("--langevin-shared takes the E-step's first step from the decoder's "
                           "M-step alone; it needs --langevin-steps >= 1 and --lam 0")
    if cfg.model == "em" and cfg.compile:
        raise DiffEncError("--model em runs its decoder uncompiled (the E-step differentiates it "
                           "by z); drop --compile")


# -------------------------------------------------------------------------------------------------
# 10. Data
#
# Images are kept in memory as uint8 (N, C, H, W). The official files are downloaded once into
# --data-dir, checked by md5, and read with numpy/pickle; files already there are used without
# network. The model is unconditional: only the MNIST classifier that scores samples reads labels
# (load_mnist_labels; training never fetches them). No augmentation [code: load_data.py].
# `synthetic` is a small built-in set of 16x16 shapes for smoke runs and tests.
# -------------------------------------------------------------------------------------------------

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"  # of the archive (170,498,071 bytes)
MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
# split -> (file, md5 of the *decompressed* idx file, so that any re-compression is accepted)
MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "6bbc9ace898e44ae57da46a324031adb"),
    "test": ("t10k-images-idx3-ubyte", "2646ac647ad5339dbf082846283269ea"),
}
# The labels, read only by the MNIST classifier that scores samples (section "Sample quality").
MNIST_LABEL_FILES = {
    "train": ("train-labels-idx1-ubyte", "a25bea736e30d166cdddb491f175f624"),
    "test": ("t10k-labels-idx1-ubyte", "27ae3e4e09519cfbb04c329615203637"),
}


def rng(*keys):
    """A CPU torch.Generator seeded by a tuple of ints: every random draw in training and
    evaluation is a pure function of (seed, step, ...), which makes resume exact."""
    seed = np.random.SeedSequence(keys).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(seed))


# The streams of rng(seed, ..., stream): each kind of randomness has its own, so that drawing more
# of one never shifts another.
RNG = dict(order=1, train_noise=2, sample=3, dropout=4, eval_noise=5, bench=6, sigma_p=7,
           e_step=8, latent_eval=9, latent_sample=10, quality=11)


def download(url, path):
    """Fetch url to path through a temporary file, so an interrupted download never looks
    complete. Raises OSError (urllib's errors are OSErrors) when it cannot."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with urllib.request.urlopen(url, timeout=60) as r:
        atomic_write(path, lambda f: f.write(r.read()))


def data_files(name, data_dir, splits=("train", "test"), labels=False):
    """The files that data set `name` needs for these splits (with labels=True: MNIST's label
    files instead of its images), as (url, the path a download writes, the names accepted in
    data_dir: MNIST's idx files compressed or not)."""
    if name == "mnist":
        files = MNIST_LABEL_FILES if labels else MNIST_FILES
        return [(f"{MNIST_URL}{f}.gz", os.path.join(data_dir, f"{f}.gz"), (f, f"{f}.gz"))
                for f, _ in (files[split] for split in splits)]
    if name == "cifar10":
        path = os.path.join(data_dir, os.path.basename(CIFAR10_URL))
        return [(CIFAR10_URL, path, (os.path.basename(path),))]
    return []


def fetch_missing(name, data_dir, splits, labels=False):
    """Download every file of data set `name` for these splits that data_dir lacks. If any cannot
    be fetched (no network), one DiffEncError lists all of them, each with its URL and the place
    to put it, so that one failed run tells the whole fix (training asks for both splits first)."""
    failed = []
    for url, path, names in data_files(name, data_dir, splits, labels):
        if not any(os.path.exists(os.path.join(data_dir, n)) for n in names):
            try:
                download(url, path)
            except OSError as e:
                failed.append((url, path, getattr(e, "reason", e)))
    if failed:
        places = "; ".join(f"{url} -> {os.path.abspath(path)}" for url, path, _ in failed)
        raise DiffEncError(f"cannot download {name} ({failed[0][2]}): download these "
                           f"{len(failed)} file(s) by hand and place them: {places}")


def md5(data):
    return hashlib.md5(data).hexdigest()


def read_idx(data_dir, name, want):
    """The decompressed bytes of MNIST's idx file `name` (or name.gz) in data_dir, md5-checked."""
    candidates = (os.path.join(data_dir, name), os.path.join(data_dir, name + ".gz"))
    path = next(p for p in candidates if os.path.exists(p))     # fetch_missing put one there
    try:
        raw = open(path, "rb").read()
        raw = gzip.decompress(raw) if path.endswith(".gz") else raw
    except (OSError, EOFError, zlib.error) as e:
        raise DiffEncError(f"{path} is not a readable gzip file ({e}); delete it and run again, "
                           f"or place the official file there") from None
    if md5(raw) != want:
        raise DiffEncError(f"{path} has md5 {md5(raw)} (decompressed), not the official {want}: a "
                           f"corrupt or truncated copy; delete it and run again, or place the "
                           f"official file there")
    return raw


def load_mnist(data_dir, split):
    raw = read_idx(data_dir, *MNIST_FILES[split])
    magic, n, h, w = struct.unpack(">IIII", raw[:16])  # idx3: big-endian header, then n*h*w bytes
    return torch.from_numpy(np.frombuffer(raw, np.uint8, n * h * w, 16).reshape(n, 1, h, w).copy())


def load_mnist_labels(data_dir, split):
    """MNIST's labels (N,) int64 of `split`, in the order of load_mnist's images."""
    fetch_missing("mnist", data_dir, (split,), labels=True)
    raw = read_idx(data_dir, *MNIST_LABEL_FILES[split])
    magic, n = struct.unpack(">II", raw[:8])           # idx1: magic 2049, n, then n label bytes
    return torch.from_numpy(np.frombuffer(raw, np.uint8, n, 8).astype(np.int64))


def load_cifar10(data_dir, split):
    path = os.path.join(data_dir, "cifar-10-python.tar.gz")     # fetch_missing put it there
    if md5(open(path, "rb").read()) != CIFAR10_MD5:
        raise DiffEncError(f"{path} does not have the official md5 {CIFAR10_MD5}: a corrupt or "
                           f"truncated download; delete it and run again, or place the official "
                           f"archive there")
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    with tarfile.open(path, "r:gz") as tar:
        # Python-2 pickles of {'data': uint8 (10000, 3072) as R, G, B planes of 32x32, 'labels'};
        # unpickling is safe here because the archive's md5 was checked above.
        files = [tar.extractfile(f"cifar-10-batches-py/{n}") for n in names]
        batches = [pickle.load(f, encoding="latin1")["data"] for f in files]
    return torch.from_numpy(np.concatenate(batches).reshape(-1, 3, 32, 32))


def synthetic(split, n=None):
    """Deterministic 16x16 gray images: a bright rectangle on a horizontal gradient, plus noise."""
    g = rng(0, 0 if split == "train" else 1)
    n = n or (2048 if split == "train" else 256)
    yy, xx = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    corners = torch.randint(0, 16, (n, 4), generator=g).sort(dim=1).values  # (n, 4), sorted, so
    # that pairing the 1st with the 3rd and the 2nd with the 4th gives y0 <= y1 and x0 <= x1
    y0, y1, x0, x1 = corners[:, 0], corners[:, 2], corners[:, 1], corners[:, 3]
    inside = lambda a, lo, hi: (a >= lo[:, None, None]) & (a <= hi[:, None, None])  # (n, 16, 16)
    box = inside(yy, y0, y1) & inside(xx, x0, x1)
    img = 40 + 8 * xx + 120 * box + torch.randint(0, 16, (n, 16, 16), generator=g)
    return img.clamp(0, 255).to(torch.uint8)[:, None]


DATASETS = {"cifar10": load_cifar10, "mnist": load_mnist,
            "synthetic": lambda data_dir, split: synthetic(split)}
IMAGE_SHAPES = {"cifar10": (3, 32, 32), "mnist": (1, 28, 28), "synthetic": (1, 16, 16)}


def load_dataset(name, data_dir, split):
    if name not in DATASETS:
        raise DiffEncError(f"unknown data set '{name}'; choose one of {', '.join(DATASETS)}")
    fetch_missing(name, data_dir, (split,))
    return DATASETS[name](data_dir, split)


def batch_indices(n, batch_size, step, seed):
    """Indices of the global batch for `step`: epoch e uses a permutation seeded by (seed, e); the
    last n mod batch_size images of each epoch are left out of that epoch (training only)."""
    epoch, k = divmod(step, n // batch_size)
    perm = torch.randperm(n, generator=rng(seed, epoch, RNG["order"]))
    return perm[k * batch_size:(k + 1) * batch_size]


def draw_noise(seed, step, n_total, image_shape, offset=0, n=None):
    """Training: t (n,), eps and eps_0 (n, C, H, W) for samples offset .. offset+n-1 of a batch of
    n_total: drawn for the whole batch so that every DDP world size sees the same numbers."""
    n = n_total if n is None else n
    g = rng(seed, step, RNG["train_noise"])
    t = low_discrepancy_times(torch.rand(1, generator=g), n_total, offset, n)
    eps = torch.randn((n_total, *image_shape), generator=g)[offset:offset + n]
    eps_0 = torch.randn((n_total, *image_shape), generator=g)[offset:offset + n]
    return t, eps, eps_0


GOLDEN = (math.sqrt(5) - 1) / 2  # frac(u + i * GOLDEN), i = 0..n-1, is evenly spread for every n


def eval_noise(seed, indices, image_shape, draw=0):
    """Evaluation: t (N,), eps and eps_0 (N, C, H, W) for the test images with these indices (N,),
    each a function of (seed, draw, image index) alone, so that every checkpoint and every batch
    size sees the same numbers and comparisons are paired. t_i = frac(u + i * GOLDEN) spreads t
    over [0, 1) as evenly as training's low-discrepancy t, for any prefix of the test set."""
    u = torch.rand(1, generator=rng(seed, draw, RNG["eval_noise"]), dtype=torch.float64)
    t = torch.remainder(u + indices.double() * GOLDEN, 1.0).to(torch.get_default_dtype())
    eps, eps_0 = indexed_normal(indices, image_shape, 2, seed, draw, RNG["eval_noise"])
    return t, eps, eps_0


def indexed_normal(indices, shape, n, *keys):
    """n tensors (N, *shape) of N(0, 1) noise, row j a function of (keys, indices[j]) alone."""
    gens = [rng(*keys[:-1], int(i), keys[-1]) for i in indices]
    return [torch.stack([torch.randn(shape, generator=g) for g in gens]) for _ in range(n)]


# -------------------------------------------------------------------------------------------------
# 11. Training
#
# AdamW (lr 2e-4, betas (0.9, 0.99), eps 1e-8, weight decay 0.01 except on biases), 100-step
# linear warm-up then constant, no clipping, EMA 0.9999 of the weights for evaluation and
# sampling [code: config_opt_adamw_0002_no_clip.json, model_handling.py]; a cosine decay after
# the warm-up is our option (--lr-decay, lr_at). The encoder, score network and schedule are one
# module trained jointly on the bpd.
# Reproducibility: data order, t, eps and dropout masks are functions of (seed, step), so a run
# resumed from a checkpoint repeats the uninterrupted run bit for bit (on the same machine).
# Robustness: checkpoints carry a digest of their content and are written to a temporary file,
# fsynced and renamed (a kill at any instant leaves the last good one); log.csv is cut back to the
# checkpoint's step on resume; a lock keeps a second run out of the folder; Ctrl-C and SIGTERM
# finish the step, save and exit; a non-finite loss stops before it can touch the weights. Data
# parallel via torchrun: rank r takes its slice of the global batch and of the global noise; DDP
# averages the gradients.
# -------------------------------------------------------------------------------------------------

CKPT_FORMAT = 2  # bump when the checkpoint layout changes (2: content digest, log window)
MAX_SKIPPED = 10  # --skip-nonfinite gives up after this many non-finite losses in a row


def atomic_write(path, write):
    """Call write(f) on a temporary file beside path, fsync, and rename it over path: readers see
    the old file or the new one, never a part. On failure the temporary file is removed."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def content_digest(obj, h=None):
    """sha256 of a checkpoint's content: every tensor's dtype, shape and bytes and every other
    value's repr, walked in a fixed order. torch.load does not check the zip's CRCs, so without
    it a flipped byte in a weight would load silently."""
    h = hashlib.sha256() if h is None else h
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, dict):
        for k in sorted(obj, key=repr):
            h.update(repr(k).encode())
            content_digest(obj[k], h)
    elif isinstance(obj, (list, tuple)):
        h.update(f"{type(obj).__name__}{len(obj)}".encode())
        for v in obj:
            content_digest(v, h)
    else:
        h.update(repr(obj).encode())
    return h.hexdigest()


def checkpoint_state(cfg, model, ema, opt, step, best_bpd=math.inf, window=None, n_window=0):
    """What a checkpoint holds: the config, the raw and EMA weights, the optimiser, the step, the
    best test bpd, and the log window (the sum of the reports since the last row, their count)."""
    window = torch.zeros(3, dtype=torch.float64) if window is None else window
    return dict(format=CKPT_FORMAT, config=dataclasses.asdict(cfg),
                image_shape=list(model.image_shape), step=step, model=model.state_dict(),
                ema=ema.state_dict(), opt=opt.state_dict() if opt is not None else {},
                best_bpd=best_bpd, window=window, n_window=n_window)


def save_checkpoint(state, path):
    """Write a checkpoint, with its content digest, atomically. If the write fails (disk full, file
    too large; torch.save raises RuntimeError for some of these) say so, keep the old file there and
    return False."""
    try:
        atomic_write(path, lambda f: torch.save({**state, "sha256": content_digest(state)}, f))
        return True
    except (OSError, RuntimeError) as e:
        reason = str(getattr(e, "strerror", None) or e).splitlines()[0]
        print(f"diffenc: could not write {path} ({reason}); the previous file there is intact",
              file=sys.stderr)
        return False


def load_checkpoint(path):
    """A checkpoint written by save_checkpoint, its digest verified, or a one-line DiffEncError."""
    if not os.path.isfile(path):
        raise DiffEncError(f"no checkpoint at {path}; check the path (train with --train first)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file fails in many ways inside torch.load
        raise DiffEncError(f"{path} is not a readable checkpoint ({type(e).__name__}: truncated or "
                           f"corrupt); use another checkpoint of the run (e.g. best.pt)") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise DiffEncError(f"{path} is not a diffenc checkpoint of format {CKPT_FORMAT}; pass a "
                           f"latest.pt or best.pt written by this diffenc.py")
    digest = ckpt.pop("sha256", None)
    if digest != content_digest(ckpt):
        raise DiffEncError(f"{path} is corrupt: its content does not match the digest saved with "
                           f"it; use another checkpoint of the run (e.g. best.pt)")
    ckpt["sha256"] = digest  # what the checkpoint is, for results saved from it (sigma_p_estimate)
    try:  # the settings it holds obey the same rules as flags (a digest proves no more than intact)
        validate(Config(**ckpt["config"]))
    except (TypeError, DiffEncError) as e:
        raise DiffEncError(f"{path} holds settings this diffenc.py refuses ({e}); use a checkpoint "
                           f"written by this diffenc.py") from None
    return ckpt


def check_compatible(saved, cfg, path):
    """A checkpoint can only continue a run whose network and likelihood are the same."""
    for name in MODEL_FIELDS:
        value = saved.get(name, getattr(Config, name))  # a field newer than the checkpoint: default
        if value != getattr(cfg, name):
            flag = name.replace("_", "-")
            raise DiffEncError(f"{path} was trained with --{flag} {value}, but this run "
                               f"has --{flag} {getattr(cfg, name)}; use the same value or a new "
                               f"--out")


# Settings that only say where and how often to write: a resume may change them without a word.
BOOKKEEPING_FIELDS = ("out", "resume", "data_dir", "log_every", "eval_every", "eval_images",
                      "save_every")


def report_changed_settings(saved, cfg):
    """--resume with settings that differ from the checkpoint's run (the model's own are refused
    by check_compatible): one line naming each, old and new, and which value the run uses (the
    new one: the flags given now, or their defaults)."""
    changed = [f"--{f.name.replace('_', '-')} {getattr(cfg, f.name)} (was {saved[f.name]})"
               for f in dataclasses.fields(cfg)
               if f.name not in MODEL_FIELDS + BOOKKEEPING_FIELDS and f.name in saved
               and saved[f.name] != getattr(cfg, f.name)]
    if changed:
        print(f"diffenc: --resume with settings other than the checkpoint's; this run uses "
              f"{', '.join(changed)}", flush=True)


def model_from_checkpoint(ckpt, device, weights="ema", T=None, increment=None):
    """Rebuild the model saved in a checkpoint, with its EMA (default) or raw weights, in eval mode.
    T: evaluate its T-step loss instead of the loss it was trained with (any T >= 0); increment:
    its T-step model of the encoder's increment (section 4), if not the one it was saved with."""
    cfg = Config(**ckpt["config"])
    cfg = dataclasses.replace(cfg, T=cfg.T if T is None else T,
                              increment=increment or cfg.increment)
    model = DiffEnc(cfg, ckpt["image_shape"])
    model.load_state_dict(ckpt[weights])
    return model.to(device).eval().requires_grad_(False)


def make_optimizer(model, cfg, device):
    """AdamW with decoupled weight decay on everything but biases (as the official code) and the
    noise schedule (deviation: decaying gamma's endpoints would pull gamma_min = -13.3 toward 0)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name.endswith("bias") or name.startswith("schedule.") else decay).append(p)
    groups = [dict(params=decay, weight_decay=cfg.weight_decay),
              dict(params=no_decay, weight_decay=0.0)]
    # betas (0.9, 0.99), eps 1e-8: the official optimiser config; fused kernels on CUDA.
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.99), eps=1e-8,
                             fused=device.type == "cuda")


def check_optimizer_state(saved, opt, path):
    """The optimiser's state is saved by parameter position, not name (torch's format): a
    checkpoint whose moments do not fit this model's parameters, position by position, came from
    a diffenc.py that built its layers in another order, and loading it would fail deep inside
    the first step (or, between equal shapes, mix up the moments). Refuse it in one line."""
    params = [p for group in opt.param_groups for p in group["params"]]
    for i, state in saved["state"].items():
        if i >= len(params) or state["exp_avg"].shape != params[i].shape:
            raise DiffEncError(f"{path} holds optimiser moments that do not fit this model's "
                               f"parameters (written by a diffenc.py that built its layers in "
                               f"another order); continue it with the diffenc.py that wrote "
                               f"it, or start a new --out")


@torch.no_grad()
def update_ema(ema, model, decay):
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)


def ema_decay(cfg, step):
    """cfg.ema, warmed up as (1 + step)/(10 + step) so that short runs evaluate trained weights
    (deviation: the official code uses 0.9999 from step 0; the two agree after ~10^5 steps)."""
    return min(cfg.ema, (1 + step) / (10 + step))


def pick_device():
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def setup_distributed():
    """(rank, world size, device). torchrun sets WORLD_SIZE; NCCL on GPUs, gloo on CPUs."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    device = pick_device()
    if world > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (dist.get_rank() if world > 1 else 0), world, device


def settle_speed(cfg, device):
    """The switches that are safe on every device: TF32 matmuls/convs on CUDA. Others are flags."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if (cfg.amp or cfg.compile) and device.type != "cuda":
        print("diffenc: note: --amp/--compile are meant for CUDA; on this device they may be "
              "slower", file=sys.stderr)


def compile_model(model, batch_size, device):
    """--compile: torch.compile the score network (in place: state_dict keys stay the same); on
    CUDA, with --encoder learned and the continuous-time loss, also replay the encoder's two calls
    of a training step (encoder_jvp at t, the plain call at the nearer end) as CUDA graphs,
    forward and backward. torch.compile cannot trace torch.func.jvp through GroupNorm, and eagerly
    the jvp is launch-bound: thousands of small kernels a step (README, Performance). The graphs
    serve training batches of batch_size images (every batch: batch_indices drops the partial
    one); in eval mode the encoder runs eagerly. The maths is the same, not the bits: cuDNN may
    pick other algorithms inside a graph (test_cuda_graphs_give_the_eager_loss_and_gradients).
    Copy the model (its EMA) before this call: a copy made after it would replay these graphs."""
    model.score.compile()
    if device.type != "cuda" or model.enc is None or model.cfg.T:
        return
    x = torch.zeros(batch_size, *model.image_shape, device=device)          # (B, C, H, W)
    learned = model.cfg.schedule != "fixed"  # then gamma carries a gradient to the schedule
    gamma = torch.zeros(batch_size, device=device, requires_grad=learned)    # (B,)
    holder = nn.Module()  # make_graphed_callables finds the weights to differentiate in a module
    holder.enc, holder.forward = model.enc, lambda x, gamma: encoder_jvp(model.enc, x, gamma)
    jvp = torch.cuda.make_graphed_callables(holder, (x, gamma))  # first: it calls model.enc,
    torch.cuda.make_graphed_callables(model.enc, (x, gamma))     # whose forward this replaces
    model.graphed_jvp = lambda enc, x, gamma: jvp(x, gamma)


def prepare_out(cfg):
    """Create --out (but not for a --resume of a folder without a checkpoint), lock it against a
    second run, prove it writable, and never let a fresh run overwrite an old run's checkpoint.
    Returns the lock, which the run holds until it ends. The lock comes first: two runs started
    in the same instant must not trip over each other's write test (the loser is told the folder
    is in use, not that it is unwritable), and the test file's name is this process's own."""
    latest = os.path.join(cfg.out, "latest.pt")
    if cfg.resume and not os.path.exists(latest):
        raise DiffEncError(f"--resume: no checkpoint at {latest}; drop --resume to start a new run")
    lock = None
    try:
        os.makedirs(cfg.out, exist_ok=True)
        lock = lock_run_folder(cfg.out)
        probe = os.path.join(cfg.out, f".write-test-{os.getpid()}")
        atomic_write(probe, lambda f: f.write(b"ok"))
        os.remove(probe)
    except OSError as e:
        if lock is not None:
            lock.close()
        raise DiffEncError(f"cannot write to --out {cfg.out} ({e.strerror or e}); choose a "
                           f"writable folder") from None
    if os.path.exists(latest) and not cfg.resume:
        lock.close()
        raise DiffEncError(f"{cfg.out} already holds a run ({latest}); add --resume to continue "
                           f"it, or choose another --out")
    return lock


def lock_run_folder(out):
    """An exclusive lock on out/run.lock, held while this process lives. The kernel drops it when
    the process ends, however it ends, so a killed run's lock never blocks a resume. The file
    holds the owner's process id, which a refused second run names. (POSIX; no lock on Windows.)"""
    path = os.path.join(out, "run.lock")
    if os.path.isdir(path):
        raise DiffEncError(f"{path} is a folder, not the run's lock file; move it out of --out and "
                           f"run again")
    f = open(path, "a+")
    if fcntl is None:
        return f
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        owner = f.read().strip() or "unknown"
        f.close()
        raise DiffEncError(f"{out} is in use by another training run (process {owner}); wait "
                           f"for it to end, or choose another --out") from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f


# What a training step reports, per model: log.csv's columns between bpd and lr, and the size of
# the report that train_step returns (--model em adds the encoder's loss and the E-step's Delta U).
LOG_COLUMNS = dict(diffenc=("diffusion", "latent", "recon"),
                   em=("diffusion", "latent", "recon", "enc_nll", "delta_U"),
                   gaussian=("diffusion", "latent", "recon", "rate"))


def log_kind(cfg):
    """The key of cfg's run in LOG_COLUMNS: the model, or gaussian for the em baseline."""
    return "gaussian" if cfg.model == "em" and cfg.latent_encoder == "gaussian" else cfg.model


def log_columns(kind):
    """log.csv's columns for a LOG_COLUMNS key."""
    return ("step", "bpd") + LOG_COLUMNS[kind] + ("lr",)


def read_log(path, n_fields):
    """The rows of a log.csv as (line, values): n_fields numbers, an integer step first. Any
    other line is dropped: a row that a kill cut short, and garbage (bytes that are not text, a
    step that is not a number). A path that is not a file is a DiffEncError."""
    if not os.path.exists(path):
        return []
    if not os.path.isfile(path):
        raise DiffEncError(f"{path} is not a file; move it out of the run folder and run again "
                           f"(the training curves start afresh)")
    rows = []
    for line in open(path, "rb").read().decode("utf-8", "replace").splitlines()[1:]:
        try:
            row = [float(v) for v in line.split(",")]
        except ValueError:
            continue
        if len(row) == n_fields and math.isfinite(row[0]) and row[0] == int(row[0]) >= 0:
            rows.append((line, row))
    return rows


def open_log(path, step, header):
    """log.csv cut back to the complete rows of steps <= step, opened for appending: rows that a
    killed run wrote after its last checkpoint are written again after the resume, once."""
    keep = [line for line, row in read_log(path, header.count(",") + 1) if row[0] <= step]
    atomic_write(path, lambda f: f.write("".join(r + "\n" for r in [header] + keep).encode()))
    return open(path, "a")


def lr_at(cfg, step):
    """The learning rate of step `step` (from 0): --lr times a linear warm-up over --warmup
    steps, times, with --lr-decay cosine, (1 + cos(pi step / steps)) / 2 [Loshchilov & Hutter 2017,
    SGDR, one cycle without restarts]: a half cosine from 1 at step 0 to nearly 0 at the last
    step, so the run ends on small steps around the weights it has found instead of at --lr."""
    lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup)
    if cfg.lr_decay == "cosine":
        lr *= 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
    return lr


def train_step(net, model, ema, opt, cfg, step, batch, world):
    """One step of AdamW on the bpd of batch = (x (B, C, H, W) uint8, t (B,), eps, eps_0 (B, C,
    H, W)); for --model em, one EM iteration (em_losses) with the E-step's noise drawn from
    (seed, step). Returns the global-batch mean report in bpd (diffusion, latent, recon, and for
    em also its two columns of LOG_COLUMNS); the weights are left untouched when it is not
    finite."""
    for group in opt.param_groups:
        group["lr"] = lr_at(cfg, step)
    opt.zero_grad(set_to_none=True)  # before the losses: --langevin-shared's backward runs inside
    if cfg.model == "em":
        losses = gaussian_losses if cfg.latent_encoder == "gaussian" else em_losses
        decoder_loss, encoder_loss, report = losses(model, *batch,
                                                    rng(cfg.seed, step, RNG["e_step"]),
                                                    beta_step(cfg, step))
        loss = decoder_loss + encoder_loss
    else:
        diff, latent, recon = net(*batch)                            # (B,) each, nats
        if cfg.weight_bias != math.inf:  # --weight-bias: not the ELBO (loss_weight)
            with torch.no_grad():  # the weight carries no gradient (loss_weight)
                w = loss_weight(model.schedule(batch[1]), cfg.weight_bias)  # (B,)
            diff = w * diff
        terms = batch_bpd((diff, latent, recon), model.image_shape)   # (3,): diff, latent, recon
        loss, report = terms.sum(), terms
    report = report.detach().clone()
    if world > 1:
        dist.all_reduce(report)
        report /= world
    if not torch.isfinite(report).all():
        return report.cpu()
    loss.backward()
    if cfg.clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
    opt.step()
    update_ema(ema, model, ema_decay(cfg, step))
    return report.cpu()


def train(cfg):
    """Train on cfg.dataset until cfg.steps, resuming from cfg.out/latest.pt with cfg.resume.
    Stops at the last step, after cfg.minutes (saved and evaluated as a last step), on
    SIGINT/SIGTERM (after saving) or on a non-finite loss."""
    validate(cfg)
    rank, world, device = setup_distributed()
    settle_speed(cfg, device)
    if cfg.batch_size % world:
        raise DiffEncError(f"--batch-size {cfg.batch_size} is not divisible by the {world} "
                           f"processes; pick a multiple of {world}")
    if cfg.model == "em" and world > 1:
        raise DiffEncError("--model em trains in one process (its E-step is not data-parallel); "
                           "run it without torchrun")
    fetch_missing(cfg.dataset, cfg.data_dir, ("train", "test"))  # one message names every file
    data = load_dataset(cfg.dataset, cfg.data_dir, "train")                   # (N, C, H, W) uint8
    test = load_dataset(cfg.dataset, cfg.data_dir, "test")
    if len(data) < cfg.batch_size:
        raise DiffEncError(f"--batch-size {cfg.batch_size} exceeds the {len(data)} training "
                           f"images; lower it")
    # Initial weights. A network that cannot be built fails here, before --out is touched.
    torch.manual_seed(cfg.seed)
    model = DiffEnc(cfg, data.shape[1:]).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = make_optimizer(model, cfg, device)
    latest, best_path = os.path.join(cfg.out, "latest.pt"), os.path.join(cfg.out, "best.pt")
    step, best = 0, math.inf
    saved = None                          # the step that latest.pt holds (None: none written yet)
    n_report = len(LOG_COLUMNS[log_kind(cfg)])
    window, n_window = torch.zeros(n_report, dtype=torch.float64), 0  # since the last log row
    lock = log = None
    previous = {}                         # the signal handlers to restore
    try:
        lock = prepare_out(cfg) if rank == 0 else None
        if cfg.resume:
            ckpt = load_checkpoint(latest)
            check_compatible(ckpt["config"], cfg, latest)
            if rank == 0:
                report_changed_settings(ckpt["config"], cfg)
            model.load_state_dict(ckpt["model"])
            ema.load_state_dict(ckpt["ema"])
            check_optimizer_state(ckpt["opt"], opt, latest)
            opt.load_state_dict(ckpt["opt"])
            for group, decay in zip(opt.param_groups, (cfg.weight_decay, 0.0)):
                group["weight_decay"] = decay  # this run's value, not the one the state restored
            step, best, saved = ckpt["step"], ckpt["best_bpd"], ckpt["step"]
            window, n_window = ckpt["window"], ckpt["n_window"]
        if cfg.compile:
            compile_model(model, cfg.batch_size // world, device)
        net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
        state = lambda: checkpoint_state(cfg, model, ema, opt, step, best, window, n_window)
        holds = lambda: (f"{latest} holds step {saved}" if saved is not None
                         else "no checkpoint was written yet")
        stop = []  # the signal that asked us to stop, if any

        def on_signal(signum, frame):
            stop.append(signum)
            signal.signal(signum, signal.SIG_DFL)  # a second Ctrl-C kills at once
        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        log_path = os.path.join(cfg.out, "log.csv")
        log = open_log(log_path, step, ",".join(log_columns(log_kind(cfg)))) if rank == 0 else None
        B, t0, start_step, skipped = cfg.batch_size // world, time.time(), step, 0
        if rank == 0:
            n_params = sum(p.numel() for p in model.parameters())
            em = (f"model=em (d={cfg.latent_dim}, " + ("gaussian encoder), " if log_kind(cfg)
                  == "gaussian" else f"K={cfg.langevin_steps}), ")) * (cfg.model == "em")
            print(f"diffenc: {cfg.dataset} {tuple(model.image_shape)}, {em}encoder={cfg.encoder}, "
                  f"param={cfg.param}, schedule={cfg.schedule}, {n_params:,} parameters, "
                  f"device={device}, world={world}, from step {step} to {cfg.steps}", flush=True)
        while step < cfg.steps:
            # This rank's slice of the global batch and of the global noise; dropout masks are
            # seeded by (seed, step, rank): everything is a function of the step (exact resume).
            mine = slice(rank * B, (rank + 1) * B)
            x = data[batch_indices(len(data), cfg.batch_size, step, cfg.seed)][mine]  # (B, C, H, W)
            noise = draw_noise(cfg.seed, step, cfg.batch_size, model.image_shape, rank * B, B)
            t, eps, eps_0 = (a.to(device) for a in noise)       # (B,), (B, C, H, W), (B, C, H, W)
            torch.manual_seed(int(rng(cfg.seed, step, rank, RNG["dropout"]).initial_seed()))
            report = train_step(net, model, ema, opt, cfg, step, (x.to(device), t, eps, eps_0),
                                world)
            # an unstable E-step (Langevin's step too large) makes the em report non-finite too
            lower = "--lr or --langevin-eta" if cfg.model == "em" else "--lr"
            if torch.isfinite(report).all():                   # report: (n_report,)
                window, n_window, skipped = window + report.double(), n_window + 1, 0
            elif not cfg.skip_nonfinite:
                then = ", then --resume" if saved is not None else ", then run again"
                raise SystemExit(f"diffenc: non-finite loss ({report.sum().item()}) at step "
                                 f"{step + 1}; the weights were not changed and {holds()}. Lower "
                                 f"{lower}, set --clip 1, or add --skip-nonfinite{then}")
            else:
                skipped += 1
                print(f"diffenc: non-finite loss at step {step + 1}; batch skipped "
                      f"(--skip-nonfinite)", file=sys.stderr)
                if skipped == MAX_SKIPPED:
                    raise SystemExit(f"diffenc: {skipped} non-finite losses in a row up to step "
                                     f"{step + 1}: the run does not recover; {holds()}. Lower "
                                     f"{lower} or set --clip 1")
            step += 1
            # --minutes: rank 0's clock decides (broadcast), so that every rank stops together
            out_of_time = cfg.minutes > 0 and time.time() - t0 >= 60 * cfg.minutes
            if world > 1:  # every rank stops at the same step when any got a signal
                flag = torch.tensor([float(bool(stop)), float(out_of_time)], device=device)
                dist.broadcast(flag[1:], 0)
                dist.all_reduce(flag[:1])
                stop += [signal.SIGTERM] if flag[0].item() and not stop else []
                out_of_time = bool(flag[1].item())
            end = step == cfg.steps or out_of_time       # the last step of this invocation
            if step % cfg.log_every == 0 or end:
                if rank == 0 and n_window:  # the mean over the window's finite steps
                    rate = (step - start_step) / (time.time() - t0)
                    write_log_row(log, step, cfg.steps, window / n_window,
                                  opt.param_groups[0]["lr"], rate)
                window, n_window = torch.zeros(n_report, dtype=torch.float64), 0
            if rank == 0 and (step % cfg.eval_every == 0 or end):
                bpd = test_bound(ema, test, cfg)
                print(f"step {step} | test bpd {bpd.mean():.4f} (EMA, "
                      f"{cfg.eval_images or len(test)} images)", flush=True)
                if bpd.mean() < best:
                    best = bpd.mean().item()
                    save_checkpoint(state(), best_path)
            last = end or bool(stop)
            if rank == 0 and (step % cfg.save_every == 0 or last):
                if save_checkpoint(state(), latest):
                    saved = step
                elif last:
                    then = "; continue from there with --resume" if saved is not None else ""
                    raise SystemExit(f"diffenc: the final checkpoint of step {step} could not be "
                                     f"written; {holds()}{then}")
            if world > 1 and last:  # the others wait while rank 0 evaluates and saves: a rank
                dist.barrier()      # that tore gloo down while another still ran aborted (SIGABRT)
            if stop:
                if rank == 0:
                    print(f"diffenc: stopped by {signal.Signals(stop[0]).name} after step {step}; "
                          f"{holds()}. Continue with the same command plus --resume",
                          file=sys.stderr)
                raise SystemExit(128 + stop[0])
            if out_of_time:
                if rank == 0:
                    print(f"diffenc: --minutes {cfg.minutes:g} reached after step {step} "
                          f"({(time.time() - t0) / (step - start_step):.4f} s/step); {holds()}",
                          flush=True)
                break
        return model, ema
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for f in (log, lock):
            if f is not None:
                f.close()
        if world > 1:
            dist.destroy_process_group()


def write_log_row(log, step, steps, means, lr, rate):
    """One row of log.csv (full precision) and the progress line; means: the report's window
    mean, (diffusion, latent, recon) bpd and for --model em (encoder nll, Delta U) in nats, or
    for its Gaussian-encoder baseline the rate in nats."""
    d, l, r, *em = means.tolist()
    log.write(",".join(map(repr, [step, d + l + r, d, l, r, *em, lr])) + "\n")
    log.flush()
    em = (f" | enc {em[0]:.3f} nats/dim | E-step dU {em[1]:+.2f} nats" if len(em) == 2 else
          f" | rate {em[0]:.2f} nats" if em else "")
    print(f"step {step}/{steps} | bpd {d + l + r:.4f} (diff {d:.4f} latent {l:.5f} recon "
          f"{r:.5f}){em} | lr {lr:.1e} | {rate:.2f} it/s | "
          f"ETA {format_seconds((steps - step) / rate)}", flush=True)


def format_seconds(s):
    s = int(s) if math.isfinite(s) else 0
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


SHOW_PROGRESS = False  # main() turns it on for the modes that are not --train or --bench


def progress(what, done, total, t0, unit):
    """The progress of a long phase (evaluation, sampling, the sigma_P* estimate, tuning) on
    stdout: on a terminal one line that updates in place (done / total, rate, ETA), so that a long
    wait is never mistaken for a hang; in a log or a pipe only the final line. Training has its
    own progress line (write_log_row), so this is off unless SHOW_PROGRESS."""
    if not SHOW_PROGRESS:
        return
    tty, elapsed = sys.stdout.isatty(), max(time.time() - t0, 1e-9)
    if done >= total:
        start = "\r" if tty else ""
        print(f"{start}  {what}: {total} {unit} in {format_seconds(elapsed)} "
              f"({total / elapsed:.1f} {unit}/s)" + " " * 12, flush=True)
    elif tty:
        eta = (total - done) * elapsed / done if done else math.inf
        print(f"\r  {what}: {done}/{total} {unit} | {done / elapsed:.1f} {unit}/s | ETA "
              f"{format_seconds(eta)}   ", end="", flush=True)


# -------------------------------------------------------------------------------------------------
# 12. Evaluation, sampling and figures
#
# Test BPD is the training estimator (one t, one eps, one eps_0 per image; several on request),
# except that both boundary terms are computed exactly, with EMA weights and dropout off, over the
# *whole* test set (the official evaluator drops the last partial batch). The standard error is
# over images. `t_fixed` fixes t for every image, which evaluates the diffusion-loss integrand at
# that t (the paper's per-t comparison of VDM and DiffEnc). Then the finite-depth reports, the
# sampler's grids and the figures of the encoder.
# -------------------------------------------------------------------------------------------------

def per_image(model, data, batch_size, n_images, samples, columns):
    """The first n_images (0: all) of data in batches: columns(idx (b,), x (b, C, H, W) uint8,
    draw k) -> (b, m) nats per image, averaged over the draws k < samples, in bpd: (N, m) float64.
    """
    p = next(model.parameters())
    N = min(n_images or len(data), len(data))
    rows, t0 = [], time.time()
    for b0 in range(0, N, batch_size):
        idx = torch.arange(b0, min(b0 + batch_size, N))                 # (b,) test-set indices
        x = data[idx].to(p.device)                                      # (b, C, H, W) uint8
        rows.append(sum(columns(idx, x, k).double().cpu() for k in range(samples)) / samples)
        progress("evaluated", int(idx[-1]) + 1, N, t0, "images")
    return bits_per_dim([torch.cat(rows)], model.image_shape)


def eval_draw(model, idx, seed, k):
    """Draw k of evaluation's t (b,), eps and eps_0 (b, C, H, W) for the images idx, on the model's
    device and in its dtype."""
    p = next(model.parameters())
    return (a.to(p.device, p.dtype) for a in eval_noise(seed, idx, model.image_shape, k))


@torch.no_grad()
def evaluate(model, data, batch_size, seed, n_images=0, samples=1, t_fixed=None, var_ratio=None):
    """Per-image (diffusion, latent, recon) in bpd, averaged over `samples` draws: (N, 3) float64.
    var_ratio (T,): for the T-step loss, sigma_P^2 / sigma_Q^2 of each step instead of 1; the step
    KL is then d/2 (w - 1 - log w) + w KL_i with w = 1 / ratio (section 4, weighted_step_kl)."""
    def columns(idx, x, k):
        t, eps, eps_0 = eval_draw(model, idx, seed, k)                  # (b,), 2 x (b, C, H, W)
        t = torch.full_like(t, t_fixed) if t_fixed is not None else t
        diff, latent, recon = model(x, t, eps, eps_0)                   # (b,) each, nats
        if var_ratio is not None:
            T = model.cfg.T
            w = 1 / var_ratio.to(diff)[discrete_step(t, T).long() - 1]  # (b,)
            diff = T * weighted_step_kl(diff / T, w, math.prod(model.image_shape))
        return torch.stack([diff, latent, recon], 1)
    return per_image(model, data, batch_size, n_images, samples, columns)


@torch.no_grad()
def evaluate_em(model, data, batch_size, seed, n_images=0, samples=1, S=None, probe=False):
    """--model em's bound per image, averaged over `samples` draws, (N, 6) float64 bpd: D in its
    three terms (diffusion, latent, recon), R, D_prior and D_other. D + R is the bound of section
    8 with z from the encoder's deterministic S-step sampler (its exact log q: latent_log_q);
    D_prior is the decoder's -ELBO with z ~ N(0, I) instead (the bound of q = p(z): R = 0), so
    D_prior - D is what the latent is worth to the decoder against the prior; D_other, with the
    latent the encoder gave the batch's previous image (z rolled by one: another image's z in a
    batch of 2 or more), so D_other - D is what it is worth because it is *this* image's. A
    latent that is the same for every image (q narrow around one point) has D_other = D, however
    large D_prior - D and R are. All use evaluate's (t, eps, eps_0) per image, so they pair with
    each other and with any other checkpoint's test bpd.
    probe (the diffusion encoder): two more columns, D and D_other of z_K, the training E-step's
    refinement of z (its K, eta, beta, lambda; seeded by the batch's first index): is the image
    in the chain's latents, and lost by the encoder that fits them, or not in them at all?"""
    p, S, d = next(model.parameters()), S or model.cfg.latent_steps, model.cfg.latent_dim

    def columns(idx, x_int, k):
        t, eps, eps_0 = eval_draw(model, idx, seed, k)                  # (b,), 2 x (b, C, H, W)
        z_1, z_prior = (a.to(p.device, p.dtype)                         # (b, d) each
                        for a in indexed_normal(idx, (d,), 2, seed, k, RNG["latent_eval"]))
        z, log_q = encode_log_q(model, scale_pixels(x_int, p.dtype), z_1, S)  # (b, d), (b,)
        terms = model(x_int, t, eps, eps_0, cond=z)                      # D's terms, (b,) each
        _, rate = distortion_rate(sum(terms), log_q, z)
        # D_prior: only the diffusion term sees z; the boundary terms (and the encoder's pass
        # at t = 0 and 1) are D's
        x = scale_pixels(x_int, eps.dtype)
        if len(z) < 2:
            raise DiffEncError("D_other pairs each image with another of its batch, and a batch "
                               "holds one image; change --eval-images or --batch-size")
        dec = lambda c: sum((decoder_nll(model, x, t, eps)(c), *terms[1:]))  # (b,) nats
        cols = [*terms, rate, dec(z_prior), dec(z.roll(1, 0))]
        if probe:
            g = rng(seed, int(idx[0]), k, RNG["e_step"])
            normal = lambda *shape: torch.randn(shape, generator=g, dtype=p.dtype).to(p.device)
            times = lambda: low_discrepancy_times(torch.rand(1, generator=g), len(z)).to(t)
            with torch.enable_grad():
                z_K, _ = em_e_step(model, x, z, model.latent_enc.denoiser(x), times, normal)
            cols += [dec(z_K), dec(z_K.roll(1, 0))]
        return torch.stack(cols, 1)
    return per_image(model, data, batch_size, n_images, samples, columns)


def test_bound(model, data, cfg):
    """The test bpd that training prints and keeps best.pt by, (N,): the ELBO, or D + R for em."""
    if cfg.model == "em":
        return evaluate_em(model, data, cfg.batch_size, cfg.seed, cfg.eval_images)[:, :4].sum(1)
    return evaluate(model, data, cfg.batch_size, cfg.seed, cfg.eval_images).sum(1)


PER_T = np.linspace(0, 1, 11)  # t in {0, 0.1, ..., 1} [code: evaluator.py, --per-t-step=0.1]


def std_err(a):
    """The standard error of the mean of a (N,) tensor of per-image values."""
    return (a.std() / math.sqrt(len(a))).item() if len(a) > 1 else float("nan")


def write_csv(path, header, rows):
    """A CSV file: the header line, then one line per row of already formatted fields."""
    text = header + "\n" + "".join(",".join(row) + "\n" for row in rows)
    atomic_write(path, lambda f: f.write(text.encode()))


def run_eval(ckpt_paths, args):
    """Test bpd of each checkpoint; with args.per_t also the diffusion-loss integrand at every t in
    PER_T, written as a CSV and a plot beside the first checkpoint. Every checkpoint sees the same
    images, t and eps (eval_noise is a function of the seed and the image index), so differences
    between two checkpoints are paired and their standard error is that of the per-image
    differences."""
    se, curves, totals, em_rows = std_err, [], [], []
    if args.sample_steps and all(load_checkpoint(p)["config"]["model"] != "em"
                                 for p in ckpt_paths):
        raise DiffEncError("--sample-steps sets the decoder's steps for the reconstructions of "
                           "--model em checkpoints, and none is given; drop --sample-steps")
    for path in ckpt_paths:
        ckpt = load_checkpoint(path)
        cfg = Config(**ckpt["config"])
        data = load_dataset(cfg.dataset, args.data_dir or cfg.data_dir, "test")
        if cfg.model == "em" and (args.T or args.per_t or args.sigma_p == "optimal"):
            raise DiffEncError(f"{path} is a --model em checkpoint, evaluated by its bound D + R "
                               f"in continuous time; drop --T, --per-t and --sigma-p")
        refuse_latent_steps(cfg, path, args)
        T = cfg.T if args.T is None else args.T
        increment = checkpoint_increment(cfg, path, args, T)
        model = model_from_checkpoint(ckpt, pick_device(), T=T, increment=increment)
        batch_size, seed = args.batch_size or cfg.batch_size, args.seed or 0
        run = lambda t=None, ratio=None: evaluate(model, data, batch_size, seed,
                                                  args.eval_images or 0, args.eval_samples, t,
                                                  ratio)
        if cfg.model == "em":
            bpd = evaluate_em(model, data, batch_size, seed, args.eval_images or 0,
                              args.eval_samples, args.latent_steps,
                              probe=log_kind(cfg) == "em")                       # (N, 6 or 8)
            total = report_em_bound(path, ckpt, bpd, args)
            S = (args.latent_steps or cfg.latent_steps) if log_kind(cfg) == "em" else None
            T_dec = args.sample_steps or cfg.sample_steps
            idx = torch.arange(len(bpd))                    # the images the bound was taken on
            recon = reconstruct(model, data[idx], idx, S, T_dec, seed, batch_size)
            ratio, agree = report_coherence(data[idx], recon, idx, args.data_dir or cfg.data_dir,
                                            seed, S, T_dec, cfg.dataset == "mnist")
            plot_em_log(path, log_kind(cfg))
            em_rows.append((path, cfg, ckpt["step"], bpd, ratio, agree))
        else:
            bpd = run()                                                          # (N, 3)
            total = bpd.sum(1)                                                   # (N,)
            inc = f" with the {model.increment} increment" if model.increment else ""
            loss = f"{model.cfg.T}-step{inc}" if model.cfg.T else "continuous-time"
            print(f"{path}: test bpd {total.mean():.4f} ± {se(total):.4f} (standard error over "
                  f"{len(total)} images of the {cfg.dataset} test split; {loss} ELBO, EMA "
                  f"weights, step {ckpt['step']}, {args.eval_samples} (t, eps) per image)")
            for name, col in zip(("diffusion", "latent", "recon"), bpd.T):
                print(f"  {name:9s} {col.mean():.5f} ± {se(col):.5f}")
        totals.append(total)
        if len(totals) > 1 and len(total) == len(totals[0]):
            d = total - totals[0]
            print(f"  minus {ckpt_paths[0]}: {d.mean():+.4f} ± {se(d):.4f} bpd (paired: same "
                  f"images, t and eps)")
        if args.sigma_p == "optimal":
            report_optimal_variances(model, bpd, run, path, args, ckpt)
        if args.per_t:  # the integrand at fixed t; the diffusion term is its integral over t
            curves.append(torch.stack([run(float(t))[:, 0] for t in PER_T], 1))   # (N, 11) bpd
    if len(em_rows) > 1:
        report_rate_distortion(em_rows)
    if not curves:
        return bpd
    if len({c.shape[0] for c in curves}) > 1:
        raise DiffEncError("--per-t compares checkpoints on the same images; pass checkpoints of "
                           "the same data set")
    cols = [(c.mean(0), c.std(0) / math.sqrt(len(c))) for c in curves]
    names = [f"mean_{k + 1},se_{k + 1}" for k in range(len(curves))]
    if len(curves) > 1:  # paired difference of the last checkpoint minus the first
        d = curves[-1] - curves[0]
        cols.append((d.mean(0), d.std(0) / math.sqrt(len(d))))
        names.append(f"diff_{len(curves)}_1,se_diff")
    prefix = os.path.join(os.path.dirname(ckpt_paths[0]) or ".", "per_t")
    table = torch.stack([v for pair in cols for v in pair], 1).tolist()    # (11, 2 per column)
    write_csv(f"{prefix}.csv", "t," + ",".join(names),
              [[f"{t:.1f}"] + [repr(v) for v in row] for t, row in zip(PER_T, table)])
    name = lambda path: os.path.basename(os.path.dirname(os.path.abspath(path)))  # the run folder
    colors = ("black", "#d62728", "#1f77b4", "#2ca02c")
    svg_plot(f"{prefix}.svg", PER_T, [(m.numpy(), c, name(p), False) for (m, _), c, p
                                      in zip(cols[:len(curves)], colors, ckpt_paths)],
             "t", "diffusion-loss integrand at t (bpd)")
    legend = ", ".join(f"{c} = {p}" for c, p in zip(colors, ckpt_paths))
    print(f"wrote {prefix}.csv and {prefix}.svg: diffusion-loss integrand (bpd) vs t; {legend}")
    if len(curves) > 1:
        m, s = (v.numpy() for v in cols[-1])
        svg_plot(f"{prefix}_diff.svg", PER_T,
                 [(m, "black", f"{name(ckpt_paths[-1])} minus {name(ckpt_paths[0])}", False),
                  (m - 2 * s, "gray", "± 2 standard errors", True),
                  (m + 2 * s, "gray", None, True),
                  (0 * m, "#d62728", None, False)], "t", "paired difference (bpd)")
        print(f"wrote {prefix}_diff.svg: {ckpt_paths[-1]} minus {ckpt_paths[0]} per t ± 2 "
              f"standard errors")
    return curves


DEPTH_COLORS = ("black", "#d62728", "#ff9896", "#1f77b4", "#aec7e8", "#2ca02c", "#98df8a")


def run_depths(ckpt_paths, args):
    """--eval CKPT [CKPT ...] --depths T [T ...]: the T-step test bpd of each checkpoint at each T,
    for DiffEnc checkpoints with both increment models (euler, exp; or --increment's alone), on
    the same images, t and eps (paired). Prints one table (each column minus the first, and exp
    minus euler), writes depths.csv and depths.svg (bpd against T, log axes) beside the first
    checkpoint. Returns {(path, increment): (T_count, N) bpd}."""
    se, columns = std_err, {}
    for path in ckpt_paths:
        ckpt = load_checkpoint(path)
        cfg = Config(**ckpt["config"])
        if cfg.model == "em":
            raise DiffEncError(f"{path} is a --model em checkpoint, evaluated in continuous time; "
                               f"--depths takes diffenc checkpoints")
        refuse_latent_steps(cfg, path, args)
        data = load_dataset(cfg.dataset, args.data_dir or cfg.data_dir, "test")
        given = checkpoint_increment(cfg, path, args, min(args.depths))  # refused for a VDM
        increments = [None] if cfg.encoder == "none" else [given] if given else ["euler", "exp"]
        batch_size, seed = args.batch_size or cfg.batch_size, args.seed or 0
        for increment in increments:
            rows = []
            for T in args.depths:
                model = model_from_checkpoint(ckpt, pick_device(), T=T, increment=increment)
                rows.append(evaluate(model, data, batch_size, seed, args.eval_images or 0,
                                     args.eval_samples).sum(1))                     # (N,)
                print(f"  {path} ({increment or 'vdm'}), T = {T}: {rows[-1].mean():.4f} ± "
                      f"{se(rows[-1]):.4f} bpd", flush=True)
            columns[path, increment] = torch.stack(rows)                             # (T's, N)
    if len({c.shape[1] for c in columns.values()}) > 1:
        raise DiffEncError("--depths compares checkpoints on the same images; pass checkpoints "
                           "of the same data set")
    name = lambda key: (f"{os.path.basename(os.path.dirname(os.path.abspath(key[0])))}"
                        f"{'' if key[1] is None else ' ' + key[1]}")
    keys, first = list(columns), next(iter(columns.values()))
    print(f"T-step test bpd ({first.shape[1]} images, one (t, eps) each, EMA weights; paired "
          f"differences with standard errors):")
    lines = []
    for j, T in enumerate(args.depths):
        cells = [f"{name(k)} {columns[k][j].mean():.4f} ± {se(columns[k][j]):.4f}" for k in keys]
        diffs = [f"{name(k)} - {name(keys[0])} {(columns[k][j] - first[j]).mean():+.4f} ± "
                 f"{se(columns[k][j] - first[j]):.4f}" for k in keys[1:]]
        diffs += [f"{name((p, 'exp'))} - euler {d.mean():+.4f} ± {se(d):.4f}"
                  for p in ckpt_paths if (p, "exp") in columns and (p, "euler") in columns
                  for d in [columns[p, "exp"][j] - columns[p, "euler"][j]]]
        print(f"  T = {T}: " + "; ".join(cells) + "\n    " + "; ".join(diffs))
        lines.append([str(T)] + [repr(v) for k in keys
                                  for v in (columns[k][j].mean().item(), se(columns[k][j]))])
    prefix = os.path.join(os.path.dirname(ckpt_paths[0]) or ".", "depths")
    header = "T," + ",".join(f"{name(k).replace(' ', '_')},se" for k in keys)
    write_csv(f"{prefix}.csv", header, lines)
    svg_plot(f"{prefix}.svg", np.array(args.depths, float),
             [(columns[k].mean(1).numpy(), c, name(k), k[1] == "exp")
              for k, c in zip(keys, DEPTH_COLORS * len(keys))],
             "steps T", "T-step test bpd", log_x=True, log_y=True)
    print(f"wrote {prefix}.csv and {prefix}.svg: T-step test bpd against T (log axes)")
    return columns


def checkpoint_increment(cfg, path, args, T):
    """--increment for a checkpoint evaluated or sampled with T steps (T = 0: continuous time):
    the flag's value, refused with one line where no T-step model of an encoder reads it; None
    (keep the checkpoint's) when it is not given."""
    if args.increment is None:
        return None
    if cfg.encoder == "none" or cfg.model == "em":
        raise DiffEncError(f"--increment models the encoder's increment, and {path} has none (a "
                           f"{'--model em' if cfg.model == 'em' else 'VDM'} checkpoint); drop "
                           f"--increment")
    if not T:
        raise DiffEncError(f"--increment sets the T-step model's step and this is the "
                           f"continuous-time bound; add --T (e.g. --T 10) or drop --increment")
    return args.increment


def refuse_latent_steps(cfg, path, args):
    """--latent-steps S sets the sampling steps of an em checkpoint's encoder; any other checkpoint
    has no latent encoder, and the Gaussian encoder's has no steps: the flag would be ignored."""
    if args.latent_steps is not None and log_kind(cfg) != "em":
        what = f"--model {cfg.model}" if cfg.model != "em" else "--latent-encoder gaussian"
        raise DiffEncError(f"--latent-steps is an option of --model em checkpoints with the "
                           f"diffusion encoder, and {path} is a {what} checkpoint; drop "
                           f"--latent-steps")


def report_em_bound(path, ckpt, bpd, args):
    """Print --model em's bound D + R, its parts, D_prior - D and D_other - D, each with its
    standard error over images; returns D + R per image (N,) for the pairing with other
    checkpoints."""
    cfg, se = Config(**ckpt["config"]), std_err
    D, R, d_prior, d_other = bpd[:, :3].sum(1), bpd[:, 3], bpd[:, 4], bpd[:, 5]
    total, carried, specific = D + R, d_prior - D, d_other - D
    S = args.latent_steps or cfg.latent_steps
    z = (f"the encoder's {S}-step deterministic sampler" if log_kind(cfg) == "em" else
         "the Gaussian encoder, mu + sigma xi,")
    print(f"{path}: test bpd {total.mean():.4f} ± {se(total):.4f} = D + R, an upper bound on "
          f"-log2 p(x) / dim (standard error over {len(total)} images of the {cfg.dataset} test "
          f"split; z from {z} with exact log q, EMA weights, step {ckpt['step']})")
    for name, col in (("D", D), ("  diffusion", bpd[:, 0]), ("  latent", bpd[:, 1]),
                      ("  recon", bpd[:, 2]), ("R", R), ("D_prior - D", carried),
                      ("D_other - D", specific)):
        print(f"  {name:11s} {col.mean():.5f} ± {se(col):.5f}")
    print(f"  (D_prior: the decoder's -ELBO with z ~ N(0, I), {d_prior.mean():.4f}; D_prior - D "
          f"is what the latent is worth against the prior, near 0 if the posterior collapsed; "
          f"D_other: with another test image's latent from q, {d_other.mean():.4f}; D_other - D "
          f"is what it tells the decoder about this image, near 0 if z is the same for all)")
    if bpd.shape[1] == 8:  # the E-step probe (evaluate_em)
        refined = bpd[:, 7] - bpd[:, 6]
        K, pre = cfg.langevin_steps, " (preconditioned)" if cfg.langevin_precond else ""
        print(f"  E-step: D_other - D of its z_K {refined.mean():.5f} ± {se(refined):.5f} against "
              f"{specific.mean():.5f} of the encoder's z (D of z_K {bpd[:, 6].mean():.4f}; "
              f"K = {K} Langevin step{'s' * (K != 1)}{pre} of eta {cfg.langevin_eta:g} from z, "
              f"beta {cfg.beta:g}: what the chain finds about the image, for the encoder to learn)")
    return total


RD_COLORS = dict(diffusion="#d62728", gaussian="#1f77b4")  # the two encoders in the R-D plot


def report_rate_distortion(rows):
    """The rate-distortion picture of several em checkpoints evaluated on the same test images
    [the seed's comparison: the diffusion encoder against the Gaussian one, across beta]: a table
    (encoder, beta, step, D + R, R, D, class agreement, distance ratio, each mean ± standard
    error over images) and rd.svg beside the first checkpoint, D against R in bpd, one dot per
    checkpoint labelled by encoder and beta; then, at each beta with both encoders, the paired
    difference diffusion minus Gaussian of D + R, class agreement and distance ratio. rows:
    [(path, cfg, step, bpd (N, 6 or 8), ratio (N,), agree (N,) or None)]."""
    se, points = std_err, []
    print("rate-distortion (bpd; the same test images for every checkpoint; mean ± standard "
          "error over images)")
    print("| encoder | beta | step | D + R | R | D | class agreement (%) | distance ratio | "
          "checkpoint |\n|---|---|---|---|---|---|---|---|---|")
    for path, cfg, step, bpd, ratio, agree in rows:
        D, R = bpd[:, :3].sum(1), bpd[:, 3]
        f = lambda v, k=4: f"{v.mean():.{k}f} ± {se(v):.{k}f}"
        agreement = "" if agree is None else f(100 * agree, 1)
        print(f"| {cfg.latent_encoder} | {cfg.beta:g} | {step} | {f(D + R)} | {f(R, 5)} | "
              f"{f(D)} | {agreement} | {f(ratio, 3)} | {path} |")
        points.append((R.mean().item(), D.mean().item(), f"{cfg.latent_encoder[0]} {cfg.beta:g}",
                       RD_COLORS[cfg.latent_encoder]))
    out = os.path.join(os.path.dirname(rows[0][0]) or ".", "rd.svg")
    svg_scatter(out, points, [(c, f"{e} encoder ({e[0]}), labelled by beta")
                              for e, c in RD_COLORS.items()], "R (bpd)", "D (bpd)")
    print(f"wrote {out}: D against R, one dot per checkpoint")
    # The seed's question, at each beta that has both encoders: the diffusion encoder minus the
    # Gaussian one, per image and then averaged (the rows share their test images, so the
    # standard error is the paired one, smaller than the two rows' combined when they correlate).
    first = {}
    for path, cfg, step, bpd, ratio, agree in rows:
        first.setdefault((cfg.beta, cfg.latent_encoder), (bpd, ratio, agree))
    for beta in dict.fromkeys(cfg.beta for _, cfg, *_ in rows):
        if {(beta, "diffusion"), (beta, "gaussian")} - first.keys():
            continue
        (bpd_d, ratio_d, agree_d), (bpd_g, ratio_g, agree_g) = (first[beta, "diffusion"],
                                                                first[beta, "gaussian"])
        if len(bpd_d) != len(bpd_g):  # two data sets' checkpoints: no images to pair
            continue
        diff = lambda a, b, k, scale=1: (f"{scale * (a - b).mean():+.{k}f} ± "
                                         f"{scale * se(a - b):.{k}f}")
        bound = lambda b: b[:, :4].sum(1)                                       # D + R (N,)
        agreement = ("" if agree_d is None or agree_g is None else
                     f", class agreement {diff(agree_d, agree_g, 1, 100)} points")
        print(f"  beta {beta:g}, diffusion minus Gaussian encoder (paired, the same images): "
              f"D + R {diff(bound(bpd_d), bound(bpd_g), 4)} bpd{agreement}, distance ratio "
              f"{diff(ratio_d, ratio_g, 3)}")


def plot_em_log(ckpt_path, kind):
    """The training curves of a --model em run (LOG_COLUMNS key kind: em or gaussian), from the
    log.csv beside its checkpoint (if there is one): the decoder's bpd, and the encoder's -log q
    bound and the E-step's Delta U (em) or the rate (gaussian) against the step, one SVG each:
    whether encoder and decoder are in step."""
    path = os.path.join(os.path.dirname(ckpt_path) or ".", "log.csv")
    if not os.path.isfile(path):
        return
    columns = log_columns(kind)
    rows = np.array([row for _, row in read_log(path, len(columns))]).reshape(-1, len(columns))
    if len(rows) < 2:
        return
    step, col = rows[:, 0], lambda name: rows[:, columns.index(name)]
    prefix = path[:-len("log.csv")] + "em_log"
    plots = [("bpd", [(col("bpd"), "black", None, False)], "decoder bpd (training batches)")]
    if kind == "em":
        plots += [("enc", [(col("enc_nll"), "#1f77b4", None, False)],
                   "encoder: -log q(z_K | x) bound, nats/dim"),
                  ("dU", [(col("delta_U"), "#d62728", None, False), (0 * step, "gray", None, True)],
                   "E-step: Delta U (nats)")]
    else:
        plots += [("rate", [(col("rate"), "#1f77b4", None, False)], "rate KL(q || p), nats")]
    for name, curves, ylabel in plots:
        svg_plot(f"{prefix}_{name}.svg", step, curves, "step", ylabel)
    print(f"  wrote {', '.join(f'{prefix}_{name}.svg' for name, _, _ in plots)}: the run's "
          f"training curves from {path}")


def sigma_p_estimate(model, ckpt, path, args):
    """optimal_variance_ratios for --eval and --sample --sigma-p optimal, with the number of pairs
    it used. Saved beside the checkpoint (latest_sigma_p_T10.pt for latest.pt and T = 10) with
    what it depends on (the checkpoint's digest, T, the increment, the pairs, the seed); a later
    --eval or --sample that asks for the same reads it instead of estimating again. (The batch
    size is not part of the key: it changes the estimate by float rounding only.)"""
    cfg = model.cfg
    pairs = max(2, (args.sigma_pairs or SIGMA_P_PAIRS) // cfg.T) * cfg.T
    key = dict(sha256=ckpt["sha256"], T=cfg.T, increment=model.increment, pairs=pairs,
               seed=args.seed or 0)
    stem = os.path.splitext(os.path.basename(path))[0]
    cache = os.path.join(os.path.dirname(path) or ".", f"{stem}_sigma_p_T{cfg.T}.pt")
    if os.path.isfile(cache):
        try:
            saved = torch.load(cache, weights_only=True)
        except Exception:  # a truncated or foreign file: estimate again and replace it
            saved = {}
        if isinstance(saved, dict) and saved.get("key") == key:
            print(f"  sigma_P* per step read from {cache} ({pairs} training pairs; estimated "
                  f"earlier for this checkpoint, T and increment)")
            return saved["ratio"], saved["se"], pairs
    train_data = load_dataset(cfg.dataset, args.data_dir or cfg.data_dir, "train")
    batch_size = args.batch_size or cfg.batch_size
    ratio, ratio_se = optimal_variance_ratios(model, train_data, args.seed or 0, batch_size, pairs)
    atomic_write(cache, lambda f: torch.save(dict(key=key, ratio=ratio, se=ratio_se), f))
    return ratio, ratio_se, pairs


def report_optimal_variances(model, bpd, run, path, args, ckpt):
    """--eval --T T --sigma-p optimal: estimate sigma_P* per step on the training split, evaluate
    the T-step ELBO with it on the same test images, t and eps as `bpd` (sigma_P = sigma_Q), print
    both and their paired difference, and write sigma_P*/sigma_Q per step (CSV and plot)."""
    T = model.cfg.T
    ratio, ratio_se, pairs = sigma_p_estimate(model, ckpt, path, args)
    optimal = run(None, ratio).sum(1)
    equal = bpd.sum(1)
    diff = optimal - equal
    se = std_err
    print(f"  {T}-step ELBO, sigma_P = sigma_Q: {equal.mean():.4f} ± {se(equal):.4f}; optimal "
          f"sigma_P per step (from {pairs} training pairs): "
          f"{optimal.mean():.4f} ± {se(optimal):.4f}; optimal minus equal: {diff.mean():+.5f} ± "
          f"{se(diff):.5f} bpd (paired)")
    prefix = os.path.join(os.path.dirname(path) or ".", f"sigma_p_T{T}")
    t_mid = (torch.arange(T, dtype=torch.float64) + 0.5) / T
    rows = zip(range(1, T + 1), t_mid.tolist(), ratio.tolist(), ratio_se.tolist())
    write_csv(f"{prefix}.csv", "step,t_mid,var_ratio,se", [map(repr, row) for row in rows])
    svg_plot(f"{prefix}.svg", t_mid.numpy(), [(ratio.sqrt().numpy(), "#d62728", f"T = {T}", False),
                                              (np.ones(T), "black", None, True)],
             "t (middle of the step)", "optimal sigma_P / sigma_Q")
    print(f"  wrote {prefix}.csv and {prefix}.svg: sigma_P*/sigma_Q per step against t; largest "
          f"{ratio.sqrt().max():.4f} at t = {t_mid[ratio.argmax()]:.3f}")
    return ratio, equal, optimal


def run_tune_schedule(ckpt_path, args):
    """--tune-schedule CKPT --T T: tune the schedule for T steps, save it beside CKPT as
    tuned_T{T}.pt, and print the test T-step bpd before and after on the same images (paired)."""
    ckpt = load_checkpoint(ckpt_path)
    cfg = Config(**ckpt["config"])
    if not args.T:
        raise DiffEncError("--tune-schedule tunes the schedule for T-step inference; give --T, "
                           "e.g. --T 10")
    if cfg.model == "em":
        raise DiffEncError(f"{ckpt_path} is a --model em checkpoint, which has no T-step loss to "
                           f"tune; --tune-schedule takes diffenc checkpoints")
    device, seed, batch_size = pick_device(), args.seed or 0, args.batch_size or cfg.batch_size
    train_data = load_dataset(cfg.dataset, args.data_dir or cfg.data_dir, "train")
    test = load_dataset(cfg.dataset, args.data_dir or cfg.data_dir, "test")
    increment = checkpoint_increment(cfg, ckpt_path, args, args.T)
    model = model_from_checkpoint(ckpt, device, T=args.T, increment=increment)
    n_test = args.eval_images or 0
    test_bpd = lambda: evaluate(model, test, batch_size, seed, n_test, args.eval_samples).sum(1)
    before = test_bpd()
    steps, lr = args.steps or 500, args.lr or 1e-3
    model, losses = tune_schedule(model, train_data, args.T, steps, lr, batch_size, seed)
    after = test_bpd()
    path = os.path.join(os.path.dirname(ckpt_path) or ".", f"tuned_T{args.T}.pt")
    # the tuned EMA weights are both the raw and the EMA weights of the new checkpoint
    if not save_checkpoint(checkpoint_state(model.cfg, model, model, None, ckpt["step"]), path):
        raise SystemExit(1)
    se, d = std_err, after - before
    print(f"{ckpt_path}: test {args.T}-step bpd {before.mean():.4f} ± {se(before):.4f} with its "
          f"schedule, {after.mean():.4f} ± {se(after):.4f} tuned ({len(losses)} steps, training "
          f"loss {np.mean(losses[:10]):.4f} -> {np.mean(losses[-10:]):.4f}); tuned minus original "
          f"{d.mean():+.4f} ± {se(d):.4f} (paired); wrote {path} (schedule net, T = {args.T}: "
          f"for --eval and --sample)")
    return before, after, model


SAMPLE_TS = (1.0, 0.8, 0.6, 0.4, 0.2)  # t of the intermediate x_hat shown beside each sample
SAMPLE_ROWS = 8


# Sample quality (MNIST). Does a sample look like a digit? A small convnet, trained once on
# MNIST's training images and labels and cached in --data-dir, gives p(y|x) for each image, and
# from these come two numbers [Salimans et al. 2016, "Improved techniques for training GANs",
# section 4, the Inception score, with this classifier in place of Inception]:
#   IS-like = exp(E_x KL(p(y|x) || p(y))),  p(y) = E_x p(y|x) over the *set*,
# which is exp of the mutual information between image and class: 1 when every image gets the
# same class distribution, 10 when each image is certainly one class and the classes are equally
# frequent; and the mean top-class confidence E_x max_y p(y|x) (high when each image is clearly
# some digit). The same numbers on as many real test images give the ceiling.

CLASSIFIER = dict(epochs=2, batch_size=128, lr=1e-3, seed=0)  # 98.4 % on the test set, 40 s
CLASSIFIER_FILE = "mnist_classifier.pt"                       # in --data-dir


def classifier_net():
    """(B, 1, 28, 28) in [-1, 1] -> logits (B, 10): two conv + pool stages and an MLP; float32
    whatever the default dtype (it scores images, it is not part of the model)."""
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B,16,14,14)
                         nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B,32,7,7)
                         nn.Flatten(), nn.Linear(32 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10)
                         ).float()


def train_classifier(images, labels, epochs, batch_size, lr, seed):
    """A classifier_net trained by Adam on cross-entropy: images (N, 1, H, W) uint8, labels (N,).
    Initialisation and batch order are functions of seed only, so the cache is reproducible."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = classifier_net()
    opt, t0 = torch.optim.Adam(net.parameters(), lr=lr), time.time()
    steps = epochs * (len(images) // batch_size)
    for step in range(steps):
        idx = batch_indices(len(images), batch_size, step, seed)
        loss = F.cross_entropy(net(scale_pixels(images[idx], torch.float32)), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        progress("training the MNIST classifier", step + 1, steps, t0, "steps")
    return net.eval()


@torch.no_grad()
def class_probs(net, images, batch_size=500):
    """p(y|x) (N, 10) float64 for images (N, 1, H, W) uint8."""
    logits = [net(scale_pixels(x, torch.float32)) for x in images.split(batch_size)]
    return torch.cat(logits).double().softmax(1)


def mnist_classifier(data_dir):
    """The cached classifier and its accuracy on the 10,000 clean test images, trained and
    cached (atomically) on first use; a cache of another recipe is retrained."""
    path = os.path.join(data_dir, CLASSIFIER_FILE)
    if os.path.exists(path):
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated or foreign: torch.load fails in many ways
            raise DiffEncError(f"{path} is not a readable classifier cache ({type(e).__name__}); "
                               f"delete it and run again (it is retrained in about a minute)"
                               ) from None
        if isinstance(saved, dict) and saved.get("recipe") == CLASSIFIER:
            net = classifier_net()
            net.load_state_dict(saved["state"])
            return net.eval(), saved["test_accuracy"]
    net = train_classifier(load_dataset("mnist", data_dir, "train"),
                           load_mnist_labels(data_dir, "train"), **CLASSIFIER)
    probs = class_probs(net, load_dataset("mnist", data_dir, "test"))
    accuracy = (probs.argmax(1) == load_mnist_labels(data_dir, "test")).double().mean().item()
    state = dict(state=net.state_dict(), test_accuracy=accuracy, recipe=CLASSIFIER)
    try:
        atomic_write(path, lambda f: torch.save(state, f))
    except OSError as e:  # e.g. a read-only data folder: the scores stand, only the cache is lost
        print(f"diffenc: the classifier could not be cached at {path} ({e.strerror or e}); it "
              f"is retrained on the next use", file=sys.stderr)
    return net, accuracy


def sample_quality(probs):
    """(IS-like, mean top-class confidence) of a set of images' class probabilities (N, K), with
    KL(p(y|x) || p(y)) per image."""
    p_y = probs.mean(0, keepdim=True)                                  # (1, K) p(y) of the set
    xlogy = torch.special.xlogy                                        # 0 log 0 = 0: an absent
    kl = (xlogy(probs, probs) - xlogy(probs, p_y)).sum(1)              # class adds nothing; (N,)
    return kl.mean().exp().item(), probs.max(1).values.mean().item()


def quality_with_errors(probs, seed, n_boot=200):
    """sample_quality with bootstrap standard errors (n_boot resamplings of the images):
    ((IS-like, its s.e.), (confidence, its s.e.))."""
    idx = torch.randint(len(probs), (n_boot, len(probs)), generator=rng(seed, RNG["quality"]))
    boots = torch.tensor([sample_quality(probs[i]) for i in idx])     # (n_boot, 2)
    return tuple(zip(sample_quality(probs), boots.std(0).tolist()))


def report_sample_quality(x, data_dir, seed):
    """Print the sample quality of MNIST samples x (N, 1, 28, 28) uint8, and its ceiling: the same
    numbers for the first N real test images. Returns ((IS-like, confidence) of x, the same of
    the real images), each a (value, s.e.) pair."""
    net, accuracy = mnist_classifier(data_dir)
    real = load_dataset("mnist", data_dir, "test")[:len(x)]
    (is_x, conf_x), (is_r, conf_r) = (quality_with_errors(class_probs(net, a), seed)
                                      for a in (x, real))
    print(f"sample quality ({len(x)} images; MNIST classifier, {100 * accuracy:.1f} % on clean "
          f"test images): IS-like {is_x[0]:.2f} ± {is_x[1]:.2f} (real test images: "
          f"{is_r[0]:.2f} ± {is_r[1]:.2f}), top-class confidence {conf_x[0]:.3f} ± "
          f"{conf_x[1]:.3f} (real: {conf_r[0]:.3f} ± {conf_r[1]:.3f})")
    return (is_x, conf_x), (is_r, conf_r)


# Coherence of reconstructions (--model em, section 8). Does a test image, encoded to z ~ q(z|x)
# and decoded by the sampler, keep its identity? Two numbers per image: whether the classifier
# above gives the reconstruction the input's label (the class agreement; its ceiling is the
# classifier's accuracy on the inputs themselves, its floor 1/10 for a reconstruction unrelated
# to the input), and the pixel distance of the reconstruction to its input over its distance to
# another test image (the distance ratio: about 1 when the input is forgotten, 0 when copied).

def reconstruct(model, x_int, idx, S, T, seed, batch_size):
    """Reconstructions (N, C, H, W) uint8 of test images x_int (N, C, H, W) uint8 with test-set
    indices idx (N,): z ~ q(z | x) (S encoder steps; the draws a function of seed and the image's
    index, so every checkpoint sees the same; S None for the Gaussian encoder, which has no
    steps), then the decoder's T-step sampler given z."""
    p, d, out = next(model.parameters()), model.cfg.latent_dim, []
    for b0 in range(0, len(x_int), batch_size):
        x, i = x_int[b0:b0 + batch_size].to(p.device), idx[b0:b0 + batch_size]
        xi = torch.stack(indexed_normal(i, (d,), (S or 0) + 1, seed, RNG["latent_sample"]))
        with torch.no_grad():
            z = encode(model, scale_pixels(x, p.dtype), xi.to(p.device, p.dtype), S)   # (b, d)
        out.append(sample(model, len(x), T, seed, cond=z, stream=(b0,))[0])
    return torch.cat(out)


def coherence(x, recon, seed, probs=None, labels=None):
    """Per image (N,) float64: the distance ratio |recon_i - x_i| / |recon_i - x_j(i)|, j(i) a
    random other image of the set (a random cyclic derangement: never i itself), and, given the
    classifier's probs (N, 10) of recon and the inputs' labels (N,), the class agreement (1 where
    argmax probs is the label). x, recon (N, C, H, W) uint8, N >= 2."""
    perm = torch.randperm(len(x), generator=rng(seed, RNG["quality"]))
    other = torch.empty_like(perm)
    other[perm] = perm.roll(-1)                      # perm[k]'s partner is perm[k + 1]
    dist = lambda a, b: (a.double() - b.double()).flatten(1).norm(dim=1)       # (N,)
    ratio = dist(recon, x) / dist(recon, x[other])
    agree = None if probs is None else (probs.argmax(1) == labels).double()
    return ratio, agree


def report_coherence(x, recon, idx, data_dir, seed, S, T, mnist):
    """Print the distance ratio and, on MNIST, the class agreement of reconstructions recon of the
    test images x (indices idx), each with its standard error over images, beside the
    classifier's accuracy on clean test images and on these inputs. Returns (ratio, agree)."""
    probs = labels = None
    if mnist:
        net, accuracy = mnist_classifier(data_dir)
        labels = load_mnist_labels(data_dir, "test")[idx]
        probs = class_probs(net, recon)
        on_inputs = (class_probs(net, x).argmax(1) == labels).double().mean().item()
    ratio, agree = coherence(x, recon, seed, probs, labels)
    steps = f" with {S} encoder steps" if S else ""
    where = f"{len(x)} test images, z ~ q(z|x){steps}, {T} decoder steps"
    if mnist:
        print(f"  class agreement {100 * agree.mean():.1f} ± {100 * std_err(agree):.1f} % "
              f"(reconstructions given their input's label; {where}; MNIST classifier: "
              f"{100 * accuracy:.1f} % on clean test images, {100 * on_inputs:.1f} % on these "
              f"inputs, 10 % for unrelated images)")
        where = "the same reconstructions"
    print(f"  distance ratio {ratio.mean():.3f} ± {std_err(ratio):.3f} (|recon - input| / |recon "
          f"- another test image|, mean over images; {where}; 1: the input is forgotten)")
    return ratio, agree


def run_sample(ckpt_path, args):
    """A grid of samples, and one of the reverse process: x_hat(z_t) at SAMPLE_TS, then the sample.
    Steps: --T, else --sample-steps, else the checkpoint's T (a tuned schedule's), else its
    sample_steps. --sigma-p optimal: each step's variance estimated as in --eval."""
    ckpt = load_checkpoint(ckpt_path)
    cfg = Config(**ckpt["config"])
    T = args.T or args.sample_steps or cfg.T or cfg.sample_steps
    refuse_latent_steps(cfg, ckpt_path, args)
    increment = checkpoint_increment(cfg, ckpt_path, args, T)
    model = model_from_checkpoint(ckpt, pick_device(), T=T, increment=increment)
    if cfg.model == "em":
        if args.sigma_p == "optimal":
            raise DiffEncError(f"{ckpt_path} is a --model em checkpoint; its sampler uses "
                               f"sigma_P = sigma_Q: drop --sigma-p optimal")
        return sample_em(model, ckpt, ckpt_path, T, args)
    ratio = None
    if args.sigma_p == "optimal":
        ratio, _, _ = sigma_p_estimate(model, ckpt, ckpt_path, args)
    steps = [max(1, round(t * T)) for t in SAMPLE_TS]
    x, kept = sample(model, args.n_samples, T, args.seed or 0, keep=steps, var_ratio=ratio)
    name = f"samples_step{ckpt['step']}_T{T}" + ("_optimal_sigma" if ratio is not None else "")
    path = os.path.join(os.path.dirname(ckpt_path) or ".", f"{name}.png")
    write_png(path, image_grid(x, math.ceil(math.sqrt(args.n_samples))))
    n = min(args.n_samples, SAMPLE_ROWS)
    final = to_rgb(x[:n].float() / 127.5 - 1)           # uint8 -> [-1, 1] -> the same uint8, RGB
    panels = torch.stack([to_rgb(kept[i][:n]) for i in steps] + [final], 1)  # (n, 6, 3, H, W)
    process = path.replace(".png", "_process.png")
    write_panels(process, panels.flatten(0, 1), len(steps) + 1)
    print(f"wrote {args.n_samples} samples ({T} steps) to {path}, and x_hat at t = "
          f"{', '.join(map(str, SAMPLE_TS))} then the sample for {n} of them to {process}")
    quality = None
    if cfg.dataset == "mnist":
        quality = report_sample_quality(x, args.data_dir or cfg.data_dir, args.seed or 0)
    return x, kept, quality


RACE_MINUTES = 5.0  # --race's default --minutes per model: one short GPU job for both


def run_race(args):
    """--race DATASET: the VDM (--encoder none) and DiffEnc (the learned encoder) trained one after
    the other for --minutes each (default RACE_MINUTES) with the same other flags, in --out/vdm
    and --out/diffenc; then both evaluated on the same test images, t and eps (paired), and
    --n-samples samples of each written beside its checkpoint with their sample quality (MNIST);
    one table at the end. Meant for a GPU (e.g. --size small --amp --compile); runs anywhere."""
    base = config_from_args(args, args.race)
    base = dataclasses.replace(base, minutes=base.minutes or RACE_MINUTES)
    if base.model == "em":
        raise DiffEncError("--race trains the VDM and DiffEnc; drop --model em")
    device, rows = pick_device(), []
    for name, encoder in (("vdm", "none"), ("diffenc", "learned")):
        cfg = dataclasses.replace(base, encoder=encoder, out=os.path.join(base.out, name))
        train(cfg)
        path = os.path.join(cfg.out, "latest.pt")
        ckpt = load_checkpoint(path)
        model = model_from_checkpoint(ckpt, device)
        test = load_dataset(cfg.dataset, cfg.data_dir, "test")
        total = evaluate(model, test, cfg.batch_size, cfg.seed, cfg.eval_images).sum(1)  # (N,)
        _, _, quality = run_sample(path, args)
        rows.append((name, ckpt["step"], total, quality))
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    print(f"race: {base.dataset}, --size {base.size}, {base.minutes:g} min of training each, "
          f"{where}, test bpd on {len(rows[0][2])} test images (EMA weights)")
    print(f"  {'model':8s} {'steps':>7s}  {'test bpd':18s}" + "  IS-like        confidence"
          * (rows[0][3] is not None))
    for name, step, total, quality in rows:
        q = "" if quality is None else "  ".join(f"{v:.3f} ± {e:.3f}" for v, e in quality[0])
        print(f"  {name:8s} {step:7d}  {total.mean():.4f} ± {std_err(total):.4f}   {q}")
    d = rows[1][2] - rows[0][2]
    print(f"  diffenc - vdm (paired: same images, t and eps): {d.mean():+.4f} ± {std_err(d):.4f} "
          f"bpd")
    if rows[0][3] is not None:
        (is_r, is_se), (conf_r, conf_se) = rows[0][3][1]          # the first N test images
        print(f"  real test images (the ceiling): IS-like {is_r:.3f} ± {is_se:.3f}, confidence "
              f"{conf_r:.3f} ± {conf_se:.3f}")
    return rows


def sample_em(model, ckpt, ckpt_path, T, args):
    """--sample on a --model em checkpoint: n generations (z ~ N(0, I), then the decoder's T-step
    sampler), and the first n test images beside their reconstructions (reconstruct), as two PNG
    grids beside CKPT, with the generations' quality and the reconstructions' coherence."""
    cfg, n, seed = model.cfg, args.n_samples, args.seed or 0
    p, d = next(model.parameters()), cfg.latent_dim
    g = rng(seed, RNG["latent_sample"])
    normal = lambda: torch.randn((n, d), generator=g, dtype=p.dtype).to(p.device)
    generated, _ = sample(model, n, T, seed, cond=normal())                # (n, C, H, W) uint8
    test = load_dataset(cfg.dataset, args.data_dir or cfg.data_dir, "test")[:n]
    S = (args.latent_steps or cfg.latent_steps) if log_kind(cfg) == "em" else None
    recon = reconstruct(model, test, torch.arange(len(test)), S, T, seed, len(test))
    prefix = os.path.join(os.path.dirname(ckpt_path) or ".", f"em_step{ckpt['step']}_T{T}")
    write_png(f"{prefix}_samples.png", image_grid(generated, math.ceil(math.sqrt(n))))
    pairs = torch.stack([test, recon], 1).flatten(0, 1)                    # (2n, C, H, W)
    write_png(f"{prefix}_recon.png", image_grid(pairs, 2 * math.ceil(math.sqrt(len(test) / 2))))
    print(f"wrote {n} generations (z ~ N(0, I), {T} steps) to {prefix}_samples.png, and "
          f"{len(test)} test images each beside its reconstruction (z ~ q(z | x)) to "
          f"{prefix}_recon.png")
    if cfg.dataset == "mnist":
        report_sample_quality(generated, args.data_dir or cfg.data_dir, seed)
    if len(test) > 1:
        report_coherence(test, recon, torch.arange(len(test)), args.data_dir or cfg.data_dir,
                         seed, S, T, cfg.dataset == "mnist")
    return generated, recon


# Figures, with numpy and the standard library alone: images and signed maps as PNG grids
# (image_grid, and a blue-white-red colour map like the authors' matplotlib `bwr`), curves as SVG
# (svg_plot: text stays text, and the figure scales).

def image_grid(x, nrow, pad=2):
    """(N, C, H, W) uint8 -> (rows*(H+pad)+pad, nrow*(W+pad)+pad, C) uint8 with a white frame."""
    N, C, H, W = x.shape
    rows = -(-N // nrow)
    grid = np.full((rows * (H + pad) + pad, nrow * (W + pad) + pad, C), 255, np.uint8)
    for k in range(N):
        r, c = divmod(k, nrow)
        top, left = pad + r * (H + pad), pad + c * (W + pad)
        grid[top:top + H, left:left + W] = x[k].permute(1, 2, 0).numpy()
    return grid


def write_png(path, img):
    """Write an (H, W, 1) or (H, W, 3) uint8 array as PNG with zlib alone (8-bit gray or RGB)."""
    img = np.ascontiguousarray(img)
    H, W, C = img.shape
    # a PNG chunk: length, tag, data, CRC-32 of tag and data
    chunk = lambda tag, data: (struct.pack(">I", len(data)) + tag + data
                               + struct.pack(">I", zlib.crc32(tag + data)))
    rows = b"".join(b"\x00" + img[r].tobytes() for r in range(H))  # filter type 0 on every row
    header = struct.pack(">IIBBBBB", W, H, 8, 0 if C == 1 else 2, 0, 0, 0)
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows, 9))
           + chunk(b"IEND", b""))
    atomic_write(path, lambda f: f.write(png))


def to_rgb(x):
    """Scaled images in [-1, 1] (N, C, H, W) -> uint8 (N, 3, H, W); gray is repeated, so gray
    images and colour maps share one grid."""
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def bwr(v, lim):
    """Signed maps (N, H, W) -> uint8 (N, 3, H, W): -lim blue, 0 white, +lim red, clipped."""
    u = (v / lim).clamp(-1, 1)
    pos, neg = u.clamp(min=0), (-u).clamp(min=0)
    return (torch.stack([1 - neg, 1 - pos - neg, 1 - pos], 1) * 255).round().to(torch.uint8)


def write_panels(path, panels, ncol):
    """Write (N, 3, H, W) uint8 panels as a grid of ncol columns, upscaled to >= 96 px a panel."""
    k = max(1, 96 // panels.shape[-1])
    write_png(path, image_grid(panels.cpu(), ncol).repeat(k, 0).repeat(k, 1))


def nice_ticks(lo, hi, n=5):
    """At most ~n round tick values (1, 2 or 5 times a power of ten apart) in [lo, hi], and the
    decimals their labels need."""
    raw = (hi - lo) / n
    unit = 10 ** math.floor(math.log10(raw))
    step = next(m * unit for m in (1, 2, 5, 10) if m * unit >= raw)
    ticks = np.arange(math.ceil(lo / step), math.floor(hi / step) + 1) * step
    return ticks, max(0, -math.floor(math.log10(step)))


def log_ticks(lo, hi):
    """Round tick values for a log axis over [lo, hi] (positive): 1, 2 and 5 times powers of ten
    (or every power of ten where the range spans more than two decades), and their decimals."""
    decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
    mantissas = (1,) if math.log10(hi / lo) > 2 else (1, 2, 5)
    ticks = np.array([m * 10.0 ** k for k in decades for m in mantissas])
    ticks = ticks[(ticks >= lo) & (ticks <= hi)]
    return ticks, max([0] + [-math.floor(math.log10(v)) for v in ticks])


def svg_frame(size, x_range, y_range, xlabel, ylabel, n_labels, log_x=False, log_y=False):
    """The axes of an SVG plot: white page, grid, ticks, box and axis labels, with n_labels legend
    rows of 16 px under it. Returns (the SVG elements so far, px, py: data -> pixel maps, the
    box's left edge and the first legend row's y, px). A padding of 5 % keeps the extreme values
    off the box."""
    W, H = size
    left, right, top, bottom = 64, W - 12, 12, H - 40                       # the plot box, px
    H_total = H + 16 * n_labels                                             # + legend rows
    fx, fy = (math.log10 if log_x else float), (math.log10 if log_y else float)
    (x0, x1), (lo, hi) = [(f(a), f(b)) for f, (a, b) in ((fx, x_range), (fy, y_range))]
    pad = 0.05 * (hi - lo) if hi - lo > 1e-9 else 1.0
    lo, hi = lo - pad, hi + pad
    px = lambda v: left + (fx(v) - x0) / (x1 - x0) * (right - left)
    py = lambda v: bottom - (fy(v) - lo) / (hi - lo) * (bottom - top)
    el = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H_total}" '
          f'font-family="sans-serif" font-size="11">',
          f'<rect width="{W}" height="{H_total}" fill="white"/>']
    ticks, dec = log_ticks(10 ** lo, 10 ** hi) if log_y else nice_ticks(lo, hi)
    for v in ticks:
        el += [f'<line x1="{left}" x2="{right}" y1="{py(v):.1f}" y2="{py(v):.1f}" stroke="#ddd"/>',
               f'<text x="{left - 4}" y="{py(v) + 4:.1f}" text-anchor="end">{v:.{dec}f}</text>']
    ticks, dec = (log_ticks if log_x else nice_ticks)(*map(float, x_range))
    for v in ticks:
        el += [f'<line x1="{px(v):.1f}" x2="{px(v):.1f}" y1="{top}" y2="{bottom}" stroke="#ddd"/>',
               f'<text x="{px(v):.1f}" y="{bottom + 14}" text-anchor="middle">{v:.{dec}f}</text>']
    el += [f'<rect x="{left}" y="{top}" width="{right - left}" height="{bottom - top}" '
           f'fill="none" stroke="black"/>',
           f'<text x="{(left + right) / 2}" y="{H - 6}" text-anchor="middle">'
           f'{escape(xlabel)}</text>',
           f'<text transform="translate(14 {(top + bottom) / 2}) rotate(-90)" '
           f'text-anchor="middle">{escape(ylabel)}</text>']
    return el, px, py, left, H + 8


def svg_plot(path, x, curves, xlabel, ylabel, size=(480, 300), log_x=False, log_y=False):
    """Write a line plot as SVG: real text, any scale, shown by GitHub and every browser.
    x: (n,); curves: [(y (n,), CSS colour, legend label or None, dashed)]. The legend goes under
    the plot, one row per label, so it never hides a curve. log_x, log_y: logarithmic axes (the
    values must be positive)."""
    ys = np.concatenate([np.asarray(y, float) for y, *_ in curves])
    n_labels = sum(1 for _, _, label, _ in curves if label)
    el, px, py, left, ly = svg_frame(size, (x[0], x[-1]), (ys.min(), ys.max()), xlabel, ylabel,
                                     n_labels, log_x, log_y)
    for y, color, label, dashed in curves:
        dash = ' stroke-dasharray="5 3"' if dashed else ""
        points = " ".join(f"{px(a):.2f},{py(b):.2f}" for a, b in zip(x, y))
        el.append(f'<polyline points="{points}" fill="none" stroke="{color}" stroke-width="1.5"'
                  f'{dash}/>')
        if label:
            el += [f'<line x1="{left}" x2="{left + 24}" y1="{ly - 4}" y2="{ly - 4}" '
                   f'stroke="{color}" stroke-width="1.5"{dash}/>',
                   f'<text x="{left + 30}" y="{ly}">{escape(label)}</text>']
            ly += 16
    svg = "\n".join(el + ["</svg>\n"])
    atomic_write(path, lambda f: f.write(svg.encode()))



def svg_scatter(path, points, legend, xlabel, ylabel, size=(480, 300)):
    """Write a scatter plot as SVG: points [(x, y, label, CSS colour)], each a dot with its label
    beside it; legend [(CSS colour, text)] in rows under the plot."""
    xs, ys = np.array([p[0] for p in points], float), np.array([p[1] for p in points], float)
    span = (xs.max() - xs.min()) or abs(xs.max()) or 1.0
    x_range = (xs.min() - 0.1 * span, xs.max() + 0.3 * span)  # room for the labels on the right
    el, px, py, left, ly = svg_frame(size, x_range, (ys.min(), ys.max()), xlabel, ylabel,
                                     len(legend))
    for x, y, label, color in points:
        el += [f'<circle cx="{px(x):.2f}" cy="{py(y):.2f}" r="4" fill="{color}"/>',
               f'<text x="{px(x) + 7:.2f}" y="{py(y) + 4:.2f}">{escape(label)}</text>']
    for color, text in legend:
        el += [f'<circle cx="{left + 12}" cy="{ly - 4}" r="4" fill="{color}"/>',
               f'<text x="{left + 30}" y="{ly}">{escape(text)}</text>']
        ly += 16
    svg = "\n".join(el + ["</svg>\n"])
    atomic_write(path, lambda f: f.write(svg.encode()))

# Seeing what the encoder learned [DiffEnc: experiments, Fig. 2; code: encoder_inspector.py].
# x_phi(lambda_t) = alpha_t^2 x + sigma_t^2 y(x, lambda_t): the first part is the fixed encoder,
# the second what the network adds; it is invisible while sigma_t^2 ~ 0 (t < 0.4 here) and takes
# over as alpha_t^2 -> 0. The rate (x_phi(t) - x_phi(t - 0.1))/0.1 summed over channels is the
# authors' article heat map; each t gets its own colour scale (the rates differ by orders of
# magnitude across t), printed with the figure.

INSPECT_TS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)   # columns of the x_phi grid
RATE_TS, RATE_DT = (0.4, 0.6, 0.8, 1.0), 0.1  # the article heat maps
INSPECT_ROWS = 4                              # test images shown (the first ones of the split)
RANGE_TS = np.linspace(0, 1, 101)             # min/mean/max of x_phi on the authors' 0.01 grid


def encoder_at(model, x, t):
    """x_phi(x, lambda_t) (B, C, H, W) and alpha_t^2 (B, 1, 1, 1) at one time t; x: scaled images
    (B, C, H, W)."""
    gamma = model.schedule(torch.full((len(x),), float(t), device=x.device))  # (B,)
    alpha2 = torch.sigmoid(-gamma)[:, None, None, None]
    return model.encode(x, gamma, derivative=False)[0], alpha2


@torch.no_grad()
def run_inspect(ckpt_path, args):
    ckpt = load_checkpoint(ckpt_path)
    cfg = Config(**ckpt["config"])
    if cfg.encoder != "learned":
        raise DiffEncError(f"--inspect shows a learned encoder, but {ckpt_path} was trained with "
                           f"--encoder {cfg.encoder}; pass a checkpoint of an --encoder learned "
                           f"run")
    device = pick_device()
    model = model_from_checkpoint(ckpt, device)
    data = load_dataset(cfg.dataset, args.data_dir or cfg.data_dir, "test")
    prefix = os.path.join(os.path.dirname(ckpt_path) or ".", f"inspect_step{ckpt['step']}")
    x = scale_pixels(data[:INSPECT_ROWS].to(device))                           # (R, C, H, W)
    R = len(x)

    before = lambda t: round(t - RATE_DT, 6)
    ts = sorted(set(INSPECT_TS) | {before(t) for t in RATE_TS})       # each x_phi(lambda_t) once
    enc = {t: encoder_at(model, x, t) for t in ts}                     # t -> (x_phi, alpha_t^2)
    x_enc = torch.stack([enc[t][0] for t in INSPECT_TS], 1)            # (R, n_t, C, H, W)
    alpha2 = torch.stack([enc[t][1] for t in INSPECT_TS], 1)           # (R, n_t, 1, 1, 1)
    added = (x_enc - alpha2 * x[:, None]).mean(2)                      # (R, n_t, H, W): C's mean
    lim = added.abs().max().clamp(min=1e-12)
    panels = torch.stack([to_rgb(x_enc.flatten(0, 1)), bwr(added.flatten(0, 1), lim)])
    panels = panels.unflatten(1, (R, len(INSPECT_TS))).transpose(0, 1)  # (R, 2 rows, n_t, 3, H, W)
    write_panels(f"{prefix}_grid.png", panels.flatten(0, 2), len(INSPECT_TS))

    rate = torch.stack([((enc[t][0] - enc[before(t)][0]) / RATE_DT).sum(1)
                        for t in RATE_TS], 1)                          # (R, n_rate, H, W)
    lims = rate.abs().amax(dim=(0, 2, 3)).clamp(min=1e-12)            # one colour scale per t
    rate_maps = bwr((rate / lims[:, None, None]).flatten(0, 1), 1.0)
    write_panels(f"{prefix}_rate.png", rate_maps, len(RATE_TS))

    xs = scale_pixels(data[:args.batch_size or cfg.batch_size].to(device))  # (B, C, H, W)
    stats, t0 = [], time.time()
    for k, t in enumerate(RANGE_TS):
        e = encoder_at(model, xs, t)[0]
        stats.append([v.item() for v in (e.min(), e.mean(), e.max())])
        progress("x_phi's range at", k + 1, len(RANGE_TS), t0, "times t")
    stats = np.array(stats)                                            # (101, 3)
    write_csv(f"{prefix}_range.csv", "t,min,mean,max",
              [[f"{t:.2f}"] + [repr(v) for v in row] for t, row in zip(RANGE_TS, stats.tolist())])
    svg_plot(f"{prefix}_range.svg", RANGE_TS, [(v, c, n, False) for v, c, n in zip(
        stats.T, ("#1f77b4", "black", "#d62728"), ("min", "mean", "max"))], "t", "x_phi(lambda_t)")

    print(f"wrote {prefix}_grid.png: rows x_phi(lambda_t) and (x_phi - alpha_t^2 x) of {R} test "
          f"images at t = {', '.join(map(str, INSPECT_TS))}; colour scale +-{lim:.3g} (red +, "
          f"blue -)")
    print(f"wrote {prefix}_rate.png: (x_phi(t) - x_phi(t - {RATE_DT}))/{RATE_DT} summed over "
          f"channels at t = {', '.join(map(str, RATE_TS))} (columns); colour scales +-"
          + ", +-".join(f"{v:.3g}" for v in lims.tolist()))
    print(f"wrote {prefix}_range.csv/.svg: min (blue), mean (black), max (red) of x_phi over "
          f"{len(xs)} test images vs t")
    return added, rate, stats


# -------------------------------------------------------------------------------------------------
# 13. Benchmark (optional: nothing above uses it)
#
# --bench builds the VDM (--encoder none) and DiffEnc (learned) for each speed setting asked for:
# plain (float32, eager), then with --amp, then with --amp and --compile (each only if given),
# and times them interleaved: every round runs one training step (forward, backward, AdamW, EMA)
# of every variant, then one sampling step of every variant (in a rotated order), so that drift of
# the machine's speed hits all alike. It prints medians over the rounds with their interquartile
# range, the ratio DiffEnc / VDM paired round by round, the matmul, convolution and attention
# FLOPs (PyTorch's counter), and the MFU on a known CUDA GPU. Speed is measured here, never in a
# test.
# -------------------------------------------------------------------------------------------------

def peak_rss():
    """The process's peak resident set size in bytes (Linux: VmHWM), else 0."""
    try:
        lines = open("/proc/self/status").read().splitlines()
    except OSError:
        return 0
    return next((int(line.split()[1]) * 1024 for line in lines if line.startswith("VmHWM")), 0)


def seconds(fn, device):
    """Wall time of fn(), with the GPU's queue drained before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def median_iqr(a):
    """Median and interquartile range (25th, 75th percentile) of a 1-D sequence."""
    return float(np.median(a)), tuple(np.percentile(a, [25, 75]))


# Dense tensor-core peaks in TFLOP/s, (bf16, tf32), from NVIDIA's data sheets: the denominator of
# MFU (model FLOPs utilisation). Matched in order against torch.cuda.get_device_name().
PEAK_TFLOPS = (("H100 PCIe", (756.0, 378.0)), ("H100", (989.0, 494.7)),
               ("H200", (989.0, 494.7)), ("A100", (312.0, 156.0)))


def step_flops(fn):
    """FLOPs of fn() as PyTorch's FlopCounterMode counts them: matmuls, convolutions and
    attention (2 per multiply-add), forward, backward and the jvp's tangent pass; elementwise work
    is not counted. Attention runs in its plain form here: the counter has no rule for the CPU's
    fused kernel (same maths, same FLOPs)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        fn()
    return counter.get_total_flops()


def mfu(flops_per_s, device, amp):
    """Achieved / peak FLOP/s on a known CUDA GPU, else None."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    peak = next((p for key, p in PEAK_TFLOPS if key in name), None)
    return None if peak is None else flops_per_s / (peak[0 if amp else 1] * 1e12)


def state_bytes(*objects):
    """Bytes of the tensors that a variant keeps between steps: parameters, their gradients,
    the EMA copy and AdamW's moments."""
    tensors = []
    for obj in objects:
        if isinstance(obj, torch.optim.Optimizer):
            tensors += [v for s in obj.state.values() for v in s.values() if torch.is_tensor(v)]
        else:
            tensors += [a for p in obj.parameters() for a in (p, p.grad) if a is not None]
    return sum(a.numel() * a.element_size() for a in tensors)


def bench(cfg, rounds=10, warmup=2, sample_batch=16):
    """Interleaved timing of training and sampling steps of VDM and DiffEnc (see above) on random
    data of the data set's shape; both models start from the same seed and see the same batch.
    Returns {(encoder, amp, compile): dict(train=s, sample=s, flops=FLOP per training step,
    memory=peak bytes of a training step on CUDA, else None)} with medians over the rounds.
    Sampling steps run in a rotated order (round k starts at variant k), so that no variant always
    follows the same one."""
    device = pick_device()
    settle_speed(cfg, device)
    shape = IMAGE_SHAPES[cfg.dataset]
    g = rng(cfg.seed, RNG["bench"])
    x = torch.randint(0, 256, (cfg.batch_size, *shape), generator=g).to(device)  # (B, C, H, W)
    batch = (x, *(a.to(device) for a in draw_noise(cfg.seed, 0, cfg.batch_size, shape)))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"bench: size={cfg.size} dataset={cfg.dataset} {shape} batch={cfg.batch_size} "
          f"device={device} ({name}) threads={torch.get_num_threads()} rounds={rounds} "
          f"torch={torch.__version__}")
    # plain first, then each switch asked for, added to those before it
    settings = list(dict.fromkeys([(False, False), (cfg.amp, False), (cfg.amp, cfg.compile)]))
    runs, flops = {}, {}
    for amp, compiled in settings:
        for encoder in ("none", "learned"):
            c = dataclasses.replace(cfg, encoder=encoder, amp=amp, compile=compiled)
            torch.manual_seed(c.seed)
            model = DiffEnc(c, shape).to(device)
            ema = copy.deepcopy(model).requires_grad_(False)
            opt = make_optimizer(model, c, device)
            if compiled:
                compile_model(model, cfg.batch_size, device)
            step = lambda k, m=model, e=ema, o=opt, c=c: train_step(m, m, e, o, c, k, batch, 1)
            if encoder not in flops:                          # same network, same FLOPs: count
                flops[encoder] = step_flops(lambda: step(0))  # once, eagerly (also a warm-up)
            runs[encoder, amp, compiled] = dict(step=step, model=model, state=(model, ema, opt),
                                                train=[], sample=[], memory=0)
    cuda = device.type == "cuda"
    for k in range(warmup + rounds):
        for run in runs.values():
            if cuda:
                before = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            run["train"].append(seconds(lambda: run["step"](k), device))
            if cuda:  # what the variant keeps between steps + the most its step added on top
                step_peak = torch.cuda.max_memory_allocated(device) - before
                run["memory"] = max(run["memory"], state_bytes(*run["state"]) + step_peak)
        order = list(runs.values())
        for run in order[k % len(order):] + order[:k % len(order)]:
            run["model"].eval()
            run["sample"].append(seconds(lambda: sample(run["model"], sample_batch, 1, k), device))
            run["model"].train()
    results = {}
    for (encoder, amp, compiled), run in runs.items():
        (train_s, train_iqr), (sample_s, sample_iqr) = (median_iqr(run[key][warmup:])
                                                        for key in ("train", "sample"))
        memory = run["memory"] if cuda else None
        results[encoder, amp, compiled] = dict(train=train_s, sample=sample_s, memory=memory,
                                               flops=flops[encoder])
        util = mfu(flops[encoder] / train_s, device, amp)
        n_params = sum(p.numel() for p in run["model"].parameters())
        print(f"  {encoder:7s} amp={amp:d} compile={compiled:d} params={n_params:>11,}  train "
              f"{train_s:.4f} s/step (IQR {train_iqr[0]:.4f}-{train_iqr[1]:.4f})  "
              f"{cfg.batch_size / train_s:8.1f} img/s  {flops[encoder] / 1e9:7.1f} GFLOP/step  "
              f"{flops[encoder] / train_s / 1e12:6.3f} TFLOP/s"
              + (f"  MFU {util:5.1%}" if util is not None else "")
              + (f"  peak mem {memory / 2 ** 20:6.0f} MiB" if cuda else "")
              + f"  |  sample {sample_s:.4f} s/step (IQR {sample_iqr[0]:.4f}-"
              f"{sample_iqr[1]:.4f}, batch {sample_batch})")
    for amp, compiled in settings:
        none, learned = runs["none", amp, compiled], runs["learned", amp, compiled]
        ratios = [median_iqr(np.divide(learned[key][warmup:], none[key][warmup:]))
                  for key in ("train", "sample")]
        print(f"  learned/none amp={amp:d} compile={compiled:d}: train {ratios[0][0]:.3f} (IQR "
              f"{ratios[0][1][0]:.3f}-{ratios[0][1][1]:.3f}; FLOPs "
              f"{flops['learned'] / flops['none']:.3f})  sample {ratios[1][0]:.3f} (IQR "
              f"{ratios[1][1][0]:.3f}-{ratios[1][1][1]:.3f})")
    if not cuda:  # on the CPU, freed memory stays resident: only the process's peak is a fact
        print(f"  peak resident memory of the process, all variants: {peak_rss() / 2**20:.0f} MiB")
    return results


# -------------------------------------------------------------------------------------------------
# 14. Command line
#
# argparse is generated from Config: every field is a flag (--n-embd, --encoder, ...). The value
# of a setting is: the Config default, overridden by the --size preset, overridden by the flags
# given. Modes: --train DATASET | --eval CKPT [CKPT ...] | --sample CKPT | --inspect CKPT |
# --tune-schedule CKPT | --bench [DATASET]. --model em (section 8) trains, evaluates and samples
# the Diffusion Encoder's autoencoder through the same modes.
# -------------------------------------------------------------------------------------------------

def build_parser():
    p = argparse.ArgumentParser(prog="diffenc.py", description="DiffEnc (arXiv 2310.19789): "
                                "train, evaluate, sample, inspect, benchmark.",
                                allow_abbrev=False)  # given_options reads the flags as typed
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--train", metavar="DATASET", help="train on cifar10 | mnist | synthetic")
    mode.add_argument("--eval", metavar="CKPT", nargs="+",
                      help="test bits/dim of checkpoints with standard errors, paired")
    mode.add_argument("--sample", metavar="CKPT",
                      help="PNG grids of samples and of the reverse process, beside CKPT")
    mode.add_argument("--inspect", metavar="CKPT",
                      help="figures of a learned encoder (x_phi over t, rates, range), beside CKPT")
    mode.add_argument("--tune-schedule", metavar="CKPT",
                      help="tune the schedule's shape for --T steps (--steps, default 500; --lr, "
                           "default 1e-3); writes tuned_T{T}.pt beside CKPT")
    mode.add_argument("--race", metavar="DATASET",
                      help="train the VDM and DiffEnc for --minutes each (default "
                           f"{RACE_MINUTES:g}), evaluate both paired, sample, one table")
    mode.add_argument("--bench", metavar="DATASET", nargs="?", const="cifar10",
                      help="time VDM and DiffEnc steps, interleaved, on DATASET-shaped images "
                           "(plain, and with --amp / --compile if given)")
    p.add_argument("--n-samples", type=int, default=64,
                   help="--sample, --race: number of images")
    p.add_argument("--eval-samples", type=int, default=1, help="--eval: (t, eps) draws per image")
    p.add_argument("--depths", metavar="T", type=int, nargs="+",
                   help="--eval: the T-step bpd at each of these T, DiffEnc with both --increment "
                        "models; a table and depths.csv/.svg beside the first CKPT")
    p.add_argument("--sigma-pairs", metavar="N", type=int,
                   help=f"--sigma-p optimal: (training image, eps) pairs that estimate the T "
                        f"per-step variances (default {SIGMA_P_PAIRS:,}; saved for reuse)")
    p.add_argument("--per-t", action="store_true",
                   help="--eval: also the diffusion-loss integrand at t = 0, 0.1, ..., 1")
    p.add_argument("--sigma-p", choices=("equal", "optimal"), default="equal",
                   help="--eval/--sample with --T: sigma_P = sigma_Q, or each step's optimum")
    for f in dataclasses.fields(Config):
        if f.name == "dataset":
            continue  # given by --train
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool:
            p.add_argument(flag, action="store_true", default=None, help=f.metadata["help"])
        else:
            p.add_argument(flag, type=f.type, default=None, choices=f.metadata.get("choices"),
                           help=f"{f.metadata['help']} (default {f.default})")
    # argparse's own errors (an unknown flag, a value not among the choices) print the usage
    # too; one line that names the flag and the allowed values is the rule here, as for the rest
    p.error = lambda message: p.exit(2, f"diffenc: {message}; see --help\n")
    return p


# What each mode reads besides its checkpoint (or data set): any other option would do nothing
# there, so main() refuses it with one line instead of ignoring it. --train reads every setting;
# --bench every setting of the networks and of a training step (it times both encoders itself).
CHECKPOINT_READS = ("data_dir", "batch_size", "seed", "T", "increment", "latent_steps")
MODE_READS = dict(
    train={f.name for f in dataclasses.fields(Config)},
    bench={f.name for f in dataclasses.fields(Config)} - {
        "encoder", "out", "resume", "data_dir", "log_every", "eval_every", "eval_images",
        "save_every", "skip_nonfinite", "sample_steps", "steps", "minutes"},
    eval={*CHECKPOINT_READS, "eval_images", "eval_samples", "per_t", "sigma_p", "sigma_pairs",
          "depths", "sample_steps"},
    sample={*CHECKPOINT_READS, "sample_steps", "n_samples", "sigma_p", "sigma_pairs"},
    inspect={"data_dir", "batch_size"},
    race={f.name for f in dataclasses.fields(Config)} - {"encoder", "increment", "resume"} | {
        "n_samples"},
    tune_schedule={*CHECKPOINT_READS, "eval_images", "eval_samples", "steps", "lr"} - {
        "latent_steps"},
)


def given_options(parser, argv):
    """The dest of every option that argv names (as typed: abbreviations are off)."""
    typed = {a.split("=")[0] for a in argv if a.startswith("--")}
    return {a.dest for a in parser._actions if typed & set(a.option_strings)}


def config_from_args(args, dataset):
    size = args.size or Config.size
    values = {**PRESETS[size], "size": size, "dataset": dataset}
    values.update({f.name: getattr(args, f.name) for f in dataclasses.fields(Config)
                   if f.name != "dataset" and getattr(args, f.name) is not None})
    return Config(**values)


def main(argv=None):
    if signal.getsignal(signal.SIGINT) is interrupted_while_starting:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C: KeyboardInterrupt
    parser, argv = build_parser(), sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    global SHOW_PROGRESS
    SHOW_PROGRESS = bool(args.eval or args.sample or args.inspect or args.tune_schedule
                         or args.race)
    try:
        for f in dataclasses.fields(Config):  # every flag given, in every mode, by the same rules
            if getattr(args, f.name, None) is not None:
                check_field(f.name, getattr(args, f.name))
        if args.sigma_pairs is not None and args.sigma_pairs < 2:
            raise DiffEncError(f"--sigma-pairs must be at least 2, got {args.sigma_pairs}")
        if args.sigma_pairs is not None and args.sigma_p != "optimal":
            raise DiffEncError("--sigma-pairs sizes the estimate of --sigma-p optimal; add "
                               "--sigma-p optimal or drop --sigma-pairs")
        for name in ("n_samples", "eval_samples"):
            if getattr(args, name) <= 0:
                raise DiffEncError(f"--{name.replace('_', '-')} must be positive, got "
                                   f"{getattr(args, name)}")
        if args.inspect and args.increment:
            raise DiffEncError("--inspect shows the encoder, not a T-step model; drop --increment")
        if args.depths and not (args.eval and args.T is None and not args.per_t
                                and args.sigma_p == "equal" and min(args.depths) > 0
                                and args.sample_steps is None):
            raise DiffEncError("--depths T [T ...] is an option of --eval that sets the steps "
                               "itself (T > 0); drop --T, --per-t, --sigma-p and --sample-steps")
        if args.per_t and not args.eval:
            raise DiffEncError("--per-t is an option of --eval; use --eval CKPT [CKPT ...] --per-t")
        unused = [f for f in EM_FIELDS if getattr(args, f) is not None]
        trains = args.train or args.bench or args.race
        e_step = [f for f in E_STEP_FIELDS if getattr(args, f) is not None]
        if trains and args.latent_encoder == "gaussian" and e_step:
            flag = "--" + e_step[0].replace("_", "-")
            raise DiffEncError(f"{flag} sets the diffusion encoder's network, sampler or "
                               f"E-step, which --latent-encoder gaussian has not; drop {flag}")
        if trains and (args.model or Config.model) != "em" and unused:
            flag = "--" + unused[0].replace("_", "-")
            raise DiffEncError(f"{flag} is an option of --model em; add --model em or drop {flag}")
        # a checkpoint holds its model's settings: of the em options only the encoder's sampling
        # steps S can change after training (--eval and --sample of an em checkpoint read it)
        reads_s = args.eval or args.sample
        unused = [f for f in unused if not (reads_s and f == "latent_steps")]
        if not trains and unused:
            flag = "--" + unused[0].replace("_", "-")
            raise DiffEncError(f"{flag} is a training option of --model em, and this mode reads "
                               f"the checkpoint's value; drop {flag}")
        if args.sigma_p == "optimal" and not ((args.eval and args.T) or args.sample):
            raise DiffEncError("--sigma-p optimal sets the variance of each of T steps; use it "
                               "with --eval CKPT --T T or --sample CKPT")
        mode = next(m for m in MODE_READS if getattr(args, m))
        ignored = sorted(given_options(parser, argv) - MODE_READS[mode] - set(MODE_READS))
        if ignored:
            flag = lambda name: "--" + name.replace("_", "-")
            reads = ", ".join(sorted(flag(o) for o in MODE_READS[mode]))
            what = "" if mode in ("train", "bench", "race") else f" (it reads {reads})"
            raise DiffEncError(f"{flag(ignored[0])} means nothing to {flag(mode)}{what}; drop "
                               f"{flag(ignored[0])}")
        if args.train:
            train(config_from_args(args, args.train))
        elif args.eval and args.depths:
            run_depths(args.eval, args)
        elif args.eval:
            run_eval(args.eval, args)
        elif args.sample:
            run_sample(args.sample, args)
        elif args.inspect:
            run_inspect(args.inspect, args)
        elif args.tune_schedule:
            run_tune_schedule(args.tune_schedule, args)
        elif args.race:
            run_race(args)
        else:
            cfg = config_from_args(args, args.bench)
            validate(cfg)
            if cfg.model == "em":
                raise DiffEncError("--bench times the VDM and DiffEnc steps; drop --model em")
            bench(cfg)
    except DiffEncError as e:
        print(f"diffenc: {e}", file=sys.stderr)
        raise SystemExit(2)
    except KeyboardInterrupt:  # Ctrl-C before training installed its handler, or in --eval/--sample
        print("diffenc: interrupted; nothing was written that is not complete", file=sys.stderr)
        raise SystemExit(130)
    finally:
        SHOW_PROGRESS = False


if __name__ == "__main__":
    main()
