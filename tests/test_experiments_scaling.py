"""experiments.scaling on 8 host CPU devices in a tiny configuration: it runs every
configuration, writes the JSON and plot, and computes scaling efficiency correctly."""

import json
import os
import subprocess
import sys

import pytest

from experiments import scaling

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_scaling_writes_rows_for_every_configuration(tmp_path):
  out = str(tmp_path / "scaling_cpu.json")
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  p = subprocess.run([sys.executable, "-m", "experiments.scaling", "--meshes=data:1;data:2",
                      "--models=gpt_tiny", "--recipes=bf16", "--grad_comms=f32,fp8_e4m3",
                      "--reps=1", "--batch_per_device=8", "--context=32", f"--out={out}"],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert p.returncode == 0, p.stderr[-3000:]
  res = json.load(open(out))
  rows = [(r["mesh"], r["grad_comm"], r["devices"], r["batch"]) for r in res["rows"]]
  # FP8 communication on one device has nothing to send: skipped.
  assert rows == [("data:1", "f32", 1, 8), ("data:2", "f32", 2, 16),
                  ("data:2", "fp8_e4m3", 2, 16)]
  assert res["rows"][0]["scaling_efficiency"] == 1.0
  for r in res["rows"]:
    assert r["step_ms"] > 0 and r["examples_per_s"] == pytest.approx(r["batch"] / r["step_ms"] * 1e3)
  assert "shard_map, gradients fp8_e4m3" in res["rows"][2]["parallel"]
  assert open(out.replace(".json", ".png"), "rb").read(4) == b"\x89PNG"


@pytest.mark.parametrize("rows,expected", [
    ([{"model": "m", "recipe": "r", "devices": 1, "examples_per_s": 100.0},
      {"model": "m", "recipe": "r", "devices": 2, "examples_per_s": 180.0},
      {"model": "m", "recipe": "q", "devices": 2, "examples_per_s": 50.0},
      {"model": "m", "recipe": "q", "devices": 4, "examples_per_s": 100.0}],
     [1.0, 0.9, 1.0, 1.0]),
])
def test_with_efficiency(rows, expected):
  got = [r["scaling_efficiency"] for r in scaling.with_efficiency(rows)]
  assert got == pytest.approx(expected)


def test_unknown_model_names_the_choices():
  with pytest.raises(ValueError, match="unknown model 'vit_huge'; ViT: vit_digits"):
    scaling._model("vit_huge", None)
