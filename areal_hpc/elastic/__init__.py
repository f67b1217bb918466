"""Elastic rollout: workers from other Slurm jobs (or this machine) attach to a running run through its folder.

The run folder on a shared filesystem is the only meeting point: a worker registers and renews a lease there
(``lease.py``), the trainers write it grants of prompt groups (``grants.py``, planned by ``planner.py``), it
reads the newest weights from the disk channel (``weights/disk.py``) and writes its samples as HDF5 shards like
any rollout rank (``worker.py``). Nothing here needs MPI between the run and its workers.
"""
