"""Layer 0, the runtime: what every other layer may use and which imports no other diffmem layer.

Errors (:mod:`.errors`), registry names (:mod:`.naming`), strict JSON (:mod:`.jsonio`), progress bars
(:mod:`.progress`), the record of finished work kept after Ctrl-C (:mod:`.interrupts`), quiet
third-party logging (:mod:`.logs`), image conversions (:mod:`.images`) and shared defaults
(:mod:`.defaults`). Nothing here imports torch at module level except :mod:`.images`.
"""
