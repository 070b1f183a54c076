"""The hypercall interface (docs/hypercalls.md).

abi       the one table of the six calls and their constants
monitor   the monitor as a pure state machine: ``step(state, caller, nr, args)``
spec      docs/hypercalls.md's tables as an executable specification
checker   an explicit-state model checker over ``monitor.step``, against the spec
mutants   deliberate bugs in the monitor that the checker must find
command   ``osvmm verify``
"""
