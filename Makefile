# `make run`: set up .venv and run the main job; `make test`: set up .venv and run the tests;
# `make test-gpu`: the GPU test command (tools/test_gpu.sh), on a GPU machine.
.PHONY: setup run test test-gpu report

setup:
	@tools/setup_venv.sh

run: setup
	.venv/bin/python -m experiments.vit_tetrajet --format=mxfp4 --compare=bf16 --workdir=runs/vit_tetrajet

report: setup
	.venv/bin/python -m fp4jax.report

test: setup
	.venv/bin/python -m pytest -q -n auto --durations=25 tests

# On a GPU machine with jax[cuda] installed (runs from the checkout, no venv): see the script.
test-gpu:
	tools/test_gpu.sh
