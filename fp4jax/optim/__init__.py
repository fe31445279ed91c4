"""Optax tools for low-precision training: oscillation metrics and control (TetraJet's
Q-EMA and Q-Ramping), low-precision optimizer states and FP8 gradients (Microsoft)."""

from fp4jax.optim.low_precision import (MS_AMP_FORMATS, QuantizedState, fp8_all_reduce_mean,
                                        quantize_gradients, quantize_state, state_nbytes)
from fp4jax.optim.oscillation import (OscillationState, find_state, flip_direction, flip_rate,
                                      mean_boundary_distance, oscillation_metrics,
                                      track_oscillation)
from fp4jax.optim.q_ema import QEmaState, q_ema, q_ema_reference
from fp4jax.optim.q_ramping import QRampingState, q_ramping, ramp_factors
from fp4jax.optim.weights import kernel_weights, quantized_weights

__all__ = ["MS_AMP_FORMATS", "OscillationState", "QEmaState", "QRampingState", "QuantizedState",
           "find_state", "flip_direction", "flip_rate", "fp8_all_reduce_mean",
           "kernel_weights", "mean_boundary_distance", "oscillation_metrics", "q_ema",
           "q_ema_reference", "q_ramping", "quantize_gradients", "quantize_state",
           "quantized_weights", "ramp_factors", "state_nbytes", "track_oscillation"]
