"""PyTorch builders and exporters of the models normopt is tested and benchmarked on
(needs the ``models`` extra: torch)."""

from .builders import bert, gpt, llama, randomize, slab, unified, vit  # noqa: F401
from .export import example_inputs, export  # noqa: F401
