"""The scripts as a new user meets them: the apt install of Slurm stays off the console, job logs stay out of git."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _fake_checkout(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """scripts/test.sh in a checkout whose install, Slurm install and pytest are stand-ins, as root with apt."""
    repo, shims = tmp_path / "repo", tmp_path / "shims"
    for d in (repo / "scripts", repo / "slurm", repo / ".venv" / "bin", shims):
        d.mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "test.sh", repo / "scripts" / "test.sh")
    files = {
        repo / "scripts" / "install.sh": "exit 0\n",
        repo / "slurm" / "local-cluster.sh": 'for i in $(seq 300); do echo "Unpacking package $i ..."; done\n'
                                             'exit "${FAKE_APT_RC:-0}"\n',
        repo / ".venv" / "bin" / "python": '#!/bin/sh\necho "python $*"\n',
        shims / "id": "#!/bin/sh\necho 0\n",
        shims / "apt-get": "#!/bin/sh\nexit 0\n",
    }
    for path, text in files.items():
        path.write_text(text)
        path.chmod(0o755)
    env = {**os.environ, "PATH": f"{shims}{os.pathsep}/usr/bin{os.pathsep}/bin", "TMPDIR": str(tmp_path)}
    if shutil.which("slurmctld", path=env["PATH"]):
        pytest.skip("slurmctld is on /usr/bin or /bin here: test.sh would rightly skip the install")
    return repo, env


def _run(repo: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(repo / "scripts" / "test.sh"), "-x"], capture_output=True, text=True,
                          env=env, timeout=60)


def test_test_sh_keeps_the_apt_lines_in_a_file(tmp_path):
    repo, env = _fake_checkout(tmp_path)
    out = _run(repo, env)
    assert out.returncode == 0, out.stderr
    console = (out.stdout + out.stderr).splitlines()
    assert len(console) <= 5 and not any("Unpacking" in line for line in console), console
    assert "python -m pytest -q -ra --durations=25 -x" in out.stdout
    assert any("Slurm" in line and "INSTALL_SLURM=0" in line for line in console), console  # says what it does
    assert len((tmp_path / "areal-hpc-slurm-install.log").read_text().splitlines()) == 300


def test_test_sh_shows_the_end_of_a_failed_slurm_install_and_goes_on(tmp_path):
    repo, env = _fake_checkout(tmp_path)
    out = _run(repo, {**env, "FAKE_APT_RC": "1"})
    assert out.returncode == 0 and "python -m pytest" in out.stdout, out.stderr
    assert "Unpacking package 300" in out.stderr and "could not install Slurm" in out.stderr, out.stderr
    assert len(out.stderr.splitlines()) <= 25


def test_test_sh_leaves_the_system_alone_with_install_slurm_0(tmp_path):
    repo, env = _fake_checkout(tmp_path)
    out = _run(repo, {**env, "INSTALL_SLURM": "0"})
    assert out.returncode == 0 and "python -m pytest" in out.stdout, out.stderr
    assert not (tmp_path / "areal-hpc-slurm-install.log").exists()


def test_the_sbatch_templates_job_logs_are_not_offered_to_git():
    """run.sbatch writes slurm-%x-%j.out into the submit directory, usually the checkout."""
    if not (REPO / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout")
    out = subprocess.run(["git", "check-ignore", "-q", "slurm-areal-hpc-1234.out"], cwd=REPO, timeout=30)
    assert out.returncode == 0, "slurm-*.out is not in .gitignore"
