"""experiments.sweep end to end on a small grid, its Pareto front, and bad flags."""

import csv
import os
import subprocess
import sys

import pytest

from experiments import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, timeout=600):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "experiments.sweep", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def test_small_grid_end_to_end(tmp_path):
  wd = str(tmp_path / "sw")
  p = _run("--elements=e2m1", "--block_sizes=16,32,channel", "--scale_formats=e8m0,ue4m3",
           "--scale_modes=floor", "--roundings=nearest,stochastic", "--tensors=normal,weight",
           "--rows=32", "--capture_steps=3", f"--workdir={wd}")
  assert p.returncode == 0, p.stderr[-3000:]
  rows = list(csv.DictReader(open(os.path.join(wd, "sweep.csv"))))
  assert len(rows) == 2 * 3 * 2 * 2  # tensors x blocks x scale formats x roundings
  by = {(r["tensor"], r["block"], r["scale_format"], r["rounding"]): r for r in rows}
  mx = by[("normal", "32", "e8m0", "nearest")]
  assert float(mx["bits_per_element"]) == 4.25, "MXFP4 stores 4.25 bits per element"
  assert float(by[("normal", "16", "ue4m3", "nearest")]["bits_per_element"]) == 4.5
  # E2M1 with block scales on Gaussian data: about 18-21 dB (3 significant levels per binade).
  assert 16.0 < float(mx["snr_db"]) < 23.0, mx
  for key, r in by.items():  # stochastic rounding adds noise: lower SNR than nearest
    if key[3] == "nearest":
      sr = by[key[:3] + ("stochastic",)]
      assert float(sr["snr_db"]) < float(r["snr_db"]), (key, r, sr)
  for png in ("snr_normal.png", "snr_weight.png", "pareto.png"):
    assert open(os.path.join(wd, png), "rb").read(4) == b"\x89PNG", png
  summary = open(os.path.join(wd, "summary.md")).read()
  assert "| normal | 4.2500 |" in summary


def test_pareto_front():
  pts = [(4.25, 18.0), (4.5, 20.0), (4.5, 19.0), (5.0, 19.5), (6.0, 30.0), (4.25, 17.0)]
  assert sweep.pareto(pts) == [(4.25, 18.0), (4.5, 20.0), (6.0, 30.0)]


@pytest.mark.parametrize("args,message", [
    (["--tensors=normal,cauchy"], "unknown ['cauchy']"),
    (["--block_sizes=32,rows"], "positive integers or 'channel'"),
    (["--scale_formats=e8m0,fp16"], "unknown ['fp16']"),
    (["--elements=e2m1", "--block_sizes=48", "--tensors=normal"], "does not divide"),
    (["--elements=e9m9"], "e9m9"),
    (["--train", "--block_sizes=128", "--tensors=normal"], "do not divide the MLP"),
])
def test_bad_flags_exit_with_a_clear_message(tmp_path, args, message):
  p = _run(f"--workdir={tmp_path}", *args, timeout=120)
  assert p.returncode != 0
  assert message in p.stderr + p.stdout, (p.stderr + p.stdout)[-2000:]


def test_train_mode_writes_the_training_front(tmp_path):
  wd = str(tmp_path / "sw")
  p = _run("--elements=e2m1", "--block_sizes=16,32", "--scale_formats=e8m0",
           "--scale_modes=floor", "--roundings=nearest", "--tensors=normal", "--rows=16",
           "--train", "--train_steps=20", f"--workdir={wd}")
  assert p.returncode == 0, p.stderr[-3000:]
  rows = list(csv.DictReader(open(os.path.join(wd, "train.csv"))))
  assert [(r["block"], float(r["bits_per_element"])) for r in rows] == [("16", 4.5),
                                                                         ("32", 4.25)]
  assert all(0.0 < float(r["test_loss"]) < 2.5 for r in rows), rows  # chance is ln 10 = 2.30
  assert open(os.path.join(wd, "pareto_train.png"), "rb").read(4) == b"\x89PNG"
  assert "MLP training (test loss)" in open(os.path.join(wd, "summary.md")).read()
