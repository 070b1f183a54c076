"""The write monitor applied to one running partition.

``WriteMonitor(name, rules, log, note)`` is made for each run of a partition:
``attach(partition)`` before its vCPUs start installs the handler of writes
into read-only RAM (Partition.set_ram_write_handler) and asks KVM for the
registers at every exit (sync regs: RIP without an ioctl); ``arm()`` maps the
pages holding a protected word read-only (Partition.protect_pages, which parks
running vCPUs while the memslots change), ``disarm()`` maps them writable
again; ``update(rules)`` swaps the rules in one assignment (a vCPU thread
reads either the old or the new ones, whole) and re-protects.

A write into a read-only page, on the writing vCPU's thread:

  1. an address outside guest RAM is not ours (False: the MMIO bus has it);
  2. the writer's domain from RIP (table.writer_domain; at a boundary between
     two domains the instruction at RIP is read through KVM_TRANSLATE);
  3. the permission table decides it word by word (table.decide);
  4. allowed: applied to the backing memory and the guest continues;
     denied words: the partition's policy --
       log    apply the whole write, record it;
       deny   apply the allowed words only, record the rest;
       fault  apply nothing, record, and stop the partition as a guest
              fault (its restart policy applies; no other partition notices).

Each denied run of bytes is one record in the partition's ViolationLog; the
first ``NOTE_LIMIT`` of a run are also noted on its console.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from osvmm.arch.x86.layout import PAGE_SIZE
from osvmm.errors import GuestFault
from osvmm.writemon.records import Violation, ViolationLog
from osvmm.writemon.rules import Rules
from osvmm.writemon.table import NO_DOMAIN, is_rep_string_store, writer_domain

NOTE_LIMIT = 32
DECISION_OF = {"log": "logged", "deny": "denied", "fault": "fault"}


class WriteMonitor:
    def __init__(
        self,
        name: str,
        rules: Rules,
        log: ViolationLog | None = None,
        note: Callable[[str], None] | None = None,
    ):
        self.name = name
        self.log = log if log is not None else ViolationLog()
        self.note = note
        self.partition = None
        self.armed = False
        self.trapped: list[int] = []  # per vCPU: writes that reached the monitor
        self.violations = 0  # of this run
        self._set_rules(rules)

    def _set_rules(self, rules: Rules) -> None:
        self.rules = rules
        self.table = rules.table()
        names = rules.domain_names
        # One tuple, replaced whole: what a vCPU thread reads at each write.
        self._state = (self.table, rules.codemap(), rules.policy, names)

    # -- the partition's side ------------------------------------------------------------
    def attach(self, partition) -> None:
        self.partition = partition
        self.trapped = [0] * len(partition.threads)
        partition.enable_sync_regs()
        partition.set_ram_write_handler(self._on_write)

    def arm(self) -> None:
        self.partition.protect_pages(self.table.pages())
        self.armed = True

    def disarm(self) -> None:
        self.partition.protect_pages(())
        self.armed = False

    def update(self, rules: Rules) -> None:
        self._set_rules(rules)
        if self.armed:
            self.partition.protect_pages(self.table.pages())

    def stats(self) -> dict:
        return {
            "armed": self.armed,
            "policy": self.rules.policy,
            "pages": sum(e - s for s, e in self.table.pages()) // PAGE_SIZE,
            "protected_bytes": self.table.protected_bytes,
            "table_bytes": self.table.nbytes,
            "table_segments": len(self.table),
            "trapped_writes": sum(self.trapped),
            "violations_this_run": self.violations,
        }

    # -- the vCPU thread's side ------------------------------------------------------------
    def _on_write(self, thread, addr: int, data: bytes) -> bool:
        part = self.partition
        memory = part.memory
        size = len(data)
        if not memory.contains(addr, size):
            return False
        table, codemap, policy, names = self._state
        self.trapped[thread.index] += 1
        rip = part.vcpu_rip(thread)
        domain = writer_domain(codemap, rip, lambda: self._rep_string_at(thread, rip))
        denied = table.decide(addr, size, domain)
        if not denied:
            memory.write(addr, data)
            return True
        old = memory.read(addr, size)
        if policy == "log":
            memory.write(addr, data)
        elif policy == "deny":
            pos = addr
            for start, end in denied:  # the allowed words between the denied runs
                if pos < start:
                    memory.write(pos, data[pos - addr : start - addr])
                pos = end
            if pos < addr + size:
                memory.write(pos, data[pos - addr :])
        cpl = part.vcpu_cpl(thread)
        who = names[domain] if domain != NO_DOMAIN else "-"
        decision = DECISION_OF[policy]
        stamp = time.time()
        for start, end in denied:
            lo, hi = start - addr, end - addr
            v = Violation(
                self.name, thread.index, rip, cpl, who, start, end - start,
                old[lo:hi], data[lo:hi], decision, stamp,
            )  # fmt: skip
            self.log.add(v)
            self.violations += 1
            if self.note is not None and self.violations <= NOTE_LIMIT:
                self.note(v.line())
                if self.violations == NOTE_LIMIT:
                    self.note("write monitor: further violations of this run are counted only")
        if policy == "fault":
            start, end = denied[0]
            raise GuestFault(
                thread.index,
                rip,
                f"write monitor: domain {who} wrote {end - start} bytes at {start:#x} (protected)",
            )
        return True

    def _rep_string_at(self, thread, rip: int) -> bool:
        part = self.partition
        gpa = part.translate(thread, rip)
        if gpa is None:
            return False
        for length in (15, 8, 4, 2, 1):  # stay inside one RAM region near its end
            if part.memory.contains(gpa, length):
                return is_rep_string_store(part.memory.read(gpa, length))
        return False
