"""Trainer 0's side of elastic rollout (elastic/host.py): the run's record and the disk channel's life."""

from __future__ import annotations

import json
import time

import torch

from areal_hpc.config import load_config
from areal_hpc.elastic.host import ElasticHost
from areal_hpc.elastic.layout import ElasticFiles
from areal_hpc.elastic.lease import register, renew
from areal_hpc.weights.disk import read_latest, versions_on_disk


def _params(v: float):
    return lambda: [("w", torch.full((4, 4), v)), ("b", torch.full((4,), v))]


def test_record_heartbeat_disk_channel_and_end(tmp_path):
    cfg = load_config(None, ["elastic.heartbeat_s=0.05", "elastic.lease_s=1", "elastic.poll_s=0.01"])
    (tmp_path / "config.yaml").write_text("run: {}\n")
    files = ElasticFiles(tmp_path)
    files.weights.mkdir(parents=True)
    (files.weights / "v00000099.safetensors").write_bytes(b"an earlier attempt's")
    host = ElasticHost(cfg, files, run_id="r", attempt=1, policy_path=str(tmp_path), config_path=tmp_path /
                       "config.yaml", version=3)
    assert not files.weights.exists()  # an earlier attempt's versions would look newer than this one's
    first = json.loads(files.run.read_text())
    assert first["state"] == "running" and first["attempt"] == 1 and len(first["config_sha"]) == 64
    time.sleep(0.3)
    assert json.loads(files.run.read_text())["time"] > first["time"]  # renewed without any step
    host.look(3, _params(3.0))
    host.published(4, _params(4.0))
    assert host.disk is None and not files.weights.exists()  # nobody attached: nothing written
    old = register(files, attempt=0)  # a worker of the earlier attempt does not count
    old.state = "ready"
    renew(files, old)
    host._next_look = 0.0
    host.look(4, _params(4.0))
    assert host.disk is None
    lease = register(files, attempt=1)
    host._next_look = 0.0
    host.look(4, _params(4.0))
    host.disk.wait()
    assert read_latest(files.weights)["version"] == 4  # at once, to start from
    lease.version = 4
    renew(files, lease)
    host.published(5, _params(5.0))
    host.disk.wait()
    for v in (6, 7):  # pruned after each publish, below the newest on disk at that moment
        host.published(v, _params(float(v)))
        host.disk.wait()
    assert versions_on_disk(files.weights) == [4, 6, 7]  # 4: the worker holds it; 5: nobody does
    host.close("ended")
    end = json.loads(files.run.read_text())
    assert end["state"] == "ended" and end["version"] == 7
