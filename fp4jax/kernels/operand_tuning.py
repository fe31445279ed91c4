"""Measured choices for GEMM-ready operands, per GPU kind: written by
``python -m kernels.bench_operand --tune`` (do not edit by hand; re-run it on the GPU).

``TABLE[device_kind][key]`` with ``key`` = ``"<orientation>/<rounding>"`` (``rows``,
``cols``, ``both``; ``nearest``, ``stochastic``): ``{"emitter": "pallas", "config":
[block_rows, block_cols, num_warps, num_stages]}`` (the operand kernel with that tile),
``{"emitter": "xla"}`` (XLA's fusion was faster) or, for ``both``, ``{"emitter":
"separate"}`` (two launches were faster than one). ``"ms"`` holds what was timed.
``"kernel_ieee_subnormals"``: the kernel's one-multiply variant was bit-exact there (up
to NaN payload) on inputs with subnormal elements and scales, i.e. Triton's float32
multiply keeps subnormals; the dispatch then runs it. ``"generation"``: the GPU's compute
capability major (9: Hopper). A kind missing here takes the table of a measured kind of
the same generation (an H100 the H200's: same SMs and Triton code, so the same tiles are a
fair guess, and the one-multiply variant was checked bit-exact on an H100 too, before
and after the SR low-step change: ``kernels/results/operand_sr_nvidia_h100_80gb_hbm3*``), else
the kernel's defaults and the variant exact on any backend.

The NVIDIA H200 tiles were timed with the exact-anywhere variant (the tuner then timed
only that one); ``kernel_ieee_subnormals`` comes from the same run's checks
(``kernels/results/operand_nvidia_h200.json``, ``kernel_mismatches``); its
``"generation"`` was added by hand (the tuner now writes it).
"""

TABLE: dict = {'NVIDIA H200': {'both/nearest': {'config': [32, 64, 4, 1],
                                  'emitter': 'pallas',
                                  'ms': {'32x128w4': 1.281,
                                         '32x128w8': 1.2612,
                                         '32x256w8': 1.6279,
                                         '32x64w2': 1.2911,
                                         '32x64w4': 1.1088,
                                         '64x128w8': 1.7972,
                                         '64x64w4': 1.4029,
                                         'xla': 1.4151}},
                 'both/stochastic': {'config': [32, 64, 4, 1],
                                     'emitter': 'pallas',
                                     'ms': {'32x128w4': 2.4127,
                                            '32x128w8': 2.0149,
                                            '32x256w8': 2.4067,
                                            '32x64w2': 2.4265,
                                            '32x64w4': 1.9014,
                                            '64x128w8': 2.742,
                                            '64x64w4': 2.6889,
                                            'xla': 2.0892}},
                 'cols/nearest': {'config': [32, 128, 4, 1],
                                  'emitter': 'pallas',
                                  'ms': {'32x128w4': 0.5814,
                                         '32x128w8': 0.5921,
                                         '32x256w4': 0.6697,
                                         '32x256w8': 0.6306,
                                         '32x64w4': 0.5887,
                                         '64x128w8': 0.7426,
                                         '64x256w8': 0.9698,
                                         '64x64w4': 0.6832,
                                         'xla': 0.9228}},
                 'cols/stochastic': {'config': [32, 64, 4, 1],
                                     'emitter': 'pallas',
                                     'ms': {'32x128w4': 0.9999,
                                            '32x128w8': 1.0206,
                                            '32x256w4': 1.1877,
                                            '32x256w8': 1.002,
                                            '32x64w4': 0.9963,
                                            '64x128w8': 1.3229,
                                            '64x256w8': 1.2153,
                                            '64x64w4': 1.3065,
                                            'xla': 1.3619}},
                 'generation': 9,
                 'kernel_ieee_subnormals': True,
                 'rows/nearest': {'config': [32, 128, 4, 1],
                                  'emitter': 'pallas',
                                  'ms': {'16x256w4': 0.5349,
                                         '16x512w8': 0.5294,
                                         '32x128w4': 0.529,
                                         '32x256w4': 0.5296,
                                         '32x256w8': 0.53,
                                         '32x512w8': 0.5334,
                                         '64x256w8': 0.5381,
                                         '8x512w4': 0.5339,
                                         'xla': 0.5772}},
                 'rows/stochastic': {'config': [16, 256, 4, 1],
                                     'emitter': 'pallas',
                                     'ms': {'16x256w4': 0.9555,
                                            '16x512w8': 0.9633,
                                            '32x128w4': 0.9644,
                                            '32x256w4': 1.1394,
                                            '32x256w8': 0.9597,
                                            '32x512w8': 1.0865,
                                            '64x256w8': 1.0841,
                                            '8x512w4': 0.9638,
                                            'xla': 1.0213}}}}
