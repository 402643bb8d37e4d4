"""What the kernel saw of this process: storage reads, run-queue waits, page faults, peak RSS.

Standard library only (no torch, no package imports): `offload bench` times its own children with
it, and llama.cpp's child (offload/llamacpp_child.py, run without importing this package so that
torch's few hundred MiB do not count against its memory limit) loads it by path.
"""

from __future__ import annotations

import os
import resource
import time

# ---- what the kernel saw: storage reads and run-queue waits -----------------------

def parse_proc_io(text: str) -> dict[str, int]:
    """The text of /proc/<pid>/io, one "name: value" a line -> {name: value}."""
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and value.strip().isdigit():
            out[key.strip()] = int(value)
    return out


def process_read_bytes(path: str = "/proc/self/io") -> int:
    """Bytes this process (all its threads, living and exited) caused to be read from storage,
    readahead included; 0 where the kernel does not account I/O."""
    try:
        with open(path) as f:
            return parse_proc_io(f.read()).get("read_bytes", 0)
    except OSError:
        return 0


def parse_schedstat(text: str) -> tuple[int, int]:
    """/proc/.../schedstat ("on-cpu ns, run-queue wait ns, timeslices") -> (on-cpu ns, wait ns)."""
    parts = text.split()
    return int(parts[0]), int(parts[1])


def thread_schedstats(task_dir: str = "/proc/self/task") -> dict[int, tuple[int, int]]:
    """Per thread of this process: (on-cpu ns, run-queue wait ns) so far; {} without schedstats."""
    out = {}
    try:
        tids = os.listdir(task_dir)
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"{task_dir}/{tid}/schedstat") as f:
                out[int(tid)] = parse_schedstat(f.read())
        except (OSError, ValueError, IndexError):
            continue  # the thread ended meanwhile, or no schedstats
    return out


def schedstat_delta(before: dict, after: dict) -> tuple[int, int]:
    """(on-cpu ns, run-queue wait ns) summed over the threads between two `thread_schedstats`:
    a thread born in between counts from zero; one that ended in between is lost (the kernel
    keeps no per-thread figures for it), which undercounts and never overcounts."""
    cpu = wait = 0
    for tid, (c, w) in after.items():
        c0, w0 = before.get(tid, (0, 0))
        cpu, wait = cpu + c - c0, wait + w - w0
    return cpu, wait


def major_faults() -> int:
    """Page faults of this process that had to read a file (all threads): under a tight memory limit,
    the interpreter's and torch's own code paged back in, which read_bytes counts too."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_majflt


class Probe:
    """Storage reads and scheduler figures of this process over one timed stretch."""

    def __init__(self):
        self.read0, self.faults0 = process_read_bytes(), major_faults()
        self.sched0, self.t0 = thread_schedstats(), time.perf_counter()

    def stop(self) -> dict:
        wall = time.perf_counter() - self.t0
        cpu, wait = schedstat_delta(self.sched0, thread_schedstats())
        return dict(process_read_bytes=process_read_bytes() - self.read0, wall_seconds=wall,
                    on_cpu_seconds=cpu / 1e9, runqueue_wait_seconds=wait / 1e9,
                    major_faults=major_faults() - self.faults0)


def peak_rss() -> int:
    """This process's peak RSS. VmHWM belongs to the current address space; ru_maxrss
    would also count the parent's RSS at fork time, which survives exec on Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
