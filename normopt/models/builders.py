"""PyTorch builders of the transformers normopt is tested and benchmarked on.

One configurable block covers them all; norms are chosen by name:

* ``ln``    nn.LayerNorm
* ``rms``   RMSNorm (LLaMA): x * rsqrt(mean(x^2) + eps) * w
* ``repbn`` SLAB's RepBN: BN over the channels of [B, N, C] via transpose, plus eta * x
            (PRepBN at inference, lambda = 0, is exactly this)
* ``un``    Unified Normalization in its inference form: x / sqrt(running_var + eps) * w + b
* ``bn``    plain BatchNorm over channels of [B, N, C]
* ``none``  no norm (the norm-free floor of the benchmarks)

Models: ``decoder`` (Pre-LN GPT-style), ``encoder`` (Pre-LN ViT-style, Conv patch embedding,
optional Dual PatchNorm), ``bert`` (Post-LN), ``llama`` (RMSNorm, gated SiLU MLP), and the SLAB
RepBN / Unified-Norm encoders via ``encoder(norm=...)``. Weights are random; call
:func:`randomize` to give norms non-trivial statistics so folds are exercised.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class RepBN(nn.Module):
    """SLAB RepBN: BN(x) + eta * x over the channels of [B, N, C]."""

    def __init__(self, d):
        super().__init__()
        self.bn = nn.BatchNorm1d(d)
        self.alpha = nn.Parameter(torch.ones(1))

    def forward(self, x):
        x = x.transpose(1, 2)
        x = self.bn(x) + self.alpha * x
        return x.transpose(1, 2)


class PRepBN(nn.Module):
    """SLAB's progressive norm: lambda * LN(x) + (1 - lambda) * RepBN(x) while training with
    lambda decaying to 0; in eval mode only RepBN remains (as in SLAB's LinearNorm)."""

    def __init__(self, d, lam=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.norm2 = RepBN(d)
        self.register_buffer("lam", torch.tensor(float(lam)))

    def forward(self, x):
        if self.training:
            return self.lam * self.norm1(x) + (1 - self.lam) * self.norm2(x)
        return self.norm2(x)


class ChannelBN(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.bn = nn.BatchNorm1d(d)

    def forward(self, x):
        return self.bn(x.transpose(1, 2)).transpose(1, 2)


class UnifiedNormInference(nn.Module):
    """Unified Normalization (arXiv 2208.01313) at inference: no mean subtraction,
    y = x / sqrt(running_var + eps) * w + b, computed as the reference code does it: the
    channels moved to axis 1 of a 4-D tensor, [1, C, 1, 1] statistics, and back."""

    def __init__(self, d, eps=1e-5):
        super().__init__()
        self.register_buffer("running_var", torch.ones(d))
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d))
        self.eps = eps

    def forward(self, x):  # x: [B, N, C] (or time-major [T, B, C]); channels last
        c = x.shape[-1]
        y = x.transpose(1, 2).unsqueeze(-1)  # [*, C, N, 1]
        shape = (1, c, 1, 1)
        y = y / torch.sqrt(self.running_var.view(shape) + self.eps) * self.weight.view(shape) + self.bias.view(shape)
        return y.squeeze(-1).transpose(1, 2)


def make_norm(kind: str, d: int) -> nn.Module:
    return {
        "ln": lambda: nn.LayerNorm(d),
        "rms": lambda: RMSNorm(d),
        "repbn": lambda: RepBN(d),
        "prepbn": lambda: PRepBN(d),
        "bn": lambda: ChannelBN(d),
        "un": lambda: UnifiedNormInference(d),
        "none": nn.Identity,
    }[kind]()


class Attention(nn.Module):
    def __init__(self, d, heads, causal=False, bias=True):
        super().__init__()
        self.h = heads
        self.qkv = nn.Linear(d, 3 * d, bias=bias)
        self.proj = nn.Linear(d, d, bias=bias)
        self.causal = causal

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(d // self.h)
        if self.causal:
            mask = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
            att = att.masked_fill(~mask, float("-inf"))
        y = att.softmax(-1) @ v
        return self.proj(y.transpose(1, 2).reshape(b, n, d))


class MLP(nn.Module):
    def __init__(self, d, hidden, gated=False, bias=True):
        super().__init__()
        self.gated = gated
        self.fc1 = nn.Linear(d, hidden, bias=bias)
        self.gate = nn.Linear(d, hidden, bias=bias) if gated else None
        self.fc2 = nn.Linear(hidden, d, bias=bias)

    def forward(self, x):
        if self.gated:
            return self.fc2(nn.functional.silu(self.gate(x)) * self.fc1(x))
        return self.fc2(nn.functional.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, d, heads, norm="ln", post_norm=False, causal=False, layer_scale=None, gated=False, bias=True,
                 time_major=False):
        super().__init__()
        self.time_major = time_major
        self.n1, self.n2 = make_norm(norm, d), make_norm(norm, d)
        self.attn = Attention(d, heads, causal, bias)
        self.mlp = MLP(d, 4 * d if not gated else int(8 * d / 3), gated, bias)
        self.post = post_norm
        self.ls1 = nn.Parameter(torch.full((d,), layer_scale)) if layer_scale else None
        self.ls2 = nn.Parameter(torch.full((d,), layer_scale)) if layer_scale else None

    def forward(self, x):
        if self.post:
            x = self.n1(x + self.attn(x))
            return self.n2(x + self.mlp(x))
        h = self.n1(x)
        a = self.attn(h.transpose(0, 1)).transpose(0, 1) if self.time_major else self.attn(h)
        x = x + (a * self.ls1 if self.ls1 is not None else a)
        m = self.mlp(self.n2(x))
        return x + (m * self.ls2 if self.ls2 is not None else m)


class Decoder(nn.Module):
    """GPT-style decoder: token + position embeddings, Pre-LN blocks, final norm, optional
    lm_head (tied to the token table when ``tied``)."""

    def __init__(self, layers=2, d=64, heads=4, vocab=256, max_seq=128, norm="ln", lm_head=False, tied=False,
                 layer_scale=None, post_norm=False, gated=False, bias=True, pos=True):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(max_seq, d) if pos else None
        self.blocks = nn.ModuleList(
            Block(d, heads, norm, post_norm, True, layer_scale, gated, bias) for _ in range(layers)
        )
        self.norm = make_norm(norm, d)
        self.head = nn.Linear(d, vocab, bias=False) if lm_head else None
        if lm_head and tied:
            self.head.weight = self.tok.weight

    def forward(self, input_ids):
        x = self.tok(input_ids)
        if self.pos is not None:
            x = x + self.pos.weight[: input_ids.shape[1]]
        for b in self.blocks:
            x = b(x)
        x = self.norm(x)
        return self.head(x) if self.head is not None else x


class Encoder(nn.Module):
    """ViT-style encoder: Conv patch embedding (or Dual PatchNorm: LN -> Linear -> LN on
    flattened patches), cls token, learned positions, Pre-norm blocks, final norm, and a head
    on the cls token (``pool='cls'``) or on the token mean (``pool='mean'``)."""

    def __init__(self, layers=2, d=64, heads=4, image=32, patch=8, channels=3, classes=10, norm="ln",
                 pool="cls", dual_patchnorm=False, layer_scale=None, patch_bn=False, post_norm=False, time_major=False):
        super().__init__()
        self.time_major = time_major
        self.patch = patch
        self.dual = dual_patchnorm
        n = (image // patch) ** 2
        if dual_patchnorm:
            pd = channels * patch * patch
            self.pre = nn.LayerNorm(pd)
            self.embed = nn.Linear(pd, d)
            self.post = nn.LayerNorm(d)
        else:
            self.embed = nn.Conv2d(channels, d, patch, patch)
            self.embed_bn = nn.BatchNorm2d(d) if patch_bn else None
        self.cls = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, n + (1 if pool == "cls" else 0), d) * 0.02)
        self.blocks = nn.ModuleList(Block(d, heads, norm, post_norm, False, layer_scale, time_major=time_major) for _ in range(layers))
        self.norm = make_norm(norm, d)
        self.pool = pool
        self.head = nn.Linear(d, classes)

    def forward(self, pixel_values):
        b, c, h, w = pixel_values.shape
        p = self.patch
        if self.dual:
            x = pixel_values.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // p) * (w // p), c * p * p)
            x = self.post(self.embed(self.pre(x)))
        else:
            x = self.embed(pixel_values)
            if self.embed_bn is not None:
                x = self.embed_bn(x)
            x = x.flatten(2).transpose(1, 2)
        if self.pool == "cls":
            x = torch.cat([self.cls.expand(b, -1, -1), x], dim=1)
        x = x + self.pos
        if self.time_major:  # fairseq layout: [T, B, C] through the blocks and the final norm
            x = x.transpose(0, 1)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        if self.time_major:
            x = x.transpose(0, 1)
        x = x[:, 0] if self.pool == "cls" else x.mean(1)
        return self.head(x)


@torch.no_grad()
def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give norms non-trivial parameters and statistics (gamma, beta, running stats, eta),
    so that every fold and conversion is exercised. Returns the model in eval mode."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.LayerNorm, RMSNorm)):
            m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
            if getattr(m, "bias", None) is not None:
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
            m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
            m.running_mean.copy_(0.3 * torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
        elif isinstance(m, RepBN):
            m.alpha.copy_(0.1 + 0.4 * torch.rand(1, generator=g))  # a distinct eta per layer
        elif isinstance(m, UnifiedNormInference):
            m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
            m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
            m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
    return model.eval()


@torch.no_grad()
def calibrate(model: nn.Module, inputs: dict, batches: int = 3, seed: int = 0) -> nn.Module:
    """Give BatchNorm and Unified Norm the statistics of the activations they see, as a
    trained model has (random statistics let activations grow layer after layer, and a deep
    random model then shows fp32 noise far above a real one's). BN: running mean/var gathered
    in train mode over a few random batches; UN: running_var = E[x^2] per channel. The
    parameters (gamma, beta, eta) stay as randomize() set them."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    uns = [m for m in model.modules() if isinstance(m, UnifiedNormInference)]
    if not bns and not uns:
        return model
    g = torch.Generator().manual_seed(seed)
    sums = {id(m): [0.0, 0] for m in uns}

    def hook(mod, args):
        x = args[0].detach().double()
        sq = (x * x).reshape(-1, x.shape[-1])
        acc = sums[id(mod)]
        acc[0] = acc[0] + sq.sum(0)
        acc[1] += sq.shape[0]

    handles = [m.register_forward_pre_hook(hook) for m in uns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.eval()
    for m in bns:
        m.train()
    for _ in range(batches):
        batch = {k: (torch.randn(v.shape, generator=g, dtype=v.dtype) if v.is_floating_point() else v) for k, v in inputs.items()}
        model(**batch)
    for h in handles:
        h.remove()
    for m in uns:
        total, n = sums[id(m)]
        m.running_var.copy_((total / n).float())
    return model.eval()


# ---------------------------------------------------------------------------------------------
# named configurations: tiny ones for tests, paper/benchmark shapes for benchmarks

SIZES = {
    "tiny": dict(layers=2, d=64, heads=4),
    "d192": dict(layers=12, d=192, heads=3),
    "d256": dict(layers=6, d=256, heads=4),
    "deit-s": dict(layers=12, d=384, heads=6),
    "gpt2-small": dict(layers=12, d=768, heads=12),
    "vit-b16": dict(layers=12, d=768, heads=12),
}


def gpt(size="tiny", **kw) -> Decoder:
    """Pre-LN GPT-style decoder."""
    cfg = dict(SIZES[size], vocab=50257 if size == "gpt2-small" else 256, max_seq=1024 if size == "gpt2-small" else 128)
    cfg.update(kw)
    return randomize(Decoder(**cfg))


def vit(size="tiny", **kw) -> Encoder:
    """Pre-LN ViT-style encoder (224/16 -> 197 tokens at benchmark sizes)."""
    cfg = dict(SIZES[size])
    if size != "tiny":
        cfg.update(image=224, patch=16, classes=1000)
    cfg.update(kw)
    model = randomize(Encoder(**cfg))
    return _calibrated(model) if cfg.get("patch_bn") else model


def _calibrated(model):
    from .export import example_inputs

    return calibrate(model, example_inputs(model, batch=4))


def slab(size="tiny", norm="repbn", **kw) -> Encoder:
    """SLAB-style encoder with RepBN (or PRepBN at inference) in both pre-norm positions and
    the final norm, mean-pooled like SLAB's DeiT; BN statistics calibrated."""
    return _calibrated(vit(size, norm=norm, pool="mean", **kw))


def unified(size="tiny", **kw) -> Encoder:
    """Unified-Norm transformer in its inference form, fairseq pre-norm layout (time-major)."""
    kw.setdefault("time_major", True)
    return _calibrated(vit(size, norm="un", pool="mean", **kw))


class NormAfterLinear(nn.Module):
    """Linear -> BatchNorm over channels -> GELU -> Linear (a BN with no linear reader, so it
    folds backward); with ``wrong_axis`` the BN normalizes the token axis of [B, N, C]
    (BatchNorm1d(N) applied directly), which no neighbouring linear op can absorb."""

    def __init__(self, d=32, tokens=16, wrong_axis=False):
        super().__init__()
        self.fc1 = nn.Linear(d, d)
        self.bn = nn.BatchNorm1d(tokens) if wrong_axis else ChannelBN(d)
        self.fc2 = nn.Linear(d, d)
        self.wrong = wrong_axis

    def forward(self, x):
        h = self.bn(self.fc1(x))
        return self.fc2(h if self.wrong else nn.functional.gelu(h))


def norm_after_linear(wrong_axis=False, d=32, tokens=16) -> NormAfterLinear:
    return _calibrated(randomize(NormAfterLinear(d, tokens, wrong_axis)))


def bert(size="tiny", **kw) -> Decoder:
    """Post-LN encoder with an embedding LN (BERT layout, no causal mask needed for tests)."""
    cfg = dict(SIZES[size], vocab=256, max_seq=128, post_norm=True)
    cfg.update(kw)
    return randomize(BertLike(**cfg))


def llama(size="tiny", **kw) -> Decoder:
    """LLaMA-style decoder: RMSNorm, gated SiLU MLP, no biases."""
    cfg = dict(SIZES[size], vocab=256, max_seq=128, norm="rms", gated=True, bias=False, pos=False)
    cfg.update(kw)
    return randomize(Decoder(**cfg))


class BertLike(nn.Module):
    def __init__(self, layers=2, d=64, heads=4, vocab=256, max_seq=128, post_norm=True, types=2):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(max_seq, d)
        self.typ = nn.Embedding(types, d)
        self.emb_norm = nn.LayerNorm(d)
        self.blocks = nn.ModuleList(Block(d, heads, "ln", post_norm=post_norm) for _ in range(layers))
        self.pool = nn.Linear(d, d)

    def forward(self, input_ids, token_type_ids):
        x = self.tok(input_ids) + self.typ(token_type_ids) + self.pos.weight[: input_ids.shape[1]]
        x = self.emb_norm(x)
        for b in self.blocks:
            x = b(x)
        return x, torch.tanh(self.pool(x[:, 0]))
