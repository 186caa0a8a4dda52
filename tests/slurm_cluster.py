"""A throwaway single-node SLURM cluster for tests of the Snakemake SLURM profile.

Why: the SLURM executor plugin can only be trusted once real ``sbatch`` jobs ran, and CI
machines have no cluster.  This module starts munged, slurmctld and slurmd as children of
the test process, with sockets, ports, spool, state and logs inside one work directory and
no system munged.  The one thing outside it is a link ``/etc/slurm/slurm.conf`` to the
generated config while the cluster runs (so one cluster per machine at a time):
snakemake-executor-plugin-slurm-jobstep >= 0.6.1 strips ``SLURM_CONF`` before its in-job
``srun``, which then only finds the default path.  Accounting is off (no slurmdbd and
database to install): finished jobs are recorded by ``jobcomp/filetxt`` and stay visible to
``squeue`` for ``MinJobAge``, which is why the plugin must use ``status_command: squeue``.
One fake GPU (``File=/dev/null``) lets jobs that ask for ``gpu=1`` schedule on a GPU-less
machine.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

PARTITION = "debug"
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "sinfo", "scontrol", "scancel", "srun")
SBIN = "/usr/sbin:/sbin"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
DEFAULT_CONF = Path("/etc/slurm/slurm.conf")
PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class SlurmCluster:
    """What a test needs to submit to the running cluster."""

    workdir: Path
    partition: str
    node: str
    conf: Path
    jobcomp: Path
    env: dict[str, str]

    def run(self, *args: str) -> str:
        """Run a SLURM client command against this cluster and return its stdout."""
        done = subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}): {done.stderr}")
        return done.stdout

    def completed_jobs(self) -> list[dict[str, str]]:
        """Parse the job completion log: one ``{field: value}`` dict per finished job."""
        if not self.jobcomp.exists():
            return []
        lines = self.jobcomp.read_text().splitlines()
        return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in lines if line.strip()]


def _which(name: str) -> str | None:
    return shutil.which(name, path=os.environ.get("PATH", "") + os.pathsep + SBIN)


def slurm_available() -> str | None:
    """Return why a local SLURM cluster cannot be started here, or None when it can."""
    missing = [name for name in DAEMONS + CLIENTS if _which(name) is None]
    if missing:
        return f"SLURM binaries missing ({', '.join(missing)}): run .ci/install-slurm.sh"
    if os.geteuid() != 0:
        return "slurmd must run as root to launch jobs; run the SLURM tests as root"
    if (DEFAULT_CONF.exists() or DEFAULT_CONF.is_symlink()) and not _stale_link():
        return f"{DEFAULT_CONF} exists (a real or running cluster); the test cluster needs it free"
    return None


def _stale_link() -> bool:
    """Whether the default config is a link left by a test cluster whose controller is gone."""
    if not DEFAULT_CONF.is_symlink():
        return False
    pid_file = Path(os.readlink(DEFAULT_CONF)).parent / "slurmctld.pid"
    try:
        os.kill(int(pid_file.read_text()), 0)
    except (OSError, ValueError):
        return True
    return False


@contextmanager
def _default_conf_link(conf: Path) -> Iterator[None]:
    """Point SLURM's default config path at ``conf``, replacing a link from a killed run."""
    if _stale_link():
        DEFAULT_CONF.unlink()
    DEFAULT_CONF.parent.mkdir(parents=True, exist_ok=True)
    DEFAULT_CONF.symlink_to(conf)
    try:
        yield
    finally:
        if DEFAULT_CONF.is_symlink() and DEFAULT_CONF.resolve() == conf.resolve():
            DEFAULT_CONF.unlink()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _node_hardware() -> str:
    """The ``CPUs=... RealMemory=...`` part of ``slurmd -C``, so the node registers as valid."""
    out = subprocess.run([_which("slurmd"), "-C"], capture_output=True, text=True, check=True)
    line = out.stdout.splitlines()[0]
    return " ".join(field for field in line.split() if not field.startswith("NodeName="))


def _write_config(workdir: Path, node: str) -> Path:
    for sub in ("state", "spool", "log"):
        (workdir / sub).mkdir(parents=True, exist_ok=True)
    munge = workdir / "munge"
    munge.mkdir(mode=0o755, exist_ok=True)
    key = munge / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    conf = workdir / "slurm.conf"
    conf.write_text(
        f"""ClusterName=svnup-test
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge / "munge.socket"}
StateSaveLocation={workdir / "state"}
SlurmdSpoolDir={workdir / "spool"}
SlurmctldPidFile={workdir / "slurmctld.pid"}
SlurmdPidFile={workdir / "slurmd.pid"}
SlurmctldLogFile={workdir / "log" / "slurmctld.log"}
SlurmdLogFile={workdir / "log" / "slurmd.log"}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={workdir / "log" / "jobcomp.txt"}
MinJobAge=600
KillWait=5
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
GresTypes=gpu
NodeName={node} NodeAddr=127.0.0.1 {_node_hardware()} Gres=gpu:1 State=UNKNOWN
PartitionName={PARTITION} Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""
    )
    (workdir / "gres.conf").write_text(f"NodeName={node} Name=gpu File=/dev/null\n")
    return conf


def _die_with_parent() -> None:
    """Ask the kernel to SIGTERM the daemon if the test process is killed before cleanup."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with log.open("ab") as out:
        return subprocess.Popen(
            cmd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )


def _processes_using(conf: Path) -> list[int]:
    """Pids whose environment names this cluster's slurm.conf, with all their descendants.

    That covers slurmstepd and job steps even when the plugin stripped ``SLURM_CONF`` from a
    step's environment; zombies are left out.
    """
    marker = f"SLURM_CONF={conf}".encode()
    tagged, children = set(), {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            state, ppid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:2]
        except (OSError, ValueError):
            continue
        if state == "Z":
            continue  # already dead, waiting for its parent (often pid 1) to reap it
        children.setdefault(int(ppid), []).append(int(entry.name))
        if marker in environ.split(b"\0"):
            tagged.add(int(entry.name))
    found, todo = set(), list(tagged)
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, []))
    return sorted(found)


def _cancel_jobs(cluster: SlurmCluster) -> None:
    """Cancel every job and wait until none is running or completing."""
    deadline = time.monotonic() + STOP_TIMEOUT_S
    try:
        jobs = cluster.run("squeue", "--noheader", "--format=%i").split()
        if jobs:
            cluster.run("scancel", *jobs)
        while jobs and time.monotonic() < deadline:
            time.sleep(0.2)
            jobs = cluster.run("squeue", "--noheader", "--format=%i").split()
    except (RuntimeError, subprocess.TimeoutExpired):
        pass  # the controller is already gone; leftover steps are killed by _stop


def _stop(daemons: list[subprocess.Popen], cluster: SlurmCluster) -> None:
    """Cancel jobs, stop the daemons newest first, then kill any job process left behind."""
    _cancel_jobs(cluster)
    for proc in reversed(daemons):
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT_S)
    for pid in _processes_using(cluster.conf):
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while (alive := _processes_using(cluster.conf)) and time.monotonic() < deadline:
        time.sleep(0.2)
    if alive or any(proc.poll() is None for proc in daemons):
        raise RuntimeError(f"SLURM processes still alive after shutdown: {alive}")


def _wait_idle(cluster: SlurmCluster, daemons: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    state = ""
    while time.monotonic() < deadline:
        dead = [proc.args[0] for proc in daemons if proc.poll() is not None]
        if dead:
            raise RuntimeError(f"{dead} exited early; see logs in {cluster.workdir / 'log'}")
        try:
            state = cluster.run("sinfo", "--noheader", "--Node", "--format=%T").strip()
        except RuntimeError:
            state = "controller not answering"
        if state == "idle":
            return
        time.sleep(0.5)
    raise RuntimeError(
        f"node {cluster.node} not idle after {START_TIMEOUT_S:.0f} s (state: {state!r}); "
        f"see logs in {cluster.workdir / 'log'}"
    )


@contextmanager
def single_node_slurm(workdir: Path) -> Iterator[SlurmCluster]:
    """Start munged, slurmctld and slurmd under ``workdir``; stop all of them on exit.

    Yields once ``sinfo`` reports the node idle.  Jobs need ``cluster.env`` (it carries
    ``SLURM_CONF``).  Raises RuntimeError when the cluster does not come up or a process
    survives shutdown.
    """
    reason = slurm_available()
    if reason:
        raise RuntimeError(reason)
    workdir = Path(workdir).resolve()
    node = socket.gethostname().split(".")[0]
    conf = _write_config(workdir, node)
    env = {**os.environ, "SLURM_CONF": str(conf)}
    env["PATH"] = env.get("PATH", "") + os.pathsep + SBIN
    cluster = SlurmCluster(workdir, PARTITION, node, conf, workdir / "log" / "jobcomp.txt", env)
    munge = workdir / "munge"
    log = workdir / "log"
    daemons: list[subprocess.Popen] = []
    with ExitStack() as stack:
        stack.enter_context(_default_conf_link(conf))
        stack.callback(_stop, daemons, cluster)
        # --force: pytest's tmp dirs are not world-searchable, which munged otherwise refuses.
        munged = [
            _which("munged"),
            "--foreground",
            "--force",
            f"--socket={munge / 'munge.socket'}",
            f"--key-file={munge / 'munge.key'}",
            f"--pid-file={munge / 'munged.pid'}",
            f"--seed-file={munge / 'munged.seed'}",
            f"--log-file={log / 'munged.log'}",
        ]
        daemons.append(_start(munged, env, log / "munged.out"))
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (munge / "munge.socket").exists():
            if daemons[0].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"munged did not start; see {log / 'munged.log'}")
            time.sleep(0.1)
        ctld = [_which("slurmctld"), "-D", "-i", "-f", str(conf)]
        daemons.append(_start(ctld, env, log / "slurmctld.out"))
        daemons.append(_start([_which("slurmd"), "-D", "-f", str(conf)], env, log / "slurmd.out"))
        _wait_idle(cluster, daemons)
        yield cluster
