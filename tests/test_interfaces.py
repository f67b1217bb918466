"""The seams: every engine, backend and channel offers its whole protocol; names come from one registry;
the train engine trains the loss it is given; a trajectory survives the HDF5 log unchanged."""

from __future__ import annotations

import ast
import inspect
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from areal_hpc import api, registry
from areal_hpc.config.schema import RolloutConfig, TrainerConfig
from areal_hpc.rollout.engine import TorchEngine
from areal_hpc.storage.writers import RolloutLogWriter
from areal_hpc.train.engine import TorchTrainEngine
from areal_hpc.train.loss import ppo_loss
from areal_hpc.trajectory import Trajectory
from areal_hpc.transport.hdf5_source import ShardSource
from areal_hpc.transport.sinks import RolloutSink
from tests.test_train_engine import make_samples, tiny_model


def protocol_members(proto: type) -> set[str]:
    """Methods, properties and annotated attributes a protocol declares."""
    names = {n for n, v in vars(proto).items() if not n.startswith("_") and (callable(v) or isinstance(v, property))}
    return names | set(getattr(proto, "__annotations__", {}))


def class_members(cls: type) -> set[str]:
    """What an instance of ``cls`` offers: its class's names plus every ``self.x`` any of its methods assigns."""
    names = {n for n in dir(cls) if not n.startswith("_")}
    for klass in cls.__mro__:
        if klass is object:
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        for node in ast.walk(tree):
            targets = node.targets if isinstance(node, ast.Assign) else \
                [node.target] if isinstance(node, ast.AnnAssign | ast.AugAssign) else []
            for t in targets:
                for el in t.elts if isinstance(t, ast.Tuple) else [t]:
                    if isinstance(el, ast.Attribute) and isinstance(el.value, ast.Name) and el.value.id == "self":
                        names.add(el.attr)
    return names


@pytest.mark.parametrize(("proto", "impls"), [
    (api.InferenceEngine, ["areal_hpc.rollout.engine:TorchEngine", "areal_hpc.rollout.fast:FastEngine"]),
    (api.TrainEngine, ["areal_hpc.train.engine:TorchTrainEngine"]),
    (api.WeightSender, ["areal_hpc.weights.broadcast:WeightSender", "areal_hpc.weights.shared:SharedWeightSender"]),
    (api.WeightReceiver, ["areal_hpc.weights.broadcast:WeightReceiver",
                          "areal_hpc.weights.shared:SharedWeightReceiver"]),
    (api.SampleSink, ["areal_hpc.transport.sinks:RolloutSink"]),
    (api.SampleSource, ["areal_hpc.transport.sinks:RingSource", "areal_hpc.transport.hdf5_source:ShardSource"]),
])
def test_every_implementation_offers_its_whole_protocol(proto: type, impls: list[str]) -> None:
    """The loops call only what the protocols declare, so an implementation must offer all of it (no
    ``getattr``/``hasattr`` probing in a loop to cover for a missing member)."""
    import importlib

    for path in impls:
        module, _, name = path.partition(":")
        cls = getattr(importlib.import_module(module), name)
        missing = protocol_members(proto) - class_members(cls)
        assert not missing, f"{path} lacks {sorted(missing)} of {proto.__name__}"


def test_registry_names_are_the_config_choices() -> None:
    fields = {f.name: f for f in RolloutConfig.__dataclass_fields__.values()}
    assert set(fields["engine"].metadata["choices"]) == {"auto", *registry.ROLLOUT_ENGINES}
    fields = {f.name: f for f in TrainerConfig.__dataclass_fields__.values()}
    assert set(fields["backend"].metadata["choices"]) == set(registry.TRAIN_BACKENDS)
    for name in registry.ROLLOUT_ENGINES:
        assert callable(registry.rollout_engine_factory(name))
    for name in registry.TRAIN_BACKENDS:
        assert callable(registry.train_backend_factory(name))
    with pytest.raises(ValueError, match=r"trainer.backend='deepspeed' is not registered; choose one of torch"):
        registry.train_backend_factory("deepspeed")


def test_hf_engine_is_an_inference_engine() -> None:
    from areal_hpc.model.tokenizer import CharTokenizer

    tok = CharTokenizer("0123456789+=")
    model = tiny_model()
    eng = TorchEngine(model, tok, max_batch=4, max_new_tokens=3, temperature=1.0, top_p=1.0)
    assert isinstance(eng.stats(), dict) and eng.stats()["engine"] == "hf"


def test_train_batch_trains_the_loss_it_is_given() -> None:
    """A loss other than PPO (plain policy gradient, -A·logp) reaches the optimizer, and its own stats come
    back as global means of (sum, count)."""

    def pg_loss(t: api.TokenInputs) -> tuple[torch.Tensor, api.LossStats]:
        n = torch.tensor(float(t.logp.numel()), dtype=torch.float64)
        return -(t.advantages * t.logp).mean(), {"mean_logp": (t.logp.detach().double().sum(), n)}

    samples = make_samples(8)
    adv = np.linspace(-1, 1, len(samples)).astype(np.float32)
    engines = []
    for _ in range(2):
        torch.manual_seed(0)
        engines.append(TorchTrainEngine(tiny_model(), TrainerConfig(lr=1e-2, token_budget=24), pad_id=0,
                                        temperature=1.0))
    logp = engines[0].compute_logp(samples)
    flat = np.concatenate(logp)
    st = engines[0].train_batch(api.TrainBatch(samples, adv, np.ones(len(samples), np.float32)), pg_loss)
    assert st.n_microbatches > 1
    assert st.loss_stats == {"mean_logp": pytest.approx(float(flat.mean()), rel=1e-5)}
    per_tok_adv = np.repeat(adv, [s.n_response for s in samples])
    assert st.loss == pytest.approx(float(-(per_tok_adv * flat).mean()), rel=1e-4)
    ppo = engines[1].train_batch(api.TrainBatch(samples, adv, np.ones(len(samples), np.float32)),
                                 ppo_loss(engines[1].cfg))
    assert set(ppo.loss_stats) == {"clip_frac", "cap_frac", "ratio", "approx_kl", "importance_weight"}
    moved = [not torch.equal(a, b) for a, b in zip(engines[0].model.parameters(), engines[1].model.parameters())]
    assert any(moved)  # two losses, two different updates from the same start


def test_train_batch_rejects_misaligned_batches() -> None:
    samples = make_samples(3)
    with pytest.raises(ValueError, match="3 samples but 0 prox_logp, 2 advantages, 3 sample weights"):
        api.TrainBatch(samples, np.zeros(2), np.ones(3))
    with pytest.raises(ValueError, match="prox logprobs for"):
        api.TrainBatch(samples, np.zeros(3), np.ones(3), [np.zeros(99, np.float32)] * 3)


def test_trajectory_round_trips_through_the_hdf5_log(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    trajs = [Trajectory(sample_id=10 + i, group_id=i // 2, prompt_tokens=rng.integers(0, 50, 5),
                        response_tokens=rng.integers(0, 50, 3 + i), behav_logprobs=-rng.random(3 + i),
                        versions=np.full(3 + i, i, np.int32), reward=float(i % 2), rank=3, answer_ok=bool(i % 2),
                        t_start=1.5, t_end=2.5 + i, interruptions=i, fate="stop", text=f"r{i} é", answer=str(i),
                        reward_seconds=0.25 * i, reward_timed_out=i == 3)
             for i in range(4)]
    sink = RolloutSink(RolloutLogWriter(tmp_path, 0, attrs={"run_id": "x", "config_yaml": "", "rank": 3},
                                        shard_samples=3, flush_s=60.0, compression="none"), ring=None)
    for t in trajs:
        sink.put(t, wait=lambda: None)
    sink.close()
    source = ShardSource(tmp_path, 0, retain=True)
    back = source.poll()
    assert source.shards_read == 2 and len(back) == len(trajs)
    for a, b in zip(trajs, back, strict=True):
        for f in ("sample_id", "prompt_id", "group_id", "rank", "answer_ok", "t_start", "t_end", "interruptions",
                  "text", "answer", "reward_timed_out"):
            assert getattr(a, f) == getattr(b, f), f
        assert b.reward == pytest.approx(a.reward)
        assert b.reward_seconds == pytest.approx(a.reward_seconds)
        for f in ("prompt_tokens", "response_tokens", "versions"):
            np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
        np.testing.assert_allclose(a.behav_logprobs, b.behav_logprobs)
        assert b.fate is None  # the log (schema 1) does not record it
