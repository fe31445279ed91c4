"""experiments.common: the optional TensorBoard event files beside the JSONL record, the
training loop's stop at a non-finite loss, and the --workdir check."""

import json
import os
import sys
import types
from typing import NamedTuple

import jax.numpy as jnp
import pytest

from experiments import common


class _FakeWriter:
  """Stands in for tensorboardX.SummaryWriter: records what the log sends it."""
  instances: list = []

  def __init__(self, logdir, purge_step=None):
    self.logdir, self.purge_step, self.scalars, self.closed = logdir, purge_step, [], False
    _FakeWriter.instances.append(self)

  def add_scalar(self, tag, value, step):
    self.scalars.append((tag, value, step))

  def close(self):
    self.closed = True


def test_scalars_go_to_tensorboard_when_asked(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorboardX", types.SimpleNamespace(SummaryWriter=_FakeWriter))
  log = common.MetricsLog(str(tmp_path / "run" / "metrics.jsonl"), str(tmp_path / "run" / "tb"))
  log.write({"kind": "train", "step": 2, "loss": 1.5, "flip_rate": 0.25, "note": "x"})
  log.write({"kind": "eval", "step": 4, "test_accuracy": 0.5})
  log.close()
  [w] = _FakeWriter.instances[-1:]
  assert w.logdir == str(tmp_path / "run" / "tb") and w.closed
  assert w.scalars == [("train/loss", 1.5, 2), ("train/flip_rate", 0.25, 2),
                       ("eval/test_accuracy", 0.5, 4)]
  # The JSONL log is still the record, unchanged.
  lines = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
  assert lines[0] == {"kind": "train", "step": 2, "loss": 1.5, "flip_rate": 0.25, "note": "x"}


def test_a_resumed_log_purges_the_interrupted_runs_events(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorboardX", types.SimpleNamespace(SummaryWriter=_FakeWriter))
  common.MetricsLog(str(tmp_path / "m.jsonl"), str(tmp_path / "tb"), purge_step=40).close()
  assert _FakeWriter.instances[-1].purge_step == 40


def test_without_tensorboardx_the_log_says_so_and_goes_on(tmp_path, monkeypatch, capsys):
  monkeypatch.setitem(sys.modules, "tensorboardX", None)   # import raises ImportError
  log = common.MetricsLog(str(tmp_path / "metrics.jsonl"), str(tmp_path / "tb"))
  log.write({"kind": "train", "step": 1, "loss": 2.0})
  log.close()
  out = capsys.readouterr().out
  assert out.count("tensorboardX is not installed (pip install tensorboardX)") == 1
  assert json.loads(open(tmp_path / "metrics.jsonl").read())["loss"] == 2.0


def test_no_writer_unless_asked(tmp_path):
  assert common.MetricsLog(str(tmp_path / "m.jsonl")).tb is None


class _State(NamedTuple):
  step: jnp.ndarray
  w: jnp.ndarray


def _loop(tmp_path, bad_at, *, log_every=100, checkpoint_every=2, steps=10, bad_w_at=10**6):
  """train_loop on a one-number 'model' whose loss is NaN from step ``bad_at`` on (and
  whose weight becomes Inf at step ``bad_w_at`` while the loss stays finite)."""
  def train_step(state, x):
    step = state.step + 1
    loss = jnp.where(step >= bad_at, jnp.nan, 1.0 / step)
    w = jnp.where(step >= bad_w_at, jnp.inf, state.w + x)
    return _State(step, w), {"loss": loss}

  cfg = common.LoopConfig(steps=steps, log_every=log_every, eval_every=100,
                          checkpoint_every=checkpoint_every)
  state = _State(jnp.int32(0), jnp.float32(0.0))
  return common.train_loop("toy", str(tmp_path), state, train_step,
                           lambda step: (jnp.float32(1.0),), lambda s: {}, cfg,
                           common.StopRequested())


def _saved_steps(tmp_path):
  return sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())


def test_a_non_finite_loss_stops_before_the_next_save_naming_the_step(tmp_path):
  # NaN from step 5: saves at 2 and 4 happened, the one due at step 6 must not.
  with pytest.raises(common.NonFiniteLoss) as e:
    _loop(tmp_path, bad_at=5)
  msg = str(e.value)
  assert "[toy] the training loss became nan at step 5 (seen at step 6)" in msg, msg
  assert "the last checkpoint is step 4" in msg and "--lr" in msg, msg
  assert _saved_steps(tmp_path) == [2, 4]
  assert isinstance(e.value, FloatingPointError)


def test_a_non_finite_loss_at_a_log_step_is_not_logged(tmp_path):
  with pytest.raises(common.NonFiniteLoss, match="nan at step 3 .seen at step 3.*step 2"):
    _loop(tmp_path, bad_at=3, log_every=1, checkpoint_every=2)
  steps = [json.loads(l)["step"] for l in open(tmp_path / "metrics.jsonl")]
  assert steps == [1, 2] and _saved_steps(tmp_path) == [2]


def test_a_non_finite_loss_before_any_save_says_none_was_written(tmp_path):
  with pytest.raises(common.NonFiniteLoss, match="at step 1 .*no checkpoint was written"):
    _loop(tmp_path, bad_at=1, checkpoint_every=3)
  assert _saved_steps(tmp_path) == []


def test_a_non_finite_state_behind_a_finite_loss_is_not_saved(tmp_path):
  with pytest.raises(common.NonFiniteLoss, match="state .* is not finite at step 4 although "
                     "the loss was; stopped before saving it: the last checkpoint is step 2"):
    _loop(tmp_path, bad_at=10**6, bad_w_at=3)
  assert _saved_steps(tmp_path) == [2]


def test_finite_losses_train_to_the_end(tmp_path):
  out = _loop(tmp_path, bad_at=10**6, steps=6, log_every=3)
  assert int(out["state"].step) == 6 and float(out["state"].w) == 6.0
  assert [r["step"] for r in out["records"] if r["kind"] == "train"] == [3, 6]
  assert _saved_steps(tmp_path) == [4, 6]


def test_workdir_problems_are_named(tmp_path, monkeypatch):
  f = tmp_path / "a_file"
  f.write_text("x")
  assert common.writable_directory_problem(str(tmp_path / "new" / "deeper")) is None
  assert "is a file, not a directory" in common.writable_directory_problem(str(f))
  assert "which is a file" in common.writable_directory_problem(str(f / "sub"))
  assert "is empty" in common.writable_directory_problem("")
  # Not writable (faked: the tests may run as root, whom permissions do not stop).
  monkeypatch.setattr(os, "access", lambda path, mode: False)
  msg = common.writable_directory_problem(str(tmp_path / "new"))
  assert "is not writable" in msg and str(tmp_path) in msg


def test_a_log_line_torn_by_a_kill_is_dropped_on_resume(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"kind": "train", "step": 2, "loss": 1.0}\n'
                  '{"kind": "train", "step": 4, "loss": 0.5}\n{"kind": "tr')   # killed here
  log = common.MetricsLog(str(path))
  assert [r["step"] for r in log.read()] == [2, 4]
  log.truncate(2)
  assert path.read_text() == '{"kind": "train", "step": 2, "loss": 1.0}\n'
  assert not os.path.exists(str(path) + ".tmp")
  path.write_text('{"kind": "train", "step": 2}\nnot json\n')
  with pytest.raises(json.JSONDecodeError):   # damage that no kill makes is not hidden
    log.read()
