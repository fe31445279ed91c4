"""experiments.vit_tetrajet end to end in a tiny configuration (subprocesses, as a user
runs it): outputs exist and parse, the loss decreases, --resume continues bit-exactly,
Ctrl-C saves a checkpoint, and bad flags exit non-zero with a clear message."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

import kill_resume
import shared_runs
from shared_runs import Completed
from experiments import common, vit_tetrajet as vt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--steps=8", "--log_every=2", "--eval_every=4", "--checkpoint_every=4",
        "--warmup=2", "--lr=3e-3", "--batch_size=64"]


def _run(*args, timeout=600):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "experiments.vit_tetrajet", *args], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=timeout)


def _records(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def compare_run(tmp_path_factory):
  """The tiny comparison the output, resume and kill tests share (once per session,
  :func:`shared_runs.once`)."""
  def make(base):
    p = _run("--compare=bf16,tetrajet+qema+qramp", f"--workdir={base / 'wd'}", *TINY)
    assert p.returncode == 0, p.stderr[-3000:]
    return Completed.record(p)

  base, p = shared_runs.once(tmp_path_factory, "vit_compare", make)
  return str(base / "wd"), Completed(p)


def test_outputs_exist_and_parse(compare_run):
  wd, p = compare_run
  cfg = json.load(open(os.path.join(wd, "config.json")))
  assert cfg["flags"]["steps"] == 8 and cfg["jax"] and cfg["device"].startswith("cpu")
  assert [r["name"] for r in cfg["runs"]] == ["bf16", "tetrajet+qema+qramp"]
  for run in ("bf16", "tetrajet+qema+qramp"):
    recs = _records(os.path.join(wd, run, "metrics.jsonl"))
    assert [r["step"] for r in recs if r["kind"] == "train"] == [2, 4, 6, 8]
    assert [r["step"] for r in recs if r["kind"] == "eval"] == [4, 8]
    final = json.load(open(os.path.join(wd, run, "final.json")))
    assert final["steps"] == 8 and 0.0 <= final["test_accuracy"] <= 1.0
  quant = _records(os.path.join(wd, "tetrajet+qema+qramp", "metrics.jsonl"))
  assert all(0.0 <= r["flip_rate"] <= 1.0 for r in quant if r["kind"] == "train")
  for png in ("accuracy.png", "loss.png", "oscillation.png"):
    with open(os.path.join(wd, png), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n", f"{png} is not a PNG"
  summary = open(os.path.join(wd, "summary.md")).read()
  assert "| tetrajet+qema+qramp | 8 |" in summary and "accuracy_gap_to_bf16" in summary
  assert "step 8/8" in p.stdout and "ex/s" in p.stdout, "progress line missing"
  assert "run 1/2 step" in p.stdout and "all runs ~" in p.stdout, "run i of N / overall ETA"
  assert f"summary: {os.path.abspath(os.path.join(wd, 'summary.md'))}" in p.stdout
  assert "Plots: accuracy.png, loss.png, oscillation.png." in summary
  # config.json holds every flag --help lists (derived from the flags, not a hand list).
  for name in ("format", "compare", "scan_layers", "steps", "lr", "batch_size", "workdir",
               "resume", "mesh", "seed", "grad_comm"):
    assert name in cfg["flags"], f"config.json lacks --{name}"


def test_help_lists_the_training_flags():
  p = _run("--help", timeout=120)
  for flag in ("--steps", "--lr", "--batch_size", "--workdir", "--[no]resume", "--mesh",
               "--seed", "--compare", "--format"):
    assert f"  {flag}:" in p.stdout, f"{flag} is not in --help"


@pytest.mark.parametrize("run", ["bf16", "tetrajet+qema+qramp"])
def test_loss_decreases(compare_run, run):
  wd, _ = compare_run
  train = [r["loss"] for r in _records(os.path.join(wd, run, "metrics.jsonl"))
           if r["kind"] == "train"]
  assert train[-1] < train[0], f"{run}: train loss did not decrease: {train}"


def test_resume_continues_bit_exactly(compare_run, tmp_path):
  # The uninterrupted run is compare_run's (shared: one fewer tiny training run, and the
  # stopped and resumed processes load its compiled step from the session's cache).
  straight, _ = compare_run
  run = "tetrajet+qema+qramp"   # Q-EMA and Q-Ramping state must survive the restart too
  resumed = str(tmp_path / "resumed")
  p = _run(f"--workdir={resumed}", f"--compare={run}", "--stop_at=3", *TINY)
  assert p.returncode == 0 and "stopped at step 3" in p.stdout, p.stderr[-3000:]
  p = _run(f"--workdir={resumed}", f"--compare={run}", "--resume", *TINY)
  assert p.returncode == 0 and "resumed from step 3" in p.stdout, p.stderr[-3000:]
  a = _records(os.path.join(straight, run, "metrics.jsonl"))
  b = _records(os.path.join(resumed, run, "metrics.jsonl"))
  assert a == b, "a resumed run's metrics differ from an uninterrupted run's"


def test_sigkill_anywhere_then_resume_equals_an_uninterrupted_run(compare_run, tmp_path):
  # Killed (SIGKILL: no handler runs) after logging step 2 (nothing saved yet), in the
  # middle of a checkpoint write, after step 6 of the second run and in the middle of its
  # last (waited-for) save; each time --resume continues from the last complete
  # checkpoint, and the logs and final metrics equal the uninterrupted compare_run's.
  straight, _ = compare_run
  runs = ["bf16", "tetrajet+qema+qramp"]
  wd = str(tmp_path / "killed")
  last, kills = kill_resume.run_with_kills(
      "experiments.vit_tetrajet", wd, [f"--compare={','.join(runs)}", *TINY],
      [("step", runs[0], 2), ("saving", runs[0]), ("step", runs[1], 6),
       ("saving", runs[1])])
  assert last.returncode == 0, last.stderr[-3000:]
  assert sum("mid-write" in k for k in kills) == 2, kills
  kill_resume.assert_same_runs(straight, wd, runs, kills)


def test_ctrl_c_saves_a_checkpoint(tmp_path):
  wd = str(tmp_path / "wd")
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  proc = subprocess.Popen([sys.executable, "-m", "experiments.vit_tetrajet", "--format=bf16",
                           f"--workdir={wd}", "--steps=100000", "--log_every=1",
                           "--checkpoint_every=100000"], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics = os.path.join(wd, "bf16", "metrics.jsonl")
  deadline = time.time() + 300
  while not (os.path.exists(metrics) and os.path.getsize(metrics) > 0):
    assert proc.poll() is None and time.time() < deadline, "training did not start"
    time.sleep(0.5)
  proc.send_signal(signal.SIGINT)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 130, err[-3000:]
  assert "checkpoint saved" in out
  summary = open(os.path.join(wd, "summary.md")).read()
  assert "oscillation.png" not in summary and "Plots: accuracy.png, loss.png." in summary
  steps = [d for d in os.listdir(os.path.join(wd, "bf16", "checkpoints")) if d.isdigit()]
  assert steps, "no checkpoint after Ctrl-C"
  assert os.path.exists(os.path.join(wd, "summary.md"))


def test_seeds_and_a_switch_with_q_ema_resume_bit_exactly(tmp_path):
  # Two seeds of TetraJet with Q-EMA, switched to BF16 GEMMs at step 4 of 8 (the Q-EMA
  # optimizer state carries on); stopped after the switch and resumed, each seed equals
  # its uninterrupted run.
  run = "tetrajet+qema+then_bf16@0.5"
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  p = _run(f"--compare={run}", "--seeds=2", f"--workdir={straight}", *TINY)
  assert p.returncode == 0, p.stderr[-3000:]
  assert "switching to bf16 for the last 4 steps" in p.stdout
  assert "run 4/4 step" not in p.stdout and "run 2/2 step" in p.stdout   # 1 run x 2 seeds
  assert _run(f"--compare={run}", "--seeds=2", f"--workdir={resumed}", "--stop_at=6",
              *TINY).returncode == 0
  p = _run(f"--compare={run}", "--seeds=2", f"--workdir={resumed}", "--resume", *TINY)
  assert p.returncode == 0 and p.stdout.count("resumed from step 6") == 2, p.stderr[-3000:]
  for seed in (0, 1):
    log = os.path.join(run, f"seed_{seed}", "metrics.jsonl")
    recs = _records(os.path.join(straight, log))
    assert recs == _records(os.path.join(resumed, log)), f"seed {seed}: resume not bit-exact"
    assert {"kind": "switch", "step": 4, "recipe": "bf16"} in recs
    # The summary's oscillation is the run's mean over its logged steps, not the last one.
    final = json.load(open(os.path.join(straight, run, f"seed_{seed}", "final.json")))
    logged = [r["oscillating"] for r in recs if r["kind"] == "train"]
    assert final["oscillating"] == pytest.approx(sum(logged) / len(logged))
    assert final["oscillating_last"] == logged[-1]
  summary = open(os.path.join(straight, "summary.md")).read()
  assert f"| {run} | 8 | 2 |" in summary and " ± " in summary and "run's mean" in summary


@pytest.mark.parametrize("args,message", [
    (["--format=fp5"], "unknown recipe or format 'fp5'"),
    (["--compare=bf16", "--switch_at=0.5"], "go together"),
    (["--compare=tetrajet+then_bf16@0.99", "--steps=8"], "is step 8 of 8"),
    (["--compare=tetrajet+then_fp9@0.5"], "unknown recipe or format 'fp9'"),
    (["--format=mxfp4", "--block_size=128"], "does not divide the width 64"),
    (["--compare=bf16,tetrajet+fast"], "unknown option"),
    (["--dataset=cifar10", "--data_dir=/nonexistent/cifar"], "is not a directory"),
    (["--model=vit_huge"], "--model='vit_huge' is unknown"),
    (["--format=fp8_e4m3_tensor", "--block_size=32"], "one scale per tensor, no blocks"),
])
def test_bad_flags_exit_with_a_clear_message(tmp_path, args, message):
  p = _run(f"--workdir={tmp_path}", *args, timeout=120)
  assert p.returncode != 0, f"{args} should fail"
  assert message in p.stderr + p.stdout, (p.stderr + p.stdout)[-2000:]
  # One line and a hint, not the whole --help (log lines from JAX aside).
  lines = [l for l in p.stderr.strip().splitlines() if not re.match(r"^[IWE]\d{4} ", l)]
  assert len(lines) <= 3 and "--help" in lines[-1], p.stderr[-2000:]


@pytest.mark.parametrize("name,recipe,qema,qramp", [
    ("bf16", "bf16", False, False), ("tetrajet+qema", "tetrajet", True, False),
    ("tetrajet+qramp+qema", "tetrajet", True, True), ("mxfp4", "mxfp4", False, False),
    ("nvfp4_2d", "nvfp4_2d", False, False)])
def test_parse_run(name, recipe, qema, qramp):
  r = vt.parse_run(name)
  assert (r.recipe.name, r.q_ema, r.q_ramping) == (recipe, qema, qramp)
  assert r.switch is None


def test_parse_run_with_a_switch():
  r = vt.parse_run("tetrajet+qema+then_mxfp8@480")
  assert r.q_ema and r.switch == common.SwitchSpec("mxfp8", "480")
  to = vt.switch_phase_run(r)
  assert to.recipe.name == "mxfp8" and to.q_ema and to.switch is None
  with pytest.raises(ValueError, match="need a quantized recipe"):
    vt.parse_run("bf16+then_fp8@0.5")


def test_block_size_override_reaches_every_operand():
  r = common.build_recipe("nvfp4", block_size=32)
  assert r.fwd_lhs.block_size == 32 and r.fwd_rhs.tile == (32, 32)
  assert r.dgrad_grad.rounding == "stochastic", "overrides keep the rest of the spec"
  # --block_size means what QuantSpec.with_block_size means: per-channel operands (msfp4's
  # weights) become blocks of that size; a per-tensor recipe has no blocks to resize.
  r = common.build_recipe("msfp4", block_size=16)
  assert r.fwd_rhs.granularity == "block" and r.fwd_rhs.block_size == 16
  with pytest.raises(ValueError, match="no blocks"):
    common.build_recipe("fp8", block_size=16)
