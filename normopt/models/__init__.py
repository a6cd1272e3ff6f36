"""PyTorch builders and exporters of the models normopt is tested and benchmarked on
(needs the ``models`` extra: torch), and the torch-free LLM-shaped decoder writer
(normopt.models.llm). The torch parts load on first use, so the writer works without torch."""

_LAZY = {name: "builders" for name in ("bert", "gpt", "llama", "randomize", "slab", "unified", "vit")}
_LAZY.update(example_inputs="export", export="export")


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
