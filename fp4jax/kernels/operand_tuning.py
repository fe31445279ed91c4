"""Measured choices for GEMM-ready operands, per GPU kind: written by
``python -m kernels.bench_operand --tune`` (do not edit by hand; re-run it on the GPU).

``TABLE[device_kind][key]`` with ``key`` = ``"<orientation>/<rounding>"`` (``rows``,
``cols``, ``both``; ``nearest``, ``stochastic``): ``{"emitter": "pallas", "config":
[block_rows, block_cols, num_warps, num_stages]}`` (the operand kernel with that tile),
``{"emitter": "xla"}`` (XLA's fusion was faster) or, for ``both``, ``{"emitter":
"separate"}`` (two launches were faster than one). ``"ms"`` holds what was timed.
A kind missing here takes the kernel's defaults.
"""

TABLE: dict = {}
