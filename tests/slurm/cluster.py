"""A throw-away single-node SLURM cluster for tests (Debian packages slurm-wlm and munge).

munged, slurmctld and slurmd run as this user on this machine, with a configuration generated
into a fresh directory (``slurm.conf.in`` beside this file): own ports, own munge key and
socket, own state, spool, logs and PID files, so it never touches a system SLURM or munge and
two test sessions can run side by side. Stopped by the PIDs in the PID files.

Clients (sbatch, squeue, scontrol, sacct, and the Snakemake SLURM executor plugin) find the
cluster through ``SLURM_CONF``; :meth:`LocalSlurm.env` returns an environment with it set.

By hand::

    python tests/slurm/cluster.py start /tmp/slurm-test   # prints `export SLURM_CONF=...`
    python tests/slurm/cluster.py stop /tmp/slurm-test
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DAEMONS = ("slurmd", "slurmctld", "munged")  # stop order
BINARIES = (
    "munged",
    "slurmctld",
    "slurmd",
    "srun",
    "sbatch",
    "squeue",
    "sinfo",
    "scontrol",
    "scancel",
    "sacct",
)


def missing_binaries() -> list[str]:
    """SLURM / munge programs not found on PATH (or in /usr/sbin)."""
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin" + os.pathsep + "/sbin"
    return [b for b in BINARIES if shutil.which(b, path=path) is None]


def _which(name: str) -> str:
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin" + os.pathsep + "/sbin"
    found = shutil.which(name, path=path)
    if found is None:
        raise FileNotFoundError(name)
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _machine_mem_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")


class LocalSlurm:
    """One munged + slurmctld + slurmd in ``root``; use :meth:`start` / :meth:`stop`."""

    def __init__(self, root: Path, cpus: int = 2, partition: str = "local", fake_gpus: int = 1):
        self.root = Path(root).resolve()
        self.cpus = cpus
        self.partition = partition
        self.fake_gpus = fake_gpus
        self.host = socket.gethostname().split(".")[0]
        # leave ~2 GB to the OS and the Snakemake main process
        self.mem_mb = max(1000, _machine_mem_mb() - 2048)
        self.conf = self.root / "slurm.conf"
        self.jobcomp = self.root / "jobcomp.txt"

    # --- configuration -------------------------------------------------------------------
    def write_config(self) -> None:
        for sub in ("state", "spool", "munge"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o700)
        key = self.root / "munge" / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
            os.chmod(key, 0o600)
        gres = f"Gres=gpu:{self.fake_gpus}" if self.fake_gpus else ""
        text = (HERE / "slurm.conf.in").read_text()
        for k, v in {
            "@DIR@": str(self.root),
            "@HOST@": self.host,
            "@CTLD_PORT@": str(_free_port()),
            "@SLURMD_PORT@": str(_free_port()),
            "@CPUS@": str(self.cpus),
            "@MEM_MB@": str(self.mem_mb),
            "@GRES@": gres,
            "@PARTITION@": self.partition,
        }.items():
            text = text.replace(k, v)
        self.conf.write_text(text)
        # A GPU that is only a count (no device file): SLURM allocates it like a real one, so
        # `--gpus=1` jobs schedule and show gres/gpu in their TRES; nothing uses CUDA.
        gres_lines = (
            f"NodeName={self.host} Name=gpu File=/dev/null Count={self.fake_gpus}\n"
            if self.fake_gpus
            else ""
        )
        (self.root / "gres.conf").write_text(gres_lines)
        # The jobstep plugin drops every SLURM_* variable (SLURM_CONF too) before its `srun`
        # inside the job; on a real cluster srun finds /etc/slurm/slurm.conf, here a shim on
        # PATH (exported to the job) points it at this cluster's configuration.
        bindir = self.root / "bin"
        bindir.mkdir(exist_ok=True)
        for tool in ("srun", "sbatch", "squeue", "scontrol", "scancel", "sinfo", "sacct"):
            shim = bindir / tool
            shim.write_text(
                f'#!/bin/sh\nSLURM_CONF="${{SLURM_CONF:-{self.conf}}}" exec {_which(tool)} "$@"\n'
            )
            shim.chmod(0o755)

    def env(self, base: dict | None = None) -> dict:
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = f"{self.root / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        for var in [v for v in env if v.startswith(("SLURM_JOB", "SBATCH_", "SLURM_CPUS"))]:
            env.pop(var)  # never inherit an outer allocation
        return env

    def run(self, *cmd: str, check: bool = True, timeout: int = 60) -> subprocess.CompletedProcess:
        return subprocess.run(
            list(cmd), env=self.env(), capture_output=True, text=True, check=check, timeout=timeout
        )

    # --- daemons -------------------------------------------------------------------------
    def pid_file(self, daemon: str) -> Path:
        return self.root / ("munge/munged.pid" if daemon == "munged" else f"{daemon}.pid")

    def start(self, timeout: float = 60) -> None:
        """Start munged, slurmctld, slurmd; wait until the node is idle (stop all on failure)."""
        self.write_config()
        try:
            self._start_daemons()
        except BaseException:
            self.stop()
            raise
        self._wait_idle(timeout)

    def _start_daemons(self) -> None:
        m = self.root / "munge"
        subprocess.run(
            [
                _which("munged"),
                "--force",
                f"--socket={m}/munge.socket",
                f"--key-file={m}/munge.key",
                f"--pid-file={m}/munged.pid",
                f"--log-file={m}/munged.log",
                f"--seed-file={m}/munged.seed",
            ],
            check=True,
            capture_output=True,
            text=True,
            timeout=30,
        )
        env = self.env()
        subprocess.run(
            [_which("slurmctld"), "-f", str(self.conf), "-i"],
            check=True,
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        subprocess.run(
            [_which("slurmd"), "-f", str(self.conf), "-N", self.host],
            check=True,
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.time() + timeout
        state = ""
        while time.time() < deadline:
            res = self.run("sinfo", "-h", "-N", "-o", "%T", check=False)
            state = res.stdout.strip()
            if state == "idle":
                return
            if not all(self.alive().values()):
                break
            time.sleep(1)
        logs = "\n".join(
            f"--- {p.name}\n{p.read_text()[-2000:]}"
            for p in (self.root / "slurmctld.log", self.root / "slurmd.log")
            if p.exists()
        )
        self.stop()
        raise RuntimeError(f"SLURM node not idle (state {state!r}, daemons {self.alive()})\n{logs}")

    def stop(self, timeout: float = 20) -> None:
        """Stop every daemon by the PID in its PID file (TERM, then KILL)."""
        for daemon in DAEMONS:
            pid_file = self.pid_file(daemon)
            if not pid_file.exists():
                continue
            try:
                pid = int(pid_file.read_text().strip())
            except ValueError:
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.time() + timeout
            while time.time() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.2)
            else:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def alive(self) -> dict[str, bool]:
        out = {}
        for daemon in DAEMONS:
            pid_file = self.pid_file(daemon)
            ok = False
            if pid_file.exists():
                try:
                    os.kill(int(pid_file.read_text().strip()), 0)
                    ok = True
                except (ProcessLookupError, ValueError):
                    pass
            out[daemon] = ok
        return out

    # --- records -------------------------------------------------------------------------
    def completed_jobs(self) -> list[dict[str, str]]:
        """The job-completion log (jobcomp/filetxt): one dict per finished job.

        Fields as SLURM writes them: JobId, JobName, JobState, Partition, TimeLimit (minutes),
        ProcCnt (CPUs), Tres (cpu=..,mem=..M,node=..[,gres/gpu=..]), WorkDir, ExitCode, ...
        """
        if not self.jobcomp.exists():
            return []
        jobs = []
        for line in self.jobcomp.read_text().splitlines():
            rec: dict[str, str] = {}
            for field in line.split():
                if "=" in field:
                    k, v = field.split("=", 1)
                    rec[k] = v
            if rec:
                jobs.append(rec)
        return jobs

    def show_job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job -o <id>` as a dict (slurmctld keeps jobs for MinJobAge)."""
        res = self.run("scontrol", "show", "job", "-o", str(job_id), check=False)
        rec: dict[str, str] = {}
        for field in res.stdout.split():
            if "=" in field:
                k, v = field.split("=", 1)
                rec[k] = v
        return rec


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[1] not in ("start", "stop"):
        print(__doc__)
        return 2
    cluster = LocalSlurm(Path(argv[2]))
    if argv[1] == "start":
        cluster.start()
        print(f"export SLURM_CONF={cluster.conf}")
    else:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
