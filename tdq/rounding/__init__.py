"""Weight rounding beyond round-to-nearest: clipping search, GPTQ, AdaRound, BRECQ block reconstruction, corrections.

Sits above `tdq.quant` and `tdq.api` and below mixed precision and sampling. Every method leaves a layer's
weight on its `WeightQuantizer` grid (or leaves rounding to the quantizer), so saved states and integer backends
see ordinary integer codes.
"""

from tdq.rounding.adaround import (
    PairedStats,
    adaround_codes,
    adaround_layer_,
    collect_paired_stats,
    reconstruct_,
)
from tdq.rounding.api import apply_weight_rounding, calibrate_with_rounding, finish_adaround_, finish_brecq_
from tdq.rounding.brecq import brecq_reconstruct_, collect_unit_data, find_units, reconstruct_unit_
from tdq.rounding.calib_stats import LayerStats, collect_layer_stats, layer_input_rows
from tdq.rounding.clipping import search_clipping_
from tdq.rounding.gptq import column_grid, gptq_codes, gptq_layer_, output_error, set_weight_codes_

__all__ = [
    "LayerStats",
    "PairedStats",
    "adaround_codes",
    "adaround_layer_",
    "collect_paired_stats",
    "finish_adaround_",
    "finish_brecq_",
    "brecq_reconstruct_",
    "collect_unit_data",
    "find_units",
    "reconstruct_unit_",
    "reconstruct_",
    "apply_weight_rounding",
    "calibrate_with_rounding",
    "collect_layer_stats",
    "column_grid",
    "gptq_codes",
    "gptq_layer_",
    "layer_input_rows",
    "output_error",
    "search_clipping_",
    "set_weight_codes_",
]
