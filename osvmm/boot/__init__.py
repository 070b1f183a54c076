"""Boot-interface builders: pure functions from a partition's plan to bytes.

``plan.Machine`` describes the guest-visible platform; ``e820``, ``bootparams``
(the zero page), ``mptable`` and ``acpi`` turn it into what a kernel reads;
``tables.build_boot_tables`` gives the VMM every table with its address.
docs/boot-interface.md has the layout and the reasons.
"""
