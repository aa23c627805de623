"""A private single-node SLURM cluster on localhost, for tests.

Debian's slurm-wlm 22.05 and munge, without systemd or cgroups (see "A real SLURM on one machine" in
the project's field notes): a munged on its own socket and key, then slurmctld and slurmd as root,
all configured, logged and keeping their state in one temporary folder, on free ports. Nothing
outside that folder is touched (besides installing the Debian packages when asked), and `stop()`
ends exactly the daemons it started, by the pids in their pid files.

Usable from Python (`with SlurmCluster(...) as cluster:`) or by hand:

    python tests/slurm_cluster.py up /tmp/myslurm      # prints `export SLURM_CONF=... PATH=...`
    python tests/slurm_cluster.py down /tmp/myslurm    # stops the daemons; the folder stays
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PACKAGES = ["slurm-wlm", "slurmctld", "slurmd", "slurm-client", "munge"]
BINARIES = ["munged", "slurmctld", "slurmd", "sbatch", "srun", "squeue", "sinfo", "sacct", "scontrol", "scancel"]
CLIENTS = ["sbatch", "srun", "salloc", "squeue", "sinfo", "sacct", "scontrol", "scancel", "sacctmgr", "sshare"]
PATHS = ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]


class SlurmUnavailable(RuntimeError):
    """SLURM cannot run here (no packages and no way to install them, or daemons that never came up)."""


def which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(PATHS))


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if which(b) is None]


def ensure_installed(allow_install: bool = True, timeout: float = 600) -> None:
    """Install the Debian packages when a binary is missing and we may (root, apt-get present)."""
    missing = missing_binaries()
    if not missing:
        return
    if not allow_install:
        raise SlurmUnavailable(f"SLURM binaries missing ({', '.join(missing)}) and installing is disabled")
    if os.geteuid() != 0 or which("apt-get") is None:
        raise SlurmUnavailable(f"SLURM binaries missing ({', '.join(missing)}); install the Debian packages "
                               f"{' '.join(PACKAGES)} (needs root and apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]):
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise SlurmUnavailable(f"`{' '.join(cmd)}` timed out after {timeout:.0f} s") from None
        if proc.returncode != 0:
            raise SlurmUnavailable(f"`{' '.join(cmd)}` failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    missing = missing_binaries()
    if missing:
        raise SlurmUnavailable(f"still missing after installing {' '.join(PACKAGES)}: {', '.join(missing)}")


def free_ports(n: int) -> list[int]:
    sockets, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        sockets.append(s)
        ports.append(s.getsockname()[1])
    for s in sockets:
        s.close()
    return ports


def total_memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise SlurmUnavailable("cannot read MemTotal from /proc/meminfo")


def short_hostname() -> str:
    return socket.gethostname().split(".")[0]


class SlurmCluster:
    """munged + slurmctld + slurmd on localhost, all state under `root`.

    partitions: names of the partitions; the first is the default. All hold the one node.
    gpus: number of GPUs the node advertises as generic resources (gres/gpu, no device files): lets
    a test submit `--gpus=1` jobs on a machine without a GPU, to check what is asked for.
    """

    def __init__(self, root: Path | None = None, partitions: tuple[str, ...] = ("debug",), gpus: int = 0,
                 cpus: int | None = None):
        self.own_root = root is None
        self.root = Path(root or tempfile.mkdtemp(prefix="sfsd-slurm-")).resolve()
        self.partitions = list(dict.fromkeys(partitions))
        self.gpus = gpus
        self.cpus = cpus  # None: what slurmd -C finds
        self.node = short_hostname()
        self.conf = self.root / "etc" / "slurm.conf"
        self.jobcomp = self.root / "log" / "jobcomp.txt"
        self.munge_dir = self.root / "munge"
        self.munge_socket = self.munge_dir / "munge.socket"
        self.pid_files = {  # in start order; stopped in reverse
            "munged": self.munge_dir / "munged.pid",
            "slurmctld": self.root / "run" / "slurmctld.pid",
            "slurmd": self.root / "run" / "slurmd.pid",
        }

    # environment for clients (sbatch, squeue, sacct, snakemake and the jobs it submits)
    @property
    def env(self) -> dict[str, str]:
        path = os.environ.get("PATH", "")
        extra = [p for p in PATHS if p not in path.split(os.pathsep)]
        return {**os.environ, "SLURM_CONF": str(self.conf),
                "PATH": os.pathsep.join([str(self.root / "bin"), path, *extra])}

    def write_client_shims(self) -> None:
        """bin/<client> runs the real client with SLURM_CONF set. SLURM_CONF alone does not reach
        every client: the slurm-jobstep plugin drops SLURM_* variables (SLURM_CONF among them)
        before its `srun` inside a job, which would then look for /etc/slurm/slurm.conf. A real
        cluster keeps its config there (or runs configless); this one must not touch /etc."""
        bin_dir = self.root / "bin"
        bin_dir.mkdir(parents=True, exist_ok=True)
        for name in CLIENTS:
            real = which(name)
            if real is None:
                continue
            shim = bin_dir / name
            shim.write_text(f'#!/bin/sh\nSLURM_CONF="{self.conf}" exec {real} "$@"\n')
            shim.chmod(0o755)

    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
        return proc

    # ---- configuration ----------------------------------------------------------------------
    def cpu_layout(self) -> str:
        """CPUs and the socket/core/thread layout that `slurmd -C` detects (a node configured with
        more than its hardware would be drained); CPUs=<cpus> alone when slurmd -C says nothing."""
        try:
            out = subprocess.run([which("slurmd"), "-C"], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.TimeoutExpired):
            out = ""
        fields = dict(f.split("=", 1) for f in out.split() if "=" in f)
        if "CPUs" in fields and (self.cpus is None or fields["CPUs"] == str(self.cpus)):
            keys = ("CPUs", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore")
            return " ".join(f"{k}={fields[k]}" for k in keys if k in fields)
        return f"CPUs={self.cpus or os.cpu_count() or 1}"

    def write_config(self) -> None:
        for sub in ("etc", "run", "state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)  # munged (user munge) must reach its folder below
        ctld_port, slurmd_port = free_ports(2)
        real_memory = int(total_memory_mb() * 0.9)
        gres = ""
        if self.gpus:
            # slurmd drops GPUs without a device file: /dev/null stands in (nothing binds devices here)
            (self.root / "etc" / "gres.conf").write_text(
                "".join(f"NodeName={self.node} Name=gpu File=/dev/null\n" for _ in range(self.gpus)))
            gres = f" Gres=gpu:{self.gpus}"
        lines = [
            "# written by tests/slurm_cluster.py: a private single-node cluster",
            "ClusterName=sfsdtest",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={slurmd_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            f"StateSaveLocation={self.root / 'state'}",
            f"SlurmdSpoolDir={self.root / 'spool'}",
            f"SlurmctldPidFile={self.pid_files['slurmctld']}",
            f"SlurmdPidFile={self.pid_files['slurmd']}",
            f"SlurmctldLogFile={self.root / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={self.root / 'log' / 'slurmd.log'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            # no systemd, no cgroups
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory",
            "SchedulerType=sched/backfill",
            # no accounting database: `sacct -c` reads the job completion file instead
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/filetxt",
            f"JobCompLoc={self.jobcomp}",
            # finished jobs stay visible to `squeue --states=all` (the status command without a database)
            "MinJobAge=600",
            "ReturnToService=2",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=30",
            "InactiveLimit=0",
            "KillWait=5",
            "Waittime=0",
            *(["GresTypes=gpu"] if self.gpus else []),
            f"NodeName={self.node} NodeAddr=127.0.0.1 {self.cpu_layout()} RealMemory={real_memory}{gres} State=UNKNOWN",
        ]
        for i, name in enumerate(self.partitions):
            default = "YES" if i == 0 else "NO"
            lines.append(f"PartitionName={name} Nodes={self.node} Default={default} MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")
        self.write_client_shims()

    # ---- daemons ----------------------------------------------------------------------------
    def start_munge(self) -> None:
        try:
            munge = pwd.getpwnam("munge")
        except KeyError:
            raise SlurmUnavailable("no `munge` user (is the munge package installed?)") from None
        self.munge_dir.mkdir(exist_ok=True)
        os.chmod(self.munge_dir, 0o755)  # munged wants its socket folder searchable by all
        key = self.munge_dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o600)
        for p in (self.munge_dir, key):
            os.chown(p, munge.pw_uid, munge.pw_gid)
        cmd = [which("munged"), f"--socket={self.munge_socket}", f"--key-file={key}",
               f"--pid-file={self.pid_files['munged']}", f"--log-file={self.munge_dir / 'munged.log'}",
               f"--seed-file={self.munge_dir / 'munged.seed'}"]
        cmd = [which("runuser") or "runuser", "-u", "munge", "--", *cmd]  # munged runs as the munge user
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        if proc.returncode != 0:
            raise SlurmUnavailable(f"munged did not start: {proc.stderr.strip()}")
        self.wait_for(lambda: self.munge_socket.exists(), 15, "munged socket")

    def start(self, timeout: float = 90) -> "SlurmCluster":
        missing = missing_binaries()
        if missing:
            raise SlurmUnavailable(f"SLURM binaries missing: {', '.join(missing)}")
        if os.geteuid() != 0:
            raise SlurmUnavailable("slurmd (and munged, started as the munge user) need root: run as root")
        running = [d for d in self.pid_files if (pid := self.pid(d)) is not None and self._alive(pid)]
        if running:
            raise RuntimeError(f"{', '.join(running)} already running from {self.root}: stop them first")
        self.write_config()
        try:
            self.start_munge()
            for daemon in ("slurmctld", "slurmd"):
                proc = self.run(which(daemon), "-f", str(self.conf), check=False, timeout=30)
                if proc.returncode != 0:
                    raise SlurmUnavailable(f"{daemon} did not start ({proc.returncode}): "
                                           f"{(proc.stdout + proc.stderr).strip()} {self.log_tail(daemon)}")
            self.wait_for(self.node_idle, timeout, "the node to be idle")
        except BaseException:
            self.stop()
            raise
        return self

    def node_idle(self) -> bool:
        for daemon in ("slurmctld", "slurmd"):  # fail fast when a daemon died (a fatal config error)
            pid = self.pid(daemon)
            if pid is not None and not self._alive(pid):
                raise SlurmUnavailable(f"{daemon} exited: {self.log_tail(daemon)}")
        proc = self.run("sinfo", "-h", "-o", "%t", check=False, timeout=15)
        return proc.returncode == 0 and proc.stdout.split() and all(s == "idle" for s in proc.stdout.split())

    def wait_for(self, condition, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return
            time.sleep(0.5)
        state = self.run("sinfo", "-h", "-N", "-o", "%N %t %E", check=False, timeout=15) if self.conf.exists() else None
        raise SlurmUnavailable(f"timed out after {timeout:.0f} s waiting for {what}"
                               + (f" (sinfo: {state.stdout.strip() or state.stderr.strip()})" if state else "")
                               + f"; {self.log_tail('slurmctld')} {self.log_tail('slurmd')}")

    def log_tail(self, daemon: str, lines: int = 5) -> str:
        log = self.root / "log" / f"{daemon}.log"
        if not log.exists():
            return ""
        return f"[{daemon}.log: " + " | ".join(log.read_text(errors="replace").splitlines()[-lines:]) + "]"

    @staticmethod
    def _alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        # a zombie counts as gone
        try:
            return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
        except OSError:
            return False

    def pid(self, daemon: str) -> int | None:
        try:
            return int(self.pid_files[daemon].read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self) -> None:
        """Cancel our jobs, then end the daemons we started (by their pid files), newest first."""
        if self.conf.exists() and self.pid_files["slurmctld"].exists():
            try:
                self.run("scancel", "--user", pwd.getpwuid(os.geteuid()).pw_name, check=False, timeout=15)
                deadline = time.monotonic() + 15
                while time.monotonic() < deadline:
                    q = self.run("squeue", "-h", "-o", "%i", check=False, timeout=15)
                    if q.returncode != 0 or not q.stdout.strip():
                        break
                    time.sleep(0.5)
            except (subprocess.TimeoutExpired, OSError):
                pass
        for daemon in reversed(list(self.pid_files)):
            pid = self.pid(daemon)
            if pid is None or not self._alive(pid):
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.monotonic() + 20
            while self._alive(pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            if self._alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "SlurmCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        if self.own_root:
            self.remove()

    # ---- evidence -----------------------------------------------------------------------------
    def completed_jobs(self) -> list[dict[str, str]]:
        """Job records of finished jobs, read by `sacct -c` from the job completion file."""
        fields = ["JobID", "JobName", "Partition", "State", "ExitCode", "NodeList", "AllocCPUS"]
        proc = self.run("sacct", "-c", "--parsable2", "--noheader", f"--format={','.join(fields)}")
        rows = [line.split("|") for line in proc.stdout.splitlines() if line.strip()]
        return [dict(zip(fields, row)) for row in rows]

    def job_details(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` of a job slurmctld still holds (finished jobs stay MinJobAge seconds)."""
        out = self.run("scontrol", "show", "job", "--oneliner", str(job_id)).stdout
        return dict(f.split("=", 1) for f in out.split() if "=" in f)


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[1] not in ("up", "down"):
        print(__doc__)
        return 2
    root = Path(argv[2])
    cluster = SlurmCluster(root)
    if argv[1] == "up":
        ensure_installed()
        root.mkdir(parents=True, exist_ok=True)
        cluster.start()
        print(f"export SLURM_CONF={cluster.conf} PATH={cluster.root / 'bin'}:$PATH")
    else:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
