"""A real single-node SLURM for tests: munged, slurmctld and slurmd of Debian's packages, run as root in
the foreground with their configuration, state, spool, sockets and logs in one temporary folder.

Client commands (sbatch, squeue, scontrol) find this cluster through ``SLURM_CONF`` in :attr:`env`;
nothing under /etc or /var is touched. Needs root (slurmd starts job processes as their user).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "sinfo", "scontrol", "scancel", "srun")


def missing() -> str | None:
    """Why this machine cannot run the test cluster, or None."""
    absent = [name for name in (*DAEMONS, *CLIENTS) if not _which(name)]
    if absent:
        return f"SLURM is not installed ({', '.join(absent)} not found; apt-get install slurm-wlm munge)"
    if os.geteuid() != 0:
        return "the test SLURM runs its daemons as root"
    return None


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class SlurmCluster:
    root: Path
    cpus: int
    env: dict[str, str] = field(default_factory=dict)
    _daemons: list[subprocess.Popen] = field(default_factory=list)

    @property
    def node(self) -> str:
        return socket.gethostname().split(".")[0]

    def start(self) -> None:
        for sub in ("state", "spool", "munge", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o700)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        socket_path = self.root / "munge" / "munge.socket"
        conf = self.root / "slurm.conf"
        conf.write_text(self._conf(socket_path))
        self.env = {**os.environ, "SLURM_CONF": str(conf)}
        m = self.root / "munge"
        self._spawn(
            [_which("munged"), "--foreground", "--force", f"--socket={socket_path}", f"--key-file={key}",
             f"--pid-file={m / 'munged.pid'}", f"--log-file={self.root / 'log' / 'munged.log'}",
             f"--seed-file={m / 'munged.seed'}"],
            "munged",
        )  # fmt: skip
        _wait_for(socket_path.exists, 20, lambda: f"munged did not create its socket: {self._logs()}")
        self._spawn([_which("slurmctld"), "-D", "-i", "-f", str(conf)], "slurmctld")
        self._spawn([_which("slurmd"), "-D", "-f", str(conf)], "slurmd")
        _wait_for(self._node_idle, 60, lambda: f"the node did not come up: {self._logs()}")

    def _conf(self, munge_socket: Path) -> str:
        r = self.root
        return "\n".join(
            [
                "ClusterName=pof3dtest",
                # Job ids of their own: the batch script names Ray's folder after the job id.
                f"FirstJobId={random.randrange(10_000, 1_000_000)}",
                f"SlurmctldHost={self.node}(127.0.0.1)",
                f"SlurmctldPort={_free_port()}",
                f"SlurmdPort={_free_port()}",
                "SlurmUser=root",
                "SlurmdUser=root",
                "AuthType=auth/munge",
                "CredType=cred/munge",
                # A requeued job may start again cred_expire + 1 s later (SLURM's default is 120 s).
                f"AuthInfo=socket={munge_socket},cred_expire=5",
                f"StateSaveLocation={r / 'state'}",
                f"SlurmdSpoolDir={r / 'spool'}",
                f"SlurmctldPidFile={r / 'slurmctld.pid'}",
                f"SlurmdPidFile={r / 'slurmd.pid'}",
                f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
                f"SlurmdLogFile={r / 'log' / 'slurmd.log'}",
                "ProctrackType=proctrack/linuxproc",
                "TaskPlugin=task/none",
                "SelectType=select/cons_tres",
                "SelectTypeParameters=CR_CPU",
                "SchedulerType=sched/builtin",
                # A requeued job becomes eligible with no event that wakes the scheduler: its periodic
                # pass (60 s by default) then starts it. Every 2 s here, so it starts again within
                # seconds of its hold (about 47 s sooner in the time-limit test).
                "SchedulerParameters=sched_interval=2",
                "MpiDefault=none",
                "ReturnToService=2",
                "JobAcctGatherType=jobacct_gather/none",
                "AccountingStorageType=accounting_storage/none",
                "JobCompType=jobcomp/none",
                "MinJobAge=600",
                "KillWait=10",
                # The node declares more CPUs than the machine has, so that two jobs of two Ray CPUs fit.
                "SlurmdParameters=config_overrides",
                f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN",
                "PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
                "",
            ]
        )

    def _spawn(self, command: list[str], name: str) -> None:
        log = (self.root / "log" / f"{name}.out").open("w")
        self._daemons.append(
            subprocess.Popen(
                command, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        )

    def _node_idle(self) -> bool:
        for daemon in self._daemons:
            if daemon.poll() is not None:
                raise RuntimeError(f"{daemon.args[0]} exited with {daemon.returncode}: {self._logs()}")
        done = subprocess.run(
            ["sinfo", "--noheader", "--format=%t"], env=self.env, capture_output=True, text=True, timeout=10
        )
        return done.returncode == 0 and done.stdout.strip() == "idle"

    def _logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text()[-3000:]}"
            for p in sorted((self.root / "log").iterdir())
            if p.is_file()
        )

    def run(self, *command: str, timeout: float = 30, check: bool = True) -> str:
        done = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)}: exit {done.returncode}: {done.stderr}{done.stdout}")
        return done.stdout

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job``'s fields of one job (JobState, ExitCode, Restarts, JobName, StdOut, ...)."""
        text = self.run("scontrol", "show", "job", "--oneliner", job_id)
        return dict(item.split("=", 1) for item in text.split() if "=" in item)

    def stop(self) -> None:
        """Cancel what still runs, give the jobs' processes 5 s to end (Ray's own shutdown), kill what
        is left of them (proctrack/linuxproc loses processes whose parent died first), then stop the
        daemons: 3 s after SIGTERM they are killed (slurmctld had not stopped 20 s after it, and this
        throwaway cluster keeps no state worth a clean stop).

        What is left after a cancel is a cancelled job's training command and the Ray head it had
        started, which lost their job step: the command waits for its Ray, which is stopping, and had
        not ended 15 s later (2026-12-08), so waiting longer for them only holds the teardown."""
        if self._daemons and all(d.poll() is None for d in self._daemons):
            self.run("scancel", "--user=root", check=False)
            with contextlib.suppress(RuntimeError):
                _wait_for(lambda: not self.run("squeue", "--noheader", check=False).strip(), 60, str)
        with contextlib.suppress(RuntimeError):
            _wait_for(lambda: not self._job_processes(), 5, str)
        for pid in self._job_processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for daemon in reversed(self._daemons):
            if daemon.poll() is None:
                daemon.terminate()
                try:
                    daemon.wait(timeout=3)
                except subprocess.TimeoutExpired:
                    daemon.kill()
                    daemon.wait()
        self._daemons.clear()

    def _job_processes(self) -> list[int]:
        """Processes this cluster's jobs started, wherever they were reparented: their environment has
        this cluster's SLURM_CONF. The daemons have it too and are not counted, nor is slurmctld's script
        daemon (its child), which ends with it: waiting for it to end first would always take the whole
        wait. slurmd's children (the jobs' step daemons) are counted."""
        marker = f"SLURM_CONF={self.env.get('SLURM_CONF')}".encode()
        daemons = {d.pid for d in self._daemons}
        controller = {d.pid for d in self._daemons if Path(d.args[0]).name == "slurmctld"}
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) in daemons or int(entry.name) == os.getpid():
                continue
            with contextlib.suppress(OSError, IndexError, ValueError):
                if marker not in (entry / "environ").read_bytes().split(b"\0"):
                    continue
                # /proc/PID/stat: "pid (name) state ppid ...", the name may hold spaces
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) not in controller:
                    found.append(int(entry.name))
        return found


def _wait_for(predicate, timeout: float, message) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(message())
        time.sleep(0.2)
