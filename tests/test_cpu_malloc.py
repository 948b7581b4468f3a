"""conv2former/cpu/malloc.py: after keep_freed_memory, a step's reallocated buffers are reused, not page-faulted in."""

import os
import subprocess
import sys

import pytest
from conftest import real_processes

from conv2former.cpu import malloc as host_memory

# One process: the page faults of allocating, filling and freeing buffers of a training step's sizes (a 37 MiB map, as
# Conv2Former-T's 4C maps at batch 8; a 9 MiB one, below glibc's largest mmap threshold), before and after the call.
PROBE = """
import resource, sys, torch
from conv2former.cpu.malloc import freed_memory_kept, keep_freed_memory

def faults_per_round(rounds=5):
    for _ in range(2):  # warm-up: the heap grows to what a round needs
        one_round()
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(rounds):
        one_round()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start) // rounds

def one_round():
    big = torch.empty(8, 384, 56, 56).fill_(1.0)
    small = torch.empty(8, 96, 56, 56).fill_(1.0)
    del big, small

before = faults_per_round()
assert not freed_memory_kept()
kept = keep_freed_memory()
assert keep_freed_memory() == kept == freed_memory_kept()  # idempotent
print(before, faults_per_round(), kept)
"""


@pytest.mark.skipif(host_memory._glibc() is None, reason="glibc's malloc only")
@pytest.mark.slow
def test_kept_memory_is_reused_without_page_faults():
    environ = real_processes(dict(os.environ))  # (a fresh process's heap, not one forked from a zygote's)
    out = subprocess.run([sys.executable, "-c", PROBE], env=environ, capture_output=True, text=True, check=True)
    before, after, kept = out.stdout.split()
    before, after = int(before), int(after)
    assert kept == "True"
    assert before > 5000  # glibc's default: the 37 MiB buffer is a fresh mmap every round (~9,400 pages)
    assert after < before / 50  # kept: every round reuses the same heap memory


def test_without_glibc_nothing_changes(monkeypatch):
    monkeypatch.setattr(host_memory, "_glibc", lambda: None)
    monkeypatch.setattr(host_memory, "_kept", False)
    assert host_memory.keep_freed_memory() is False and host_memory.freed_memory_kept() is False
