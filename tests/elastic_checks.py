"""What every run with attached rollout workers must satisfy, read from its HDF5 log and its elastic/ folder."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from areal_hpc.storage.runlog import RunLog


def check_elastic_records(run_dir: Path, eta: int, group_size: int = 8) -> dict:
    """No sample or prompt trained twice, every granted prompt trained (where it was re-issued, by its new
    producer), staleness within eta, whole groups; returns what was read."""
    log = RunLog(run_dir, strict=True)
    assert log.finished
    samples = log.samples()
    fates = log.step_samples()
    judged = fates[fates["fate"].isin(["used", "rejected"])]
    dup = [i for i, c in Counter(judged["sample_id"].tolist()).items() if c > 1]
    assert not dup, f"samples trained/rejected more than once: {dup[:10]}"
    assert samples["sample_id"].is_unique, "a sample id was generated twice"

    joined = fates.merge(samples[["sample_id", "group_id", "min_version", "worker"]], on="sample_id", how="left",
                         validate="one_to_one")
    used = joined[joined["fate"] == "used"]
    assert (used["trained_version"] - used["min_version"]).between(0, eta).all(), "trained a sample > eta stale"
    sizes = Counter(used["group_id"].tolist())
    assert set(sizes.values()) == {group_size}, "a prompt was trained more or less than one whole group"
    per_prompt = used.groupby("group_id")["trained_version"].nunique()
    assert (per_prompt == 1).all(), "a prompt was trained at two steps"

    elastic = run_dir / "elastic"
    granted: dict[int, list[tuple[str, int]]] = {}
    for path in sorted(elastic.glob("workers/w*/grants.jsonl")):
        for line in path.read_text().splitlines():
            g = json.loads(line)
            granted.setdefault(g["prompt"], []).append((path.parent.name, g["step"]))
    reissued = [json.loads(line) for line in (elastic / "reissued.jsonl").read_text().splitlines()] \
        if (elastic / "reissued.jsonl").exists() else []
    judged_prompts = set(joined.loc[joined["fate"].isin(["used", "rejected"]), "group_id"].tolist())
    missing = sorted(p for p in granted if p not in judged_prompts)
    assert not missing, f"granted prompts neither trained nor rejected: {missing[:10]}"
    for prompt, steps in granted.items():  # re-issued: same step wherever it went
        assert len({s for _, s in steps}) == 1, f"prompt {prompt} granted for two steps: {steps}"
    trained_at = used.groupby("group_id")["trained_version"].first()
    for prompt, steps in granted.items():
        if prompt in trained_at.index:
            assert trained_at[prompt] == steps[0][1], f"prompt {prompt} trained at {trained_at[prompt]}, granted " \
                                                      f"for step {steps[0][1]}"
    leases = {p.parent.name: json.loads(p.read_text()) for p in sorted(elastic.glob("workers/w*/lease.json"))}
    return {"samples": samples, "fates": joined, "granted": granted, "reissued": reissued, "leases": leases,
            "used": used}
