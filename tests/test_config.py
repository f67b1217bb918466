"""Tests for areal_hpc.config: defaults, YAML, overrides, round-trip, and error messages."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import pytest
import yaml

from areal_hpc.config import (
    Config,
    ConfigError,
    config_to_dict,
    load_config,
    save_config,
)

REPO = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _error(path: Path | None, overrides: Sequence[str] = ()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert "\n" not in message, message
    return message


# --------------------------------------------------------------------------- happy paths


def test_defaults_load() -> None:
    cfg = load_config(None)
    assert cfg == Config()
    assert cfg.async_ is True
    assert (cfg.cluster.n_trainer, cfg.cluster.n_rollout, cfg.run.steps) == (1, 2, 40)
    assert cfg.trainer.adam_betas == [0.9, 0.999]


def test_quickstart_yaml_loads() -> None:
    cfg = load_config(REPO / "configs" / "quickstart.yaml")
    assert cfg.cluster.n_trainer == 1
    assert cfg.cluster.n_rollout == 2
    raw = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    assert cfg.run.steps == raw["run"]["steps"] and cfg.trainer.lr == float(raw["trainer"]["lr"])
    assert cfg.trainer.batch_size % cfg.rollout.group_size == 0


def test_overrides_change_values_with_types(tmp_path: Path) -> None:
    path = _write(tmp_path, "trainer:\n  lr: 1e-4\nmodel:\n  path: somewhere\n")
    cfg = load_config(
        path,
        [
            "trainer.lr=2e-5",
            "rollout.eta=2",
            "model.path=null",
            "run.name=exp=1",
            "rollout.temperature=1",
            "transport.ring_bytes=1e6",
            "trainer.adam_betas=[0.8, 0.99]",
            "run.progress=false",
        ],
    )
    assert cfg.trainer.lr == pytest.approx(2e-5) and isinstance(cfg.trainer.lr, float)
    assert cfg.rollout.eta == 2 and type(cfg.rollout.eta) is int
    assert cfg.model.path is None
    assert cfg.run.name == "exp=1"
    assert cfg.rollout.temperature == 1.0 and isinstance(cfg.rollout.temperature, float)
    assert (
        cfg.transport.ring_bytes == 1_000_000 and type(cfg.transport.ring_bytes) is int
    )
    assert cfg.trainer.adam_betas == [0.8, 0.99]
    assert cfg.run.progress is False


def test_yaml_string_float_is_accepted(tmp_path: Path) -> None:
    # PyYAML (YAML 1.1) reads `1e-4` as a string; float fields must still accept it.
    cfg = load_config(_write(tmp_path, "trainer:\n  lr: 1e-4\nwarmup:\n  lr: 3e-3\n"))
    assert cfg.trainer.lr == pytest.approx(1e-4)
    assert cfg.warmup.lr == pytest.approx(3e-3)


def test_sync_baseline_with_eta_zero_ok() -> None:
    cfg = load_config(None, ["async=false", "rollout.eta=0"])
    assert cfg.async_ is False and cfg.rollout.eta == 0


def test_override_string_is_split() -> None:
    cfg = load_config(None, "trainer.lr=2e-5 rollout.eta=0 async=false")  # type: ignore[arg-type]
    assert cfg.async_ is False and cfg.trainer.lr == pytest.approx(2e-5)


def test_empty_section_uses_defaults(tmp_path: Path) -> None:
    assert load_config(_write(tmp_path, "trainer:\n", "b.yaml")) == Config()


@pytest.mark.parametrize("text", ["", "\n\n", "# all commented out\n# trainer:\n#   lr: 1e-4\n", "---\n"])
def test_empty_file_is_an_error_naming_it(tmp_path: Path, text: str) -> None:
    path = _write(tmp_path, text, "empty.yaml")
    message = _error(path)
    assert str(path) in message and "empty" in message and "quickstart.yaml" in message


def test_round_trip(tmp_path: Path) -> None:
    cfg = load_config(
        None,
        [
            "async=false",
            "rollout.eta=0",
            "trainer.lr=3e-5",
            "trainer.adam_eps=1e-10",
            "run.name=rt",
        ],
    )
    out = tmp_path / "nested" / "config.yaml"
    save_config(cfg, out)
    text = out.read_text(encoding="utf-8")
    assert re.search(r"^async: false$", text, re.MULTILINE)
    assert "async_" not in text
    assert load_config(out) == cfg
    assert config_to_dict(load_config(out)) == config_to_dict(cfg)


def test_hf_model_with_existing_dir_ok(tmp_path: Path) -> None:
    cfg = load_config(None, ["model.kind=hf", f"model.path={tmp_path}"])
    assert cfg.model.path == str(tmp_path)


def test_jsonl_task_with_existing_files_ok(tmp_path: Path) -> None:
    train = _write(tmp_path, '{"prompt": "1+1=", "answer": "2"}\n', "train.jsonl")
    held = _write(tmp_path, '{"prompt": "1+2=", "answer": "3"}\n', "eval.jsonl")
    cfg = load_config(
        None, ["task.kind=jsonl", f"task.train_path={train}", f"task.eval_path={held}"]
    )
    assert cfg.task.kind == "jsonl"


# --------------------------------------------------------------------------- bad configs


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    msg = _error(missing)
    assert str(missing) in msg and "does not exist" in msg


def test_unknown_key_in_yaml_suggests_closest(tmp_path: Path) -> None:
    path = _write(tmp_path, "trainer:\n  lrr: 1.0e-4\n", "x.yaml")
    msg = _error(path)
    assert (
        f"unknown config key 'trainer.lrr' (in {path}); did you mean 'trainer.lr'?"
        == msg
    )


def test_unknown_section_suggests_closest() -> None:
    msg = _error(None, ["traner.lr=1e-4"])
    assert "unknown config key 'traner.lr'" in msg
    assert "did you mean 'trainer'?" in msg


def test_unknown_top_level_key_suggests_async(tmp_path: Path) -> None:
    msg = _error(_write(tmp_path, "asynch: false\n"))
    assert "'asynch'" in msg and "did you mean 'async'?" in msg


def test_key_in_wrong_section_suggests_right_one() -> None:
    msg = _error(None, ["rollout.batch_size=64"])
    assert "'rollout.batch_size'" in msg and "'trainer.batch_size'" in msg


def test_wrong_type_int() -> None:
    with pytest.raises(
        ConfigError, match=r"config key 'rollout\.eta' expects int, got 'four' \(str\)"
    ):
        load_config(None, ["rollout.eta=four"])


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        (
            "rollout.group_size=8.5",
            r"'rollout\.group_size' expects int, got 8\.5 \(float\)",
        ),
        (
            "cluster.n_rollout=true",
            r"'cluster\.n_rollout' expects int, got True \(bool\)",
        ),
        ("run.progress=1", r"'run\.progress' expects bool, got 1 \(int\)"),
        ("run.name=123", r"'run\.name' expects str, got 123 \(int\)"),
        ("trainer.lr=fast", r"'trainer\.lr' expects float, got 'fast' \(str\)"),
        (
            "trainer.adam_betas=0.9",
            r"'trainer\.adam_betas' expects list\[float\], got 0\.9",
        ),
        ("model.path=[a]", r"'model\.path' expects str or null, got \['a'\]"),
    ],
)
def test_wrong_types(override: str, pattern: str) -> None:
    msg = _error(None, [override])
    assert re.search(pattern, msg), msg
    assert "use a value like" in msg


def test_malformed_override() -> None:
    msg = _error(None, ["trainer.lr"])
    assert "malformed override 'trainer.lr'" in msg and "section.key=value" in msg


def test_section_given_scalar(tmp_path: Path) -> None:
    msg = _error(_write(tmp_path, "trainer: 3\n"))
    assert "config section 'trainer' must be a mapping, got 3 (int)" in msg


def test_scalar_key_used_as_section() -> None:
    msg = _error(None, ["trainer.lr.value=1"])
    assert "'trainer.lr' is not a section" in msg


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = _write(
        tmp_path, "run:\n  name: a\n  steps: [1, 2\ntrainer:\n  lr: 1\n", "broken.yaml"
    )
    msg = _error(path)
    assert str(path) in msg and re.search(r"line \d+", msg), msg


def test_top_level_not_mapping(tmp_path: Path) -> None:
    msg = _error(_write(tmp_path, "- a\n- b\n"))
    assert "must contain a mapping" in msg


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        (["rollout.eta=-1"], r"'rollout\.eta' must be >= 0, got -1"),
        (["rollout.batch_bucket_step=40"], r"'rollout\.batch_bucket_step' must be 0 or a positive multiple of 16"),
        (["rollout.batch_bucket_step=-16"], r"'rollout\.batch_bucket_step' must be 0 or a positive multiple of 16"),
        (["cluster.n_rollout=0"], r"'cluster\.n_rollout' must be >= 1, got 0"),
        (["cluster.n_trainer=0"], r"'cluster\.n_trainer' must be >= 1, got 0"),
        (
            ["rollout.group_size=1", "trainer.batch_size=4"],
            r"'rollout\.group_size' must be >= 2, got 1",
        ),
        (["trainer.lr=0"], r"'trainer\.lr' must be > 0, got 0\.0"),
        (
            ["trainer.eps_clip=1.5"],
            r"'trainer\.eps_clip' must be in \(0, 1\), got 1\.5",
        ),
        (
            ["trainer.behav_imp_weight_cap=0"],
            r"'trainer\.behav_imp_weight_cap' must be > 1",
        ),
        (["rollout.temperature=0"], r"'rollout\.temperature' must be > 0, got 0\.0"),
        (["rollout.top_p=1.5"], r"'rollout\.top_p' must be in \(0, 1\], got 1\.5"),
        (
            ["rollout.max_new_tokens=0"],
            r"'rollout\.max_new_tokens' must be >= 1, got 0",
        ),
        (["run.steps=0"], r"'run\.steps' must be >= 1, got 0"),
        (
            ["transport.ring_bytes=1024"],
            r"'transport\.ring_bytes' must be >= 65536, got 1024",
        ),
        (
            ["trainer.token_budget=32"],
            r"'trainer\.token_budget' must be >= model\.max_seq_len=64, got 32",
        ),
        (
            ["trainer.token_bucket=32"],
            r"'trainer\.token_bucket' must be 0 \(off\) or between 64 and trainer\.token_budget=\d+, got 32",
        ),
        (
            ["model.n_heads=3"],
            r"'model\.hidden_size' must be divisible by model\.n_heads=3, got 128",
        ),
        (
            ["trainer.stale_weight=0"],
            r"'trainer\.stale_weight' must be in \(0, 1\], got 0\.0",
        ),
        (["trainer.adam_betas=[0.9]"], r"'trainer\.adam_betas' must be two numbers"),
    ],
)
def test_range_checks(overrides: list[str], pattern: str) -> None:
    msg = _error(None, overrides)
    assert re.search(pattern, msg), msg


def test_batch_not_multiple_of_group() -> None:
    msg = _error(None, ["trainer.batch_size=60", "rollout.group_size=8"])
    assert "trainer.batch_size" in msg and "60" in msg and "rollout.group_size=8" in msg
    assert "trainer.batch_size=64" in msg


def test_groups_not_divisible_by_trainers() -> None:
    msg = _error(None, ["cluster.n_trainer=3"])
    assert "cluster.n_trainer=3" in msg and "whole groups" in msg
    cfg = load_config(None, ["cluster.n_trainer=3", "trainer.batch_size=48"])
    assert cfg.trainer.batch_size == 48


@pytest.mark.parametrize(
    ("override", "key", "hint"),
    [
        ("rollout.interrupt=kep", "rollout.interrupt", "did you mean 'keep'?"),
        ("trainer.stale_policy=drop", "trainer.stale_policy", "reject|downweight"),
        ("cluster.launcher=srun", "cluster.launcher", "auto|mpiexec|none"),
        ("model.dtype=bf16", "model.dtype", "float32|bfloat16|float16"),
        ("model.device=gpu", "model.device", "auto|cpu|cuda"),
        ("weights.backend=mpi", "weights.backend", "auto|gloo|nccl"),
        ("transport.kind=tcp", "transport.kind", "shm"),
        ("task.kind=gsm8k", "task.kind", "arithmetic|jsonl"),
        ("run.log_level=debug", "run.log_level", "did you mean 'DEBUG'?"),
    ],
)
def test_enum_choices(override: str, key: str, hint: str) -> None:
    msg = _error(None, [override])
    bad = override.split("=", 1)[1]
    assert f"'{key}'" in msg and f"'{bad}'" in msg and hint in msg, msg


def test_hf_model_path_missing() -> None:
    msg = _error(None, ["model.kind=hf", "model.path=/x/y"])
    assert msg == (
        "model.path '/x/y' does not exist; point it at a local HF checkpoint directory "
        "(config.json + weights) or a .gguf file, or use model.kind=tiny"
    )


def test_hf_model_path_unset() -> None:
    msg = _error(None, ["model.kind=hf"])
    assert "'model.path'" in msg and "model.kind=hf" in msg and "model.kind=tiny" in msg


def test_jsonl_paths_required(tmp_path: Path) -> None:
    msg = _error(None, ["task.kind=jsonl"])
    assert "'task.train_path'" in msg and "task.kind=jsonl" in msg
    missing = tmp_path / "train.jsonl"
    msg = _error(
        None,
        ["task.kind=jsonl", f"task.train_path={missing}", f"task.eval_path={missing}"],
    )
    assert f"task.train_path '{missing}' does not exist" in msg


def test_sync_baseline_requires_eta_zero() -> None:
    msg = _error(None, ["async=false", "rollout.eta=4"])
    assert "rollout.eta" in msg and "synchronous baseline requires rollout.eta=0" in msg


def test_error_is_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize(
    "key",
    [
        "rollout.gated_yield_ms",
        "rollout.stream_priority",
        "rollout.decode_layer",
        "rollout.decode_attention",
        "rollout.compile",
        "rollout.cuda_graphs",
        "cluster.mps_trainer_priority",
        "cluster.mps_trainer_sm_percent",
    ],
)
def test_removed_knob_in_an_old_yaml_is_an_unknown_key(tmp_path: Path, key: str) -> None:
    """Knobs removed from the config (measured as useless, or set by the benchmarks themselves): an old
    YAML that still sets one fails with the one-line unknown-key error naming it and saying it went,
    not with a look-alike key of another section (rollout.compile is not trainer.compile)."""
    from areal_hpc.config.loader import REMOVED, all_keys

    assert key in REMOVED and key not in all_keys()
    section, leaf = key.split(".")
    path = _write(tmp_path, f"{section}:\n  {leaf}: 1\n", "old.yaml")
    msg = _error(path)
    assert msg.startswith(f"unknown config key '{key}' (in {path}); it was removed, delete it: "), msg
    assert "did you mean" not in msg
    assert f"'{key}'" in _error(None, [f"{key}=1"])


def test_every_section_validates_its_own_fields() -> None:
    """Each section dataclass carries its own ``validate``; the root adds only the cross-section checks."""
    import dataclasses

    for f in dataclasses.fields(Config):
        section = getattr(Config(), f.name)
        if dataclasses.is_dataclass(section):
            assert callable(getattr(section, "validate", None)), f.name
            section.validate()  # the defaults are valid
