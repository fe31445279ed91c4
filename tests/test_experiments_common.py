"""experiments.common: the optional TensorBoard event files beside the JSONL record."""

import json
import sys
import types

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
