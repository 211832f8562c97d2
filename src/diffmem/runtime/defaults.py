"""Defaults shared by the library and the command-line parsers, in a module that imports nothing
(the parsers run without torch; see :func:`diffmem.cli._load_extension`)."""

#: The detector ``diffmem detect`` and ``diffmem eval detection`` use unless told otherwise, chosen
#: on the dev split of the testbed's broad generation-labelled set (docs/detection.md): Sharpness at
#: the first step over 4 generations (its own defaults). The one-step option stays
#: ``noise_magnitude`` (1 step, 1 generation: the cost floor, what the mitigation gate uses).
DEFAULT_DETECTOR = "sharpness"

#: The default when the training set's index is given (``--index``): a 20-step preview
#: generation per seed, searched in the index (chosen on the broad set, docs/detection.md).
DEFAULT_INDEX_DETECTOR = "preview_replication"
