"""The metric files on resume: metrics.jsonl cut back to the checkpoint, TensorBoard purged."""

import glob
import json
import os
import struct

from tensorboardX.proto import event_pb2

from aia_jax.train import metrics


def _events(path):
    """Every `Event` of a TensorBoard events file (TFRecord framing: length, crc, data, crc)."""
    out = []
    with open(path, "rb") as f:
        while header := f.read(12):
            (length,) = struct.unpack("<Q", header[:8])
            event = event_pb2.Event()
            event.ParseFromString(f.read(length))
            f.read(4)
            out.append(event)
    return out


def test_resume_drops_later_and_damaged_lines(tmp_path):
    path = tmp_path / metrics.METRICS_FILE
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, 6)]
    path.write_text("\n".join(lines) + '\n{"step": 6, "lo')  # killed mid-write
    writer = metrics.MetricWriter(str(tmp_path), resume_step=3)
    writer.write(4, {"loss": 0.5})
    writer.close()
    assert [r["step"] for r in metrics.read_metrics(str(tmp_path))] == [1, 2, 3, 4]


def test_a_fresh_start_purges_the_events_of_a_run_that_left_no_checkpoint(tmp_path):
    """A run that crashed before its first checkpoint restarts from step 0: TensorBoard must
    hide its curves, as metrics.jsonl drops its lines."""
    crashed = metrics.MetricWriter(str(tmp_path), resume_step=0)
    crashed.write(1, {"loss": 9.0})
    crashed.close()
    assert [r["step"] for r in metrics.read_metrics(str(tmp_path))] == [1]
    restarted = metrics.MetricWriter(str(tmp_path), resume_step=0)
    restarted.close()
    assert metrics.read_metrics(str(tmp_path)) == []
    files = sorted(glob.glob(os.path.join(tmp_path, metrics.TB_DIR, "events.*")))
    purges = [
        e.step
        for f in files
        for e in _events(f)
        if e.HasField("session_log") and e.session_log.status == e.session_log.START
    ]
    assert purges and purges[-1] == 1  # TensorBoard drops earlier events from step 1 on
