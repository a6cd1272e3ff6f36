"""Export helpers: torch.onnx.export with the TorchScript exporter (``dynamo=False``) or the
dynamo exporter (``dynamo=True``, which writes external data), opset 17 by default."""

from __future__ import annotations

import contextlib
import inspect
import io
import os
import warnings

import torch


def example_inputs(model, batch=1, seq=16, image=None):
    """Example inputs for the builders in normopt.models.builders."""
    from .builders import BertLike, Decoder, Encoder, NormAfterLinear

    if isinstance(model, NormAfterLinear):
        return {"x": torch.randn(batch, model.bn.num_features if model.wrong else seq, model.fc1.in_features)}

    if isinstance(model, Encoder):
        size = image or (model.patch * int(round((model.pos.shape[1] - (1 if model.pool == "cls" else 0)) ** 0.5)))
        return {"pixel_values": torch.randn(batch, 3, size, size)}
    if isinstance(model, BertLike):
        return {
            "input_ids": torch.randint(0, model.tok.num_embeddings, (batch, seq)),
            "token_type_ids": torch.randint(0, model.typ.num_embeddings, (batch, seq)),
        }
    if isinstance(model, Decoder):
        return {"input_ids": torch.randint(0, model.tok.num_embeddings, (batch, seq))}
    raise TypeError(f"no example inputs for {type(model).__name__}")


def export(model, inputs: dict, path: str, opset: int = 17, dynamo: bool = False, output_names=None,
           dynamic_axes: dict | None = None, fp16: bool = False, quiet: bool = True, fold: bool = True) -> str:
    """Export ``model(**inputs)`` to ``path``. Returns the path.

    fold=False turns off the TorchScript exporter's constant folding, which otherwise fuses
    an eval BatchNorm into the Conv before it (to test that normopt does that fold)."""
    model = model.eval()
    if fp16:
        model = model.half()
        inputs = {k: (v.half() if v.is_floating_point() else v) for k, v in inputs.items()}
    names = list(inputs)
    args = tuple(inputs.values())
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    sink = io.StringIO()
    with warnings.catch_warnings(), torch.no_grad(), (contextlib.redirect_stdout(sink) if quiet else contextlib.nullcontext()), (contextlib.redirect_stderr(sink) if quiet else contextlib.nullcontext()):
        warnings.simplefilter("ignore")
        if dynamo:
            dyn = None
            if dynamic_axes:
                # a tuple matching the positional inputs (works for *args wrappers too); axes that
                # share a name share one torch.export.Dim, so the signature keeps the relations.
                # torch.export derives a Dim only by adding an integer: a "past + new" axis (a KV
                # cache's mask) becomes its own Dim named total_sequence_length, onnxruntime-genai's
                # name, which normopt's input defaults read as past + sequence
                dims = {}

                def dim(name, size):
                    if size <= 1:
                        return torch.export.Dim.AUTO  # a size-1 example dim may specialize
                    if "+" in name:
                        name = "total_sequence_length" if "past" in name else "_".join(p.strip() for p in name.split("+"))
                    return dims.setdefault(name, torch.export.Dim(name))

                dyn = tuple({ax: dim(nm, inputs[k].shape[ax]) for ax, nm in dynamic_axes.get(k, {}).items()} or None for k in names)
                params = inspect.signature(model.forward).parameters.values()
                if any(p.kind == p.VAR_POSITIONAL for p in params):
                    dyn = (dyn,)  # forward(*args): the args tuple is one positional input
            torch.onnx.export(model, args, path, input_names=names, output_names=output_names, opset_version=opset,
                              dynamo=True, dynamic_shapes=dyn, external_data=True)
        else:
            torch.onnx.export(model, args, path, input_names=names, output_names=output_names, opset_version=opset,
                              dynamo=False, dynamic_axes=dynamic_axes, do_constant_folding=fold)
    return path
