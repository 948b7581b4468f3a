"""A real single-node Slurm cluster on this machine, for the tests: munge + slurmctld + slurmd in a temp folder.

Needs Debian's slurmctld, slurmd, slurm-client and munge (``.ci/run`` installs them; ``ensure_installed`` tries
apt-get when they are missing) and root (the daemons run as root with SlurmUser=root).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Dict, Optional

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]


def ensure_installed() -> Optional[str]:
    """None when the daemons are available, else the reason they cannot be."""
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "munged", "mungekey", "sbatch")):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "Slurm is not installed and cannot be (needs root and apt-get)"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True)
    proc = subprocess.run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES],
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        return f"apt-get install {' '.join(PACKAGES)} failed: {proc.stderr.strip()[-300:]}"
    return None


class SlurmCluster:
    def __init__(self, root: Path, cpus: int = 2) -> None:
        self.root = root
        self.node = socket.gethostname().split(".")[0]
        self.cpus = cpus
        self.conf = root / "slurm.conf"
        self.env: Dict[str, str] = dict(os.environ, SLURM_CONF=str(self.conf))

    def _write_conf(self) -> None:
        r = self.root
        (r / "state").mkdir(parents=True, exist_ok=True)
        (r / "spool").mkdir(exist_ok=True)
        self.conf.write_text(f"""ClusterName=c2ftest
SlurmctldHost={self.node}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={r}/munge/munge.socket.2,cred_expire=10
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={r}/slurmctld.log
SlurmdLogFile={r}/slurmd-%n.log
SlurmctldPort=6817
SlurmdPort=6818
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_interval=2,bf_interval=2
DependencyParameters=kill_invalid_depend
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SlurmdParameters=config_overrides
MinJobAge=600
KillWait=30
NodeName={self.node} NodeAddr=127.0.0.1 Port=6818 CPUs={self.cpus} RealMemory=8000 State=UNKNOWN
PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
""")

    def start(self) -> None:
        self._write_conf()
        munge = self.root / "munge"
        munge.mkdir(exist_ok=True)
        os.chmod(munge, 0o755)
        key = munge / "munge.key"
        subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True, capture_output=True)
        subprocess.run(
            [
                "munged",
                f"--key-file={key}",
                f"--socket={munge}/munge.socket.2",
                f"--pid-file={munge}/munged.pid",
                f"--log-file={munge}/munged.log",
                f"--seed-file={munge}/munged.seed",
                "--force",
            ],
            check=True,
            capture_output=True,
        )
        subprocess.run(["slurmctld", "-c", "-f", str(self.conf)], check=True, env=self.env, capture_output=True)
        subprocess.run(["slurmd", "-f", str(self.conf), "-N", self.node], check=True, env=self.env, capture_output=True)
        deadline = time.time() + 60
        while time.time() < deadline:
            out = subprocess.run(["sinfo", "-h", "-o", "%t"], env=self.env, capture_output=True, text=True).stdout
            if out.strip() in ("idle", "mix", "alloc"):
                return
            time.sleep(0.5)
        raise RuntimeError(f"the Slurm node did not come up: {(self.root / 'slurmctld.log').read_text()[-2000:]}")

    def stop(self) -> None:
        subprocess.run(["scontrol", "shutdown"], env=self.env, capture_output=True)
        for pid_file in [
            self.root / "slurmctld.pid",
            self.root / f"slurmd-{self.node}.pid",
            self.root / "munge" / "munged.pid",
        ]:
            deadline = time.time() + 15
            while pid_file.exists() and time.time() < deadline:
                try:
                    pid = int(pid_file.read_text().strip())
                    os.kill(pid, 0)
                except (ValueError, ProcessLookupError, FileNotFoundError):
                    break
                if pid_file.name == "munged.pid" or time.time() > deadline - 10:
                    os.kill(pid, 15)
                time.sleep(0.3)

    def job(self, job_id: str) -> Dict[str, str]:
        out = subprocess.run(
            ["scontrol", "show", "job", "-o", job_id], env=self.env, capture_output=True, text=True
        ).stdout
        fields = {}
        for token in out.split():
            if "=" in token:
                k, v = token.split("=", 1)
                fields[k] = v
        return fields

    def wait(
        self,
        job_id: str,
        timeout: float = 600,
        states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"),
    ) -> Dict[str, str]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(1)
        raise TimeoutError(f"job {job_id} still {self.job(job_id).get('JobState')} after {timeout} s")
