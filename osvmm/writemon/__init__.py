"""Kernel write monitoring: word-granular write control over a partition's memory.

A partition declares protected ranges of its guest-physical memory, domains
(sets of code ranges: the RIP of the writing instruction decides the domain)
and grants (per domain, write permission on words inside protected ranges).
Pages holding a protected word are mapped read-only to the guest; each write
into them exits to the VMM, which decides it word by word and applies the
partition's policy (log, deny or fault). docs/write-monitor.md is the guide.

    spec.py     the declaration as written (plan table, control socket) and its syntax
    rules.py    the declaration resolved to numbers (symbols looked up), checked
    table.py    the compressed permission table and the code map (pure)
    records.py  violation records and the bounded log of a partition
    monitor.py  the rules applied to a running partition
"""
