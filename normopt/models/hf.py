"""HF transformers models built from configs with random weights (nothing is downloaded),
exported to ONNX.

``export_hf(kind, path, ...)`` with kind in: gpt2, gpt2-lm (tied lm_head), vit, dinov2
(LayerScale, a position table resized at run time), deit, beit (relative position bias),
vitmae (a random patch shuffle), levit (BatchNorm after its Linears), opt (Pre-LN), bert, llama, clip-vision (pooler output or last_hidden_state), whisper-encoder, and the
KV-cache decoders gpt2-lm-past and opt-lm-past (inputs input_ids, attention_mask over past +
new tokens, past_key_values.{i}.key|value; outputs logits, present.{i}.key|value, as Optimum
names them). Configs are small by default; pass ``config=dict(...)`` to override.
With transformers 5.x, GPT-2 needs ``attention_mask`` for the TorchScript exporter, so the
GPT-2 and OPT exports take it as an input (an int input: pass ``--int-range attention_mask=1:2``
or ``0:2`` to the harness).
"""

from __future__ import annotations

import torch

from .export import export

SMALL = dict(hidden=64, layers=2, heads=4)


def _wrap(fn):
    class Wrapper(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, *args):
            return fn(self.model, *args)

    return Wrapper


def build_hf(kind: str, config: dict | None = None, seed: int = 0):
    """(module, example inputs dict, output names) for an HF model with random weights."""
    import transformers as T

    torch.manual_seed(seed)
    c = dict(config or {})
    h, L, H = c.pop("hidden", SMALL["hidden"]), c.pop("layers", SMALL["layers"]), c.pop("heads", SMALL["heads"])
    b, s = c.pop("batch", 1), c.pop("seq", 16)
    ids = lambda vocab: torch.randint(0, vocab, (b, s))  # noqa: E731
    mask = torch.ones(b, s, dtype=torch.int64)
    if kind in ("gpt2", "gpt2-lm"):
        cfg = T.GPT2Config(n_embd=h, n_layer=L, n_head=H, vocab_size=c.pop("vocab", 512), n_positions=c.pop("positions", 128), **c)
        cfg.use_cache = False
        if kind == "gpt2":
            m = T.GPT2Model(cfg)
            mod = _wrap(lambda m, i, a: m(input_ids=i, attention_mask=a, use_cache=False).last_hidden_state)(m)
            out = ["last_hidden_state"]
        else:
            m = T.GPT2LMHeadModel(cfg)
            mod = _wrap(lambda m, i, a: m(input_ids=i, attention_mask=a, use_cache=False).logits)(m)
            out = ["logits"]
        return mod.eval(), {"input_ids": ids(cfg.vocab_size), "attention_mask": mask}, out
    if kind == "opt":
        cfg = T.OPTConfig(hidden_size=h, num_hidden_layers=L, num_attention_heads=H, ffn_dim=4 * h, word_embed_proj_dim=h,
                          vocab_size=c.pop("vocab", 512), max_position_embeddings=c.pop("positions", 128), do_layer_norm_before=True, **c)
        m = T.OPTModel(cfg)
        mod = _wrap(lambda m, i, a: m(input_ids=i, attention_mask=a, use_cache=False).last_hidden_state)(m)
        return mod.eval(), {"input_ids": ids(cfg.vocab_size), "attention_mask": mask}, ["last_hidden_state"]
    if kind in ("gpt2-lm-past", "opt-lm-past"):
        past_len = c.pop("past", 3)
        if kind == "gpt2-lm-past":
            cfg = T.GPT2Config(n_embd=h, n_layer=L, n_head=H, vocab_size=c.pop("vocab", 512), n_positions=c.pop("positions", 128), **c)
            m = T.GPT2LMHeadModel(cfg)
        else:
            cfg = T.OPTConfig(hidden_size=h, num_hidden_layers=L, num_attention_heads=H, ffn_dim=4 * h, word_embed_proj_dim=h,
                              vocab_size=c.pop("vocab", 512), max_position_embeddings=c.pop("positions", 128),
                              do_layer_norm_before=True, **c)
            m = T.OPTForCausalLM(cfg)
        hd = h // H

        def step(m, i, a, *past):
            from transformers.cache_utils import DynamicCache

            cache = DynamicCache()
            for layer in range(L):
                cache.update(past[2 * layer], past[2 * layer + 1], layer)
            out = m(input_ids=i, attention_mask=a, past_key_values=cache, use_cache=True)
            present = out.past_key_values
            return (out.logits,) + tuple(t for layer in present.layers for t in (layer.keys, layer.values))

        inputs = {"input_ids": ids(cfg.vocab_size), "attention_mask": torch.ones(b, past_len + s, dtype=torch.int64)}
        for layer in range(L):
            for kv in ("key", "value"):
                inputs[f"past_key_values.{layer}.{kv}"] = torch.randn(b, H, past_len, hd)
        outs = ["logits"] + [f"present.{layer}.{kv}" for layer in range(L) for kv in ("key", "value")]
        return _wrap(step)(m).eval(), inputs, outs
    if kind == "bert":
        cfg = T.BertConfig(hidden_size=h, num_hidden_layers=L, num_attention_heads=H, intermediate_size=4 * h, vocab_size=c.pop("vocab", 512), **c)
        m = T.BertModel(cfg)
        mod = _wrap(lambda m, i, t: tuple(m(input_ids=i, token_type_ids=t, return_dict=True).values()))(m)
        return mod.eval(), {"input_ids": ids(cfg.vocab_size), "token_type_ids": torch.zeros(b, s, dtype=torch.int64)}, ["last_hidden_state", "pooler_output"]
    if kind == "llama":
        cfg = T.LlamaConfig(hidden_size=h, num_hidden_layers=L, num_attention_heads=H, num_key_value_heads=H, intermediate_size=2 * h,
                            vocab_size=c.pop("vocab", 512), max_position_embeddings=128, **c)
        m = T.LlamaModel(cfg)
        mod = _wrap(lambda m, i: m(input_ids=i, use_cache=False).last_hidden_state)(m)
        return mod.eval(), {"input_ids": ids(cfg.vocab_size)}, ["last_hidden_state"]
    if kind == "vit":
        img, p = c.pop("image", 32), c.pop("patch", 8)
        cfg = T.ViTConfig(hidden_size=h, num_hidden_layers=L, num_attention_heads=H, intermediate_size=4 * h, image_size=img, patch_size=p, **c)
        m = T.ViTModel(cfg, add_pooling_layer=False)
        mod = _wrap(lambda m, x: m(pixel_values=x).last_hidden_state)(m)
        return mod.eval(), {"pixel_values": torch.randn(b, 3, img, img)}, ["last_hidden_state"]
    if kind == "dinov2":
        # LayerScale, and a position table Resized (bicubic) to the image's patch grid at run time
        img, p = c.pop("image", 56), c.pop("patch", 14)
        cfg = T.Dinov2Config(hidden_size=h, num_hidden_layers=L, num_attention_heads=H, intermediate_size=4 * h, image_size=img,
                             patch_size=p, layerscale_value=c.pop("layerscale", 0.5), **c)
        m = T.Dinov2Model(cfg)
        mod = _wrap(lambda m, x: m(pixel_values=x).last_hidden_state)(m)
        return mod.eval(), {"pixel_values": torch.randn(b, 3, img, img)}, ["last_hidden_state"]
    if kind in ("deit", "beit", "vitmae"):
        # DeiT: a zero cls and distillation token; BEiT: LayerScale and a relative position bias
        # table gathered per layer; ViT-MAE: a random shuffle of the patches (RandomUniformLike)
        img, p = c.pop("image", 32), c.pop("patch", 8)
        common = dict(hidden_size=h, num_hidden_layers=L, num_attention_heads=H, intermediate_size=4 * h, image_size=img, patch_size=p)
        if kind == "deit":
            m = T.DeiTModel(T.DeiTConfig(**common, **c), add_pooling_layer=False)
        elif kind == "beit":
            m = T.BeitModel(T.BeitConfig(**common, layer_scale_init_value=0.5, use_relative_position_bias=True, use_mean_pooling=False, **c),
                            add_pooling_layer=False)
        else:
            m = T.ViTMAEModel(T.ViTMAEConfig(**common, mask_ratio=0.0, **c))
        mod = _wrap(lambda m, x: m(pixel_values=x).last_hidden_state)(m)
        return mod.eval(), {"pixel_values": torch.randn(b, 3, img, img)}, ["last_hidden_state"]
    if kind == "levit":
        # BatchNorm in the transformer: Linear -> BatchNorm1d over the flattened tokens, and Conv+BN stems
        img = c.pop("image", 64)
        cfg = T.LevitConfig(image_size=img, hidden_sizes=[32, 48], num_attention_heads=[2, 3], depths=[1, 1], key_dim=[8, 8],
                            patch_size=16, down_ops=[["Subsample", 8, 2, 4, 2, 2]], **c)
        m = T.LevitModel(cfg)
        with torch.no_grad():  # non-trivial running statistics, as a trained model has
            g = torch.Generator().manual_seed(seed)
            for bn in (x for x in m.modules() if isinstance(x, torch.nn.BatchNorm1d | torch.nn.BatchNorm2d)):
                bn.running_mean.copy_(0.3 * torch.randn(bn.running_mean.shape, generator=g))
                bn.running_var.copy_(0.5 + torch.rand(bn.running_var.shape, generator=g))
                bn.weight.copy_(1 + 0.2 * torch.randn(bn.weight.shape, generator=g))
        mod = _wrap(lambda m, x: m(pixel_values=x).last_hidden_state)(m)
        return mod.eval(), {"pixel_values": torch.randn(b, 3, img, img)}, ["last_hidden_state"]
    if kind in ("clip-vision", "clip-vision-hidden"):
        img, p = c.pop("image", 32), c.pop("patch", 8)
        cfg = T.CLIPVisionConfig(hidden_size=h, num_hidden_layers=L, num_attention_heads=H, intermediate_size=4 * h, image_size=img, patch_size=p, **c)
        m = T.CLIPVisionModel(cfg)
        if kind == "clip-vision":
            mod = _wrap(lambda m, x: m(pixel_values=x).pooler_output)(m)
            out = ["pooler_output"]
        else:
            mod = _wrap(lambda m, x: m(pixel_values=x).last_hidden_state)(m)
            out = ["last_hidden_state"]
        return mod.eval(), {"pixel_values": torch.randn(b, 3, img, img)}, out
    if kind == "whisper-encoder":
        frames = c.pop("frames", 32)
        cfg = T.WhisperConfig(d_model=h, encoder_layers=L, encoder_attention_heads=H, decoder_layers=1, decoder_attention_heads=H,
                              encoder_ffn_dim=4 * h, decoder_ffn_dim=4 * h, num_mel_bins=c.pop("mels", 16), max_source_positions=frames // 2, **c)
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        m = WhisperEncoder(cfg)
        mod = _wrap(lambda m, x: m(input_features=x).last_hidden_state)(m)
        return mod.eval(), {"input_features": torch.randn(b, cfg.num_mel_bins, frames)}, ["last_hidden_state"]
    raise ValueError(f"unknown HF model kind '{kind}'")


@torch.no_grad()
def randomize_norms(module, seed=0):
    """Non-trivial LN gamma/beta so conversions and beta folds are exercised."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.LayerNorm) and m.weight is not None:
            m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
            if m.bias is not None:
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
    return module


def export_hf(kind: str, path: str, config: dict | None = None, opset: int | None = None, dynamo: bool = False, fp16: bool = False,
              dynamic: bool = True) -> str:
    """Export with TorchScript (default opset 17) or dynamo (default opset 18: torch's dynamo
    exporter writes at 17 a Split with num_outputs that ONNX rejects)."""
    if opset is None:
        opset = 18 if dynamo else 17
    mod, inputs, outs = build_hf(kind, config)
    randomize_norms(mod)
    axes = None
    if dynamic:
        axes = {}
        for k, v in inputs.items():
            if k in ("pixel_values", "input_features"):
                axes[k] = {0: "batch_size"}
            elif k.startswith("past_key_values"):
                axes[k] = {0: "batch_size", 2: "past_sequence_length"}
            elif k == "attention_mask" and kind.endswith("-past"):
                axes[k] = {0: "batch_size", 1: "past_sequence_length + sequence_length"}
            else:
                axes[k] = {0: "batch_size", 1: "sequence_length"}
    return export(mod, inputs, path, opset=opset, dynamo=dynamo, output_names=outs, dynamic_axes=axes, fp16=fp16)
