"""Accelerate's trackers beside TensorBoard (logger.trackers): a run's metrics, config and samples
read back with each tool's own API, offline (W&B) and from a local file store (MLflow)."""
import json
import struct

import pytest

from conftest import compose, read_metrics, run_training, series
from gptlab.errors import ConfigError
from gptlab.preflight import check_config


def wandb_records(path):
    """The protobuf records of an offline W&B run file: a 7-byte header, then LevelDB's log format
    (32 KiB blocks of records, each with a 7-byte header: checksum, length, type)."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw, pos, parts, block = path.read_bytes(), 7, b"", 32768
    assert raw[:4] == b":W&B"
    while pos + 7 <= len(raw):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (kind == 0 and length == 0):
            pos += left
            continue
        parts, pos = parts + raw[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(parts)
            yield record
            parts = b""


def test_wandb_offline_and_mlflow_file_store_hold_the_runs_metrics_config_and_samples(tmp_path, cache_dir,
                                                                                      monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path / 'mlruns'}")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 wants a database; a file is enough here
    run_dir = tmp_path / "run"
    run_training([f"run_dir={run_dir}", f"cache_dir={cache_dir}", "debug=smoke", "logger.trackers=[wandb,mlflow]",
                  "logger.project=trk", "optim.lr=0.002"])
    losses = series(read_metrics(run_dir), "train/loss")
    evals = series(read_metrics(run_dir), "eval/bpb")
    assert len(losses) == 8 and len(evals) == 2

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"file:{tmp_path / 'mlruns'}")
    (run,) = client.search_runs([client.get_experiment_by_name("trk").experiment_id])
    assert run.info.run_name == "run"
    for key, expected in (("train/loss", losses), ("eval/bpb", evals)):
        history = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in history] == [s for s, _ in expected]
        assert [m.value for m in history] == pytest.approx([v for _, v in expected])
    assert run.data.params["optim.lr"] == "0.002" and run.data.params["model.n_layer"] == "2"
    samples = {a.path for a in client.list_artifacts(run.info.run_id, "sample/0")}
    assert samples == {"sample/0/step_0000004.txt", "sample/0/step_0000008.txt"}

    (wandb_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    rows, config = [], {}
    for r in wandb_records(wandb_file):
        if r.WhichOneof("record_type") == "history":
            rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
        elif r.WhichOneof("record_type") == "config":
            config.update({u.key: json.loads(u.value_json) for u in r.config.update})
    assert [row["_step"] for row in rows] == [s for s, _ in losses]
    assert [row["train/loss"] for row in rows] == pytest.approx([v for _, v in losses])
    assert [(row["_step"], row["eval/bpb"]) for row in rows if "eval/bpb" in row] == evals
    assert any("sample/0/ncols" in row for row in rows)  # the samples, as a table
    assert config["optim.lr"] == 0.002 and config["model.n_layer"] == 2


def test_a_tracker_alone_and_a_missing_package_in_one_line(monkeypatch):
    cfg = compose(["logger=mlflow"])
    assert (cfg.logger.tensorboard, list(cfg.logger.trackers), cfg.logger.jsonl) == (False, ["mlflow"], True)
    monkeypatch.setattr("gptlab.tracking.importlib.util.find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"^logger\.trackers: aim needs the aim package: pip install 'gptlab\[aim\]'$"):
        check_config(compose(["debug=smoke", "logger.trackers=[aim]"]))
    with pytest.raises(Exception) as err:
        compose(["logger.trackers=[neptune]"])
    assert "Invalid value 'neptune', expected one of [wandb, mlflow, trackio, aim]" in str(err.value.__cause__)
