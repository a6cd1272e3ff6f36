"""The ordered pipeline. It reads like the papers: canonicalize; fold the redundant mean of
Pre-LN streams (Pre-RMSNorm, arXiv 2305.14858); fold inference-time affine norms (SLAB's
RepBN/PRepBN, BatchNorm, Unified Norm) into adjacent linear ops; tidy the layout ops left."""

from __future__ import annotations

from ..errors import NormoptError
from ..pipeline import Pipeline
from .cancel_layout import CancelLayoutPairs
from .crms import CompressRMSStreams
from .explicit_defaults import ExplicitDefaults
from .fold_affine import FoldAffineNorms
from .fold_constants import FoldConstants
from .fuse_skip import FuseSkipNorms
from .ln_to_rms import LayerNormToRMSNorm
from .remove_identity import RemoveIdentity
from .skip_layernorm import RefuseSkipLayerNorm, SplitSkipLayerNorm


def all_passes():
    """Every pass, in pipeline order."""
    return [
        # canonicalization that later passes rely on
        FoldConstants(),
        RemoveIdentity(),
        ExplicitDefaults(),
        SplitSkipLayerNorm(),
        # Pre-RMSNorm: LayerNorm -> RMSNorm on zero-mean residual streams
        LayerNormToRMSNorm(),
        # Pre-CRMSNorm (opt-in): zero-mean streams carried in d-1 channels
        CompressRMSStreams(),
        # what ln_to_rms left as LayerNorm goes back to the SkipLayerNormalization it came as
        RefuseSkipLayerNorm(),
        # SLAB / BatchNorm / Unified Norm: inference-time affine norms fold into linear ops
        FoldAffineNorms(),
        CancelLayoutPairs(),
        # emission: ORT's Skip ops where they measure faster on the provider
        FuseSkipNorms(),
    ]


def build_pipeline(names: list[str] | None = None, opt_in: list[str] | None = None) -> Pipeline:
    """The default pipeline, or the named passes (kept in pipeline order)."""
    passes = all_passes()
    numbering = ({p.name: i for i, p in enumerate(passes, 1)}, len(passes))
    known = {p.name for p in passes}
    if names:
        unknown = [n for n in names if n not in known]
        if unknown:
            raise NormoptError(f"unknown pass(es): {', '.join(unknown)}; see 'normopt passes'")
        passes = [p for p in passes if p.name in names]
    else:
        opt_in = set(opt_in or [])
        passes = [p for p in passes if not p.opt_in or p.name in opt_in]
    return Pipeline(passes, numbering)
