"""Synthetic workload and random-weight presets: determinism, held-out split, length distribution,
token reward, engines stopping at the requested length, id tokenizer, config errors."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from areal_hpc.api import GenRequest
from areal_hpc.config import ConfigError, load_config
from areal_hpc.config.prompt import PromptConfig
from areal_hpc.config.reward import RewardConfig
from areal_hpc.model.build import build_tiny_model, load_policy
from areal_hpc.model.tokenizer import IdTokenizer, initial_tokenizer, load_tokenizer
from areal_hpc.reward import RewardPool, build_scorer, even_token_reward
from areal_hpc.rollout.engine import TorchEngine
from areal_hpc.rollout.evaluate import evaluate
from areal_hpc.tasks import Problem, SyntheticTask, build_task
from areal_hpc.tasks.prompt import PromptBuilder

SPECIALS = (0, 1, 2)
GPU_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "gpu-synthetic.yaml"


def make_task(seed: int = 7, **kw) -> SyntheticTask:
    args = dict(prompt_len=16, len_median=20.0, len_sigma=1.0, max_len=64, vocab_size=1000, special_ids=SPECIALS,
                seed=seed, n_eval=50)
    return SyntheticTask(**{**args, **kw})


def test_problems_are_a_pure_function_of_seed_and_index() -> None:
    a, b = make_task(), make_task()
    assert [a.train_problem(i) for i in range(50)] == [b.train_problem(i) for i in reversed(range(50))][::-1]
    assert a.eval_problems == b.eval_problems
    other = make_task(seed=8)
    assert a.train_problem(3) != other.train_problem(3)
    p = a.train_problem(3)
    assert p.prompt_id == 3 and len(p.prompt_tokens) == 16 and p.verifier == "even_tokens"
    assert p.prompt == " ".join(map(str, p.prompt_tokens)) and p.answer == f"len={p.max_tokens}"


def test_prompt_ids_avoid_specials_and_cover_the_vocabulary() -> None:
    task = make_task(vocab_size=10, special_ids=(0, 4, 9))
    ids = [t for i in range(300) for t in task.train_problem(i).prompt_tokens]
    assert set(ids) == {1, 2, 3, 5, 6, 7, 8}


def test_held_out_prompts_are_disjoint_from_training() -> None:
    task = make_task()
    assert [p.prompt_id for p in task.eval_problems] == [-(i + 1) for i in range(50)]
    held = {p.prompt_tokens for p in task.eval_problems}
    assert len(held) == 50
    assert not held & {task.train_problem(i).prompt_tokens for i in range(2000)}
    # A space so small that training would draw held-out prompts all the time: they are redrawn.
    tiny = make_task(prompt_len=1, vocab_size=8, n_eval=100)
    held = {p.prompt_tokens for p in tiny.eval_problems}
    assert len(held) == 2  # capped at half of the 5 possible prompts
    assert not held & {tiny.train_problem(i).prompt_tokens for i in range(500)}


def test_lengths_are_log_normal_with_a_clipped_tail() -> None:
    task = make_task(len_median=48.0, len_sigma=1.0, max_len=256, prompt_len=1)
    lengths = [task.train_problem(i).max_tokens for i in range(4000)]
    assert min(lengths) >= 1 and max(lengths) == 256
    assert 44 <= statistics.median(lengths) <= 52
    at_max = sum(n == 256 for n in lengths) / len(lengths)
    expected = 0.5 * math.erfc(math.log(256 / 48) / math.sqrt(2))  # P(log-normal > 256) ~ 4.7%
    assert abs(at_max - expected) < 0.015
    sd = statistics.stdev(math.log(n) for n in lengths if 1 < n < 256)
    assert 0.75 < sd < 1.05  # clipping trims the log-spread a little
    flat = make_task(len_median=10.0, len_sigma=0.0)
    assert {flat.train_problem(i).max_tokens for i in range(100)} == {10}
    short = make_task(len_median=1.0, len_sigma=2.0, max_len=5)
    assert {short.train_problem(i).max_tokens for i in range(500)} <= set(range(1, 6))


def test_even_token_reward_and_dispatch() -> None:
    assert even_token_reward([2, 4, 5, 7]) == 0.5
    assert even_token_reward([1, 3]) == 0.0 and even_token_reward([8]) == 1.0
    assert even_token_reward([]) == 0.0
    score = build_scorer(RewardConfig())
    p = make_task().train_problem(0)
    assert score(p, [10, 11, 12, 14], "ignored").reward == 0.75
    math_p = Problem(0, "2+2=", "4")
    assert score(math_p, [], "4").reward == 1.0 and score(math_p, [], "5").reward == 0.0
    with pytest.raises(ValueError, match="names verifier .nope., not one of math|code|even_tokens"):
        score.check(Problem(0, "", "", verifier="nope"))


def test_prompt_ids_prefers_the_problems_own_ids() -> None:
    tok = IdTokenizer(100, eos_id=99)
    prompts = PromptBuilder(PromptConfig(), tok)
    assert prompts.ids(Problem(0, "5 6", "", prompt_tokens=(7, 8))) == [7, 8]
    assert prompts.ids(Problem(0, "5 6", "")) == [5, 6]


def test_id_tokenizer_round_trip_and_checkpoint(tmp_path) -> None:
    tok = IdTokenizer(151936, eos_id=151643)
    assert tok.pad_id == 151643 and tok.bos_id is None
    assert tok.encode(tok.decode([0, 5, 151935])) == [0, 5, 151935]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.encode("151936")
    tok.save(tmp_path)
    back = load_tokenizer(tmp_path)
    assert isinstance(back, IdTokenizer) and vars(back) == vars(tok)


def test_build_task_takes_vocab_and_lengths_from_the_config() -> None:
    cfg = load_config(None, ["task.kind=synthetic", "task.prompt_len=8", "rollout.max_new_tokens=12",
                             "model.max_seq_len=24", "task.len_median=6"])
    task = build_task(cfg)
    ids = {t for i in range(200) for t in task.train_problem(i).prompt_tokens}
    tiny_vocab = initial_tokenizer(cfg.model, task.alphabet).vocab_size
    assert ids == set(range(3, tiny_vocab))  # every char of the tiny tokenizer, no pad/bos/eos
    assert max(task.train_problem(i).max_tokens for i in range(500)) == 12
    with pytest.raises(TypeError, match="whole config"):
        build_task(cfg.task)
    rnd = load_config(GPU_CONFIG)
    ids = [t for i in range(20) for t in build_task(rnd).train_problem(i).prompt_tokens]
    assert max(ids) < 151936 and 151643 not in ids and max(ids) > 100_000


def _no_eos_tokenizer():
    return SimpleNamespace(pad_id=0, eos_id=-1, bos_id=None, stop_ids=frozenset())


@pytest.mark.parametrize("with_eos", [False, True])
def test_torch_engine_stops_at_max_tokens(with_eos: bool) -> None:
    torch.set_num_threads(1)
    model = build_tiny_model(32, 1, 2, 64, 64, vocab_size=19, seed=0)
    tok = IdTokenizer(19, eos_id=2) if with_eos else _no_eos_tokenizer()
    engine = TorchEngine(model, tok, max_batch=6, max_new_tokens=20, temperature=1.0, top_p=1.0, seed=1)
    targets = [1, 3, 7, 20, 0, 40, 5, 11, 2, 9]  # 0: engine default; 40: capped at max_new_tokens
    reqs = [GenRequest(i, i, i, [3 + i % 5] * (2 + i), max_tokens=n) for i, n in enumerate(targets)]
    gens = engine.generate(reqs)
    limits = [min(n or 20, 20) for n in targets]
    for g, limit in zip(gens, limits, strict=True):
        if with_eos:
            assert len(g.tokens) == limit or (len(g.tokens) < limit and g.tokens[-1] == 2)
        else:
            assert len(g.tokens) == limit


def test_evaluate_scores_synthetic_problems() -> None:
    torch.set_num_threads(1)
    task = make_task(vocab_size=19, prompt_len=4, len_median=3.0, max_len=6, n_eval=12)
    model = build_tiny_model(32, 1, 2, 64, 16, vocab_size=19, seed=0)
    tok = IdTokenizer(19, eos_id=2)
    prompts = PromptBuilder(PromptConfig(), tok)
    with RewardPool(build_scorer(RewardConfig()), 0, 5.0) as pool:
        out = evaluate(model, tok, prompts, task.eval_problems, pool, max_new_tokens=6, k=4, seed=3)
        again = evaluate(model, tok, prompts, task.eval_problems, pool, max_new_tokens=6, k=4, seed=3)
    assert set(out) == {"n", "k", "pass@1", "reward@1", "avg@4", "pass@4", "reward_timeouts"}
    assert out == again, "the same seed must give the same evaluation"
    assert out["n"] == 12 and out["reward_timeouts"] == 0
    # Even-id fractions: a response passes only when all its ids are even, so pass <= mean reward.
    assert 0.0 <= out["pass@1"] <= out["reward@1"] <= 1.0 and 0.0 < out["avg@4"] < 1.0


def test_random_preset_is_built_once_and_loads_with_its_tokenizer(tmp_path, monkeypatch) -> None:
    """A shrunken stand-in for the preset (real shapes take seconds and gigabytes): same code path."""
    from areal_hpc.model import presets, tokenizer
    from areal_hpc.model.initial import prepare_initial_policy

    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1, vocab_size=512, tie_word_embeddings=True, rope_theta=1e6)
    monkeypatch.setitem(presets.PRESETS, "qwen2-0.5b", small)
    monkeypatch.setattr(tokenizer, "QWEN2_EOS_ID", 511)
    cfg = load_config(None, ["model.kind=random", "task.kind=synthetic", "task.prompt_len=8", "model.max_seq_len=24",
                             f"run.cache_dir={tmp_path}", "warmup.enabled=true"])
    task = build_task(cfg)
    path = prepare_initial_policy(cfg, task)
    assert "qwen2-0.5b" in path and "seed1" in path and "float32" in path
    mtime = (tmp_path / path.split("/")[-1] / "config.json").stat().st_mtime_ns
    assert prepare_initial_policy(cfg, task) == path
    assert (tmp_path / path.split("/")[-1] / "config.json").stat().st_mtime_ns == mtime  # from cache
    model, tok = load_policy(path)
    assert isinstance(tok, IdTokenizer) and (tok.vocab_size, tok.eos_id, tok.pad_id) == (512, 511, 511)
    assert model.config.num_hidden_layers == 1 and model.config.vocab_size == 512
    rebuilt = presets.build_random("qwen2-0.5b", seed=1)
    for (n, a), (_, b) in zip(model.named_parameters(), rebuilt.named_parameters(), strict=True):
        assert torch.equal(a, b), n


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        (["task.prompt_len=0"], r"'task.prompt_len' must be >= 1, got 0"),
        (["task.len_median=0.5"], r"'task.len_median' must be >= 1, got 0.5"),
        (["task.len_sigma=-0.1"], r"'task.len_sigma' must be >= 0"),
        (["task.prompt_len=30", "model.max_seq_len=32"],
         r"'model.max_seq_len' must cover task.prompt_len \+ rollout.max_new_tokens = 38, got 32"),
    ],
)
def test_synthetic_config_errors(overrides: list[str], pattern: str) -> None:
    base = ["task.kind=synthetic", "task.prompt_len=8", "model.max_seq_len=24"]
    with pytest.raises(ConfigError, match=pattern) as info:
        load_config(None, [*base, *overrides])
    assert "\n" not in str(info.value)


def test_random_model_needs_the_synthetic_task() -> None:
    with pytest.raises(ConfigError, match=r"'model.kind' needs task.kind=synthetic"):
        load_config(None, ["model.kind=random"])
    cfg = load_config(GPU_CONFIG)
    assert cfg.model.kind == "random" and cfg.task.kind == "synthetic"
    assert cfg.model.max_seq_len == cfg.task.prompt_len + cfg.rollout.max_new_tokens


def test_random_preset_skips_the_library_init_but_not_its_buffers(monkeypatch) -> None:
    """build_random skips transformers' parameter init (it draws every parameter itself); the RoPE buffers must
    still be the library's, and where they would not be, it builds the model whole instead."""
    from areal_hpc.model import presets

    small = dict(num_hidden_layers=1, vocab_size=64)
    a = presets.build_random("qwen2-0.5b", seed=2, max_positions=32, shrink=small)
    assert presets._buffers_as_library_makes(a, a.config)
    assert torch.equal(a.model.norm.weight, torch.ones_like(a.model.norm.weight))
    assert abs(float(a.model.layers[0].mlp.up_proj.weight.detach().std()) - 0.02) < 1e-3
    calls = []

    def refuse(model, cfg):  # as a transformers version would whose init also sets the buffers
        calls.append(1)
        return False

    monkeypatch.setattr(presets, "_buffers_as_library_makes", refuse)
    b = presets.build_random("qwen2-0.5b", seed=2, max_positions=32, shrink=small)
    c = presets.build_random("qwen2-0.5b", seed=2, max_positions=32, shrink=small)
    assert calls == [1, 1]  # one check per build, then the whole build
    for (n, x), (_, y) in zip(b.named_parameters(), c.named_parameters(), strict=True):
        assert torch.equal(x, y), n  # still a pure function of the seed
    assert all(torch.equal(x, y) for x, y in zip(b.buffers(), a.buffers(), strict=True))
