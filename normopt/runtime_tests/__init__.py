"""The ONNX Runtime harness: inputs from the model signature, equivalence and latency."""

from .equivalence import EquivalenceResult, compare  # noqa: F401
from .inputs import InputOptions, make_feeds  # noqa: F401
from .latency import BenchResult, bench  # noqa: F401
from .providers import make_session, providers_for  # noqa: F401
