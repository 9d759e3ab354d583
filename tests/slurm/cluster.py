"""A private SLURM cluster on this machine: munged, slurmctld and N slurmd, all state in one directory.

    python tests/slurm/cluster.py DIR [NODES]   # start one by hand; prints the SLURM_CONF to export

Each daemon runs as the current user (root or not; jobs then run as that user) with its own
socket, key, pid, log and spool files under DIR, on free ports, so it touches no system-wide
SLURM or munge state and several clusters can coexist. Nodes n1..nN are emulated on this machine (the packaged build
has MULTIPLE_SLURMD), each with NodeAddr 127.0.0.1.
"""
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")


def missing_binaries() -> list:
    return [d for d in DAEMONS if not (shutil.which(d) or Path("/usr/sbin", d).exists())]


def _binary(name) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _free_ports(n) -> list:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


SLURM_CONF = """\
ClusterName=gptlab
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
StateSaveLocation={state}/ctld
SlurmdSpoolDir={state}/spool-%n
SlurmctldPidFile={state}/slurmctld.pid
SlurmdPidFile={state}/slurmd-%n.pid
SlurmctldLogFile={state}/slurmctld.log
SlurmdLogFile={state}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
# A stop signal must leave the trainers time to save (scancel/preemption -> SIGKILL after KillWait).
KillWait=30
MinJobAge=600
{nodes}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


class Cluster:
    """Start with `Cluster(dir, nodes).start()`; `env` has SLURM_CONF for the client commands."""

    def __init__(self, state: Path, nodes: int = 1, cpus: int = 2):
        self.state = Path(state)
        self.nodes = [f"n{i}" for i in range(1, nodes + 1)]
        self.cpus = cpus
        self.conf = self.state / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.pids = {}

    def start(self, timeout=30):
        self.state.mkdir(parents=True, exist_ok=True)
        for sub in ["ctld", *(f"spool-{n}" for n in self.nodes)]:
            (self.state / sub).mkdir(exist_ok=True)
        key = self.state / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        socket_path = self.state / "munge.socket"
        # --force: munged otherwise refuses to run as root or with its files in /tmp ("insecure").
        self._daemon("munged", [_binary("munged"), "--force", f"--socket={socket_path}", f"--key-file={key}",
                                f"--log-file={self.state / 'munged.log'}", f"--pid-file={self.state / 'munged.pid'}",
                                f"--seed-file={self.state / 'munged.seed'}"], self.state / "munged.pid")
        # MULTIPLE_SLURMD: every emulated node has a port of its own.
        ctld_port, *node_ports = _free_ports(1 + len(self.nodes))
        nodes = "\n".join(f"NodeName={n} NodeHostname=localhost NodeAddr=127.0.0.1 Port={port} CPUs={self.cpus} "
                          "State=UNKNOWN" for n, port in zip(self.nodes, node_ports))
        self.conf.write_text(SLURM_CONF.format(ctld_port=ctld_port, munge_socket=socket_path, state=self.state,
                                               nodes=nodes, user=pwd.getpwuid(os.getuid()).pw_name))
        self._daemon("slurmctld", [_binary("slurmctld"), "-i"], self.state / "slurmctld.pid")
        for node in self.nodes:
            self._daemon(f"slurmd-{node}", [_binary("slurmd"), "-N", node], self.state / f"slurmd-{node}.pid")
        self._wait_idle(timeout)
        return self

    def _daemon(self, name, cmd, pid_file, timeout=15):
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{name} did not start ({proc.returncode}): {proc.stderr.strip()}{self._logs()}")
        deadline = time.time() + timeout
        while not (pid_file.exists() and pid_file.read_text().strip()):
            if time.time() > deadline:
                raise RuntimeError(f"{name} wrote no pid file {pid_file}{self._logs()}")
            time.sleep(0.05)
        self.pids[name] = int(pid_file.read_text())

    def _wait_idle(self, timeout):
        deadline = time.time() + timeout
        while True:
            out = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout.split()
            states = dict(zip(out[::2], out[1::2]))
            if all(states.get(n) == "idle" for n in self.nodes):
                return
            if time.time() > deadline:
                raise RuntimeError(f"nodes not idle after {timeout} s: {states}{self._logs()}")
            time.sleep(0.1)

    def _logs(self) -> str:
        return "".join(f"\n--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(self.state.glob("*.log")))

    def run(self, *cmd, check=True, **kwargs):
        proc = subprocess.run(cmd, env={**self.env, **kwargs.pop("env", {})}, capture_output=True, text=True,
                              timeout=60, **kwargs)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: {proc.returncode}\n{proc.stdout}{proc.stderr}")
        return proc

    def stop(self, timeout=15):
        """Cancel what still runs, then every daemon by its pid (munged last); SIGKILL if one lingers."""
        if "slurmctld" in self.pids:
            # A cancelled job gets SIGTERM, then SIGKILL after KillWait (30 s): wait for it to be gone.
            self.run("scancel", f"--user={os.getuid()}", check=False)
            deadline = time.time() + 60
            while self.run("squeue", "-h", "-t", "running,completing", check=False).stdout.strip():
                if time.time() > deadline:
                    break
                time.sleep(0.2)
        for name in [n for n in self.pids if n != "munged"] + ["munged"]:
            pid = self.pids.pop(name, None)
            if pid is None:
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.time() + timeout
            while _alive(pid) and time.time() < deadline:
                time.sleep(0.05)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def _alive(pid) -> bool:
    import psutil

    try:
        # A daemon forks away from us; once it exits it may stay a zombie until init reaps it.
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


if __name__ == "__main__":
    c = Cluster(Path(sys.argv[1]).absolute(), int(sys.argv[2]) if len(sys.argv) > 2 else 1).start()
    print(f"export SLURM_CONF={c.conf}  # pids {c.pids}")
