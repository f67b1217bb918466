"""What can be checked before the ranks start: the inputs a config points at and the MPI world's size.

The config loader checks values; these checks look at the machine: that ``model.path`` is a checkpoint,
that the dataset parses, that ``model.device=cuda`` has a GPU, that the world has the config's ranks.
Inside the ranks the same mistakes surface only after MPI start-up and the warm-up, on every rank at
once. The launcher (``areal-hpc train``, ``submit --local``) runs them before mpiexec; a job started by
mpiexec/srun directly runs them on rank 0 before the ranks do anything else. Each uses the same code the
ranks use (``check_checkpoint``, ``PromptBuilder``, ``build_task``, ``build_scorer``, ``resolve_device``),
so a check cannot drift from what the ranks would do.
"""

from __future__ import annotations

from areal_hpc.comm.mpi import check_world_size, world_bcast, world_rank, world_size
from areal_hpc.config import Config
from areal_hpc.launch.environment import check_world_matches_launcher


class PreflightError(Exception):
    """A one-line message naming the key at fault and the fix; the run has not started."""


def check_inputs(cfg: Config, *, device: bool = True) -> None:
    """The checkpoint, the task's data and (``device``: on the machine the ranks run on) the device."""
    from areal_hpc.model.build import resolve_device
    from areal_hpc.model.source import check_checkpoint, is_gguf
    from areal_hpc.reward.scorer import build_scorer
    from areal_hpc.tasks import build_task

    try:
        if cfg.model.kind == "hf" and cfg.model.path is not None:
            checkpoint = check_checkpoint(cfg.model.path, "model.path")
            if cfg.prompt.format == "chat" and not is_gguf(checkpoint):  # a GGUF's tokenizer is read at conversion
                from areal_hpc.model.tokenizer import load_tokenizer
                from areal_hpc.tasks.prompt import PromptBuilder

                PromptBuilder(cfg.prompt, load_tokenizer(checkpoint))
        task = build_task(cfg)
        scorer = build_scorer(cfg.reward)  # reward.fn imports here, not on every rank after start-up
        scorer.check(task.train_problem(0))
        if device:
            resolve_device(cfg.model.device)
    except (OSError, ImportError, ValueError, RuntimeError) as e:
        raise PreflightError(str(e)) from None


def check_world(cfg: Config, size: int) -> None:
    """An MPI world of the config's size, wired up by the launcher (srun without --mpi gives worlds of 1)."""
    try:
        check_world_matches_launcher(size)
        check_world_size(size, cfg.cluster.n_trainer, cfg.cluster.n_rollout)
    except RuntimeError as e:
        raise PreflightError(str(e)) from None


def check_in_job(cfg: Config) -> str | None:
    """Inside an MPI job, before any rank's work: rank 0 checks, every rank gets its answer (None: go on).

    Collective. Only rank 0 looks, so a mistake is one line rather than one per rank; every rank gets the
    answer so all stop together rather than some waiting in a collective for ranks that left.
    """
    size = world_size()
    problem = None
    if world_rank() == 0:
        try:
            check_world(cfg, size)
            check_inputs(cfg)
        except PreflightError as e:
            problem = str(e)
    return world_bcast(problem) if size > 1 else problem
