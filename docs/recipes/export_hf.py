"""Export a Hugging Face causal LM (GPT-2, GPT-NeoX, OPT, ...) to ONNX for normopt.

    python export_hf.py gpt2 gpt2.onnx                 # a checkpoint name or a local folder
    python export_hf.py gpt2 gpt2.onnx --dynamo        # torch's dynamo exporter (opset 18)
    python export_hf.py --tiny gpt_neox tiny.onnx      # a tiny random-init config (what the tests run)

The model is wrapped so that the exported signature is exactly (input_ids, attention_mask) ->
logits, which keeps the recipe stable across transformers versions: under transformers 5 the
second positional argument of GPT-2's forward is the KV cache (so the mask is passed by keyword),
GPT-NeoX builds a cache unless use_cache=False, and exporting with keyword arguments straight
into the model adds a `logits_to_keep` input.
"""

import argparse

import torch
import transformers as T


class Logits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def tiny(model_type: str):
    """A small random-init model of the given transformers model_type."""
    cfg = T.AutoConfig.for_model(model_type, vocab_size=128, hidden_size=32, n_embd=32, num_hidden_layers=2, n_layer=2,
                                 num_attention_heads=2, n_head=2, intermediate_size=64, max_position_embeddings=64,
                                 n_positions=64, ffn_dim=64, word_embed_proj_dim=32)
    torch.manual_seed(0)
    return T.AutoModelForCausalLM.from_config(cfg)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="checkpoint name or folder (or, with --tiny, a model_type: gpt2, gpt_neox, opt)")
    ap.add_argument("out", help="the .onnx file to write")
    ap.add_argument("--tiny", action="store_true", help="a tiny random-init config of that model_type")
    ap.add_argument("--dynamo", action="store_true", help="torch's dynamo exporter (opset 18) instead of TorchScript")
    ap.add_argument("--seq", type=int, default=16)
    a = ap.parse_args(argv)
    model = tiny(a.model) if a.tiny else T.AutoModelForCausalLM.from_pretrained(a.model)
    wrapped = Logits(model.eval())
    ids = torch.randint(0, model.config.vocab_size, (1, a.seq))
    mask = torch.ones(1, a.seq, dtype=torch.int64)
    names = dict(input_names=["input_ids", "attention_mask"], output_names=["logits"])
    with torch.no_grad():
        if a.dynamo:
            # opset 18: at 17 the dynamo exporter writes a Split with num_outputs, which ONNX rejects;
            # one named Dim keeps the two inputs' sequence lengths equal in the signature
            seq = torch.export.Dim("sequence_length")
            torch.onnx.export(wrapped, (ids, mask), a.out, opset_version=18, dynamo=True,
                              dynamic_shapes=({1: seq}, {1: seq}), **names)
        else:
            dyn = {0: "batch_size", 1: "sequence_length"}
            torch.onnx.export(wrapped, (ids, mask), a.out, opset_version=17, dynamo=False,
                              dynamic_axes={"input_ids": dyn, "attention_mask": dyn, "logits": dyn}, **names)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
