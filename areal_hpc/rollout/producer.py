"""A rollout producer's work on a prompt group once it is admitted: submit, decode, score, deliver.

Both producers of samples share it: an in-job rollout rank (``rollout/worker.py``, admission by its staleness
gate, weights over MPI/NCCL) and a worker attached from another job (``elastic/worker.py``, admission by the
trainer's grants, weights from the run folder). What differs is how a group is admitted, where weights come
from and where samples go (``sink``); each subclass brings those and its ``poll`` (what to do while waiting on
a full sink).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod

from areal_hpc.api import Generation, GenRequest, SampleSink
from areal_hpc.config import Config
from areal_hpc.reward.pool import RewardPool
from areal_hpc.reward.result import RewardResult
from areal_hpc.reward.scorer import build_scorer
from areal_hpc.rollout.build import build_engine
from areal_hpc.tasks import Problem, build_task
from areal_hpc.tasks.prompt import PromptBuilder
from areal_hpc.trajectory import Trajectory

log = logging.getLogger(__name__)

#: Sample ids of granted groups (elastic/: an attached worker's, or one a trainer took back from it) lie above
#: every in-job id (attempt·10^12 + prompt·G + j), apart per attempt of the run, unique per grant issue.
GRANTED_SAMPLE_BASE = 1 << 60
GRANTED_ATTEMPT_STRIDE = 1 << 50


def granted_sample_base(attempt: int, issue: int, group_size: int) -> int:
    """First sample id of the group of grant ``issue``."""
    return GRANTED_SAMPLE_BASE + attempt * GRANTED_ATTEMPT_STRIDE + issue * group_size


class GroupProducer(ABC):
    sink: SampleSink

    def __init__(self, cfg: Config, model, tok, *, rank: int, worker: int, seed: int) -> None:
        self.cfg, self.tok, self.rank, self.worker = cfg, tok, rank, worker
        self.G = cfg.rollout.group_size
        self.task = build_task(cfg)
        self.prompts = PromptBuilder(cfg.prompt, tok)
        self.rewards = RewardPool(build_scorer(cfg.reward), cfg.reward.workers, cfg.reward.timeout_s)
        self.engine = build_engine(cfg, model, tok, seed=seed)
        self._groups: dict[int, list[Generation]] = {}
        self._problems: dict[int, Problem] = {}  # prompt of each group in flight, for the verifier
        # Groups whose members are all generated, waiting for their rewards (in the order they finished:
        # group -> members), and each member's result as it comes back from the pool (keyed by sample id).
        self._scoring: dict[int, list[Generation]] = {}
        self._scored: dict[int, RewardResult] = {}
        self._texts: dict[int, str] = {}  # each scored sample's decoded response, by sample id
        self.reward_seconds = 0.0
        self.reward_timeouts = 0
        self._reward_errors: set[str] = set()  # distinct scoring errors already logged (a few, not one per sample)
        self.pushed = 0

    @abstractmethod
    def poll(self) -> None:
        """Service control and weights; called between decode steps and while a full sink holds a push."""

    def _submit_group(self, prompt_index: int, sample_base: int) -> None:
        """Start the ``G`` samples of prompt ``prompt_index``, numbered ``sample_base + j``."""
        problem = self.task.train_problem(prompt_index)
        self._problems[prompt_index] = problem
        tokens = self.prompts.ids(problem)
        self.engine.submit(
            GenRequest(sample_id=sample_base + j, prompt_id=prompt_index, group_id=prompt_index,
                       prompt_tokens=tokens, max_tokens=problem.max_tokens)
            for j in range(self.G)
        )

    def _finish(self, g: Generation) -> None:
        """A member is done; once its whole group is, the group goes to the reward pool."""
        members = self._groups.setdefault(g.request.group_id, [])
        members.append(g)
        if len(members) == self.G:
            gid = g.request.group_id
            del self._groups[gid]
            self._scoring[gid] = members
            problem = self._problems[gid]
            for m in members:
                out = self._response(m)
                text = self._texts[m.request.sample_id] = self.tok.decode(out)  # decoded once, logged at push
                self.rewards.submit(m.request.sample_id, problem, tuple(out), text)

    def _response(self, g: Generation) -> list[int]:
        """The response the verifier sees: stop tokens dropped (decoded without special tokens)."""
        stops = self.tok.stop_ids
        return [t for t in g.tokens if t not in stops]

    def _collect(self) -> None:
        """Rewards back from the pool; scored groups go to the trainer in the order they finished generating.

        Why in order: the staleness gate's bound assumes the trainer consumes a rank's groups in the order
        they were admitted (as generation finishes them). Scores come back from several workers in any
        order; delivering a later group first would push an earlier one into the next batch, one version
        staler than the gate allows, and the trainer would reject it.
        """
        for sample_id, result in self.rewards.ready():
            self._note_error(result)
            self._scored[sample_id] = result
        while self._scoring:
            gid, members = next(iter(self._scoring.items()))  # the oldest finished group
            if not all(m.request.sample_id in self._scored for m in members):
                return
            del self._scoring[gid]
            problem = self._problems.pop(gid)
            for m in sorted(members, key=lambda x: x.request.sample_id):
                self._push(m, problem, self._scored.pop(m.request.sample_id))

    def _note_error(self, result: RewardResult) -> None:
        """A verifier that fails on every sample (a user's reward.fn raising, a sandbox that cannot start)
        would otherwise only show as rewards of 0: say its first few distinct errors."""
        broken = result.error.startswith(("reward pool", "reward worker died", "reference answer"))
        user_fn = self.cfg.reward.fn is not None and bool(result.error)  # wrong answers of the built-in
        if not (broken or user_fn) or len(self._reward_errors) >= 5:  # verifiers also carry an error: not these
            return
        key = result.error[:80]
        if key not in self._reward_errors:
            self._reward_errors.add(key)
            log.warning("reward: a sample scored 0 because its scoring failed: %s", result.error)

    def _push(self, g: Generation, problem: Problem, result: RewardResult) -> None:
        r = g.request
        self.reward_seconds += result.seconds
        self.reward_timeouts += result.timed_out
        self.sink.put(Trajectory(
            sample_id=r.sample_id, prompt_id=r.prompt_id, group_id=r.group_id, rank=self.rank, worker=self.worker,
            prompt_tokens=r.prompt_tokens, response_tokens=g.tokens, behav_logprobs=g.logprobs, versions=g.versions,
            reward=result.reward, answer_ok=result.reward >= 1.0, t_start=g.t_start, t_end=g.t_end,
            interruptions=g.interruptions, fate=g.fate(self.tok.stop_ids), text=self._texts.pop(r.sample_id),
            answer=problem.answer, reward_seconds=result.seconds, reward_timed_out=result.timed_out),
            wait=self.poll)
        self.pushed += 1
