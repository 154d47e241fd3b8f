"""Reading a run folder's logs in tests."""

import json
import os


def logged_rows(workdir) -> list:
  """The rows of metrics.jsonl in order (each the means of the steps since the previous row)."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def logged_losses(workdir) -> dict:
  """step -> loss from metrics.jsonl, the last logged value for each step."""
  return {row["step"]: row["loss"] for row in logged_rows(workdir)}


def tensorboard_scalars(logdir) -> dict:
  """{tag: {step: value}} of the scalars in a folder's tensorboardX event files (TFRecord
  framing: u64 length, u32 crc, the Event proto, u32 crc)."""
  import struct
  from tensorboardX.proto import event_pb2
  out = {}
  for name in sorted(os.listdir(logdir)):
    with open(os.path.join(logdir, name), "rb") as f:
      data = f.read()
    pos = 0
    while pos + 12 <= len(data):
      (n,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
      pos += 16 + n
      for v in event.summary.value:
        out.setdefault(v.tag, {})[event.step] = v.simple_value
  return out


def wandb_offline_runs(workdir) -> list:
  """[(run id, [history row])] of each offline W&B run under WORKDIR/wandb, oldest first.

  A run-*.wandb file: a 7-byte header (":W&B", magic, version), then LevelDB-log records in
  32 KiB blocks (u32 crc, u16 length, u8 type: 1 full, 2 first, 3 middle, 4 last), each a
  wandb_internal_pb2.Record."""
  import glob
  import struct
  from wandb.proto import wandb_internal_pb2 as pb
  block, runs = 32768, []
  for path in sorted(glob.glob(os.path.join(workdir, "wandb", "offline-run-*", "run-*.wandb"))):
    with open(path, "rb") as f:
      data = f.read()
    assert data[:4] == b":W&B", path
    pos, buf, run_id, history = 7, b"", None, []
    while pos + 7 <= len(data):
      if block - pos % block < 7:  # a block's tail too short for a header is padding
        pos += block - pos % block
        continue
      n, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
      chunk, pos = data[pos + 7:pos + 7 + n], pos + 7 + n
      buf = chunk if kind in (1, 2) else buf + chunk
      if kind not in (1, 4):
        continue
      record = pb.Record.FromString(buf)
      if record.WhichOneof("record_type") == "run":
        run_id = record.run.run_id
      elif record.WhichOneof("record_type") == "history":
        history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                        for i in record.history.item})
    runs.append((run_id, history))
  return runs
