"""The testbed as a model profile: what lower layers need to know about a testbed model, written as
data (``diffmem_profile.json``, :mod:`diffmem.models.profile`) into its folder.

- known-clean prompts: for the shipped testbed, the broad set's clean controls that copy in no
  generation (``broad_labels.jsonl``); for any other testbed folder, its held-out (never trained)
  prompts;
- copy criterion: tiled L2 < 0.15 to the VAE rendering of the nearest training image; SSCD, the
  second criterion, low-passes a graded testbed's images to half their size first
  (``sscd_lowpass``: its VAE keeps thin shapes, so its copies sit near the original pixels, but
  SSCD reads the pixel noise of a 64-px image as content; docs/testbed.md);
- training-set fingerprint: :func:`~diffmem.testbed.index.testbed_fingerprint` of its data spec,
  the provenance a testbed index records;
- labels: the generation labels that hold for these weights (``broad_labels.jsonl``: the shipped
  testbed's beside the package, the graded testbed's beside its weights, installed by
  :func:`diffmem.testbed.install.install_labels`).
"""

from __future__ import annotations

from pathlib import Path

from diffmem.models.profile import ModelProfile, read_profile
from diffmem.testbed.data import TestbedSpec


def testbed_name(spec: TestbedSpec) -> str:
    """The model name of a testbed trained on ``spec``: ``"testbed-graded"`` for graded duplicate
    counts, else ``"testbed"`` (the names of ``MODELS`` in :mod:`diffmem.models.profile`)."""
    return "testbed-graded" if spec.counts else "testbed"


def testbed_profile(folder: str | Path, spec: TestbedSpec, *, labels: str | Path | None = None,
                    name: str | None = None) -> ModelProfile:
    """The profile of a testbed folder trained on ``spec``; ``labels``: generation labels valid for
    these weights (their copy-free clean controls become the clean prompts); ``name``: default
    :func:`testbed_name`."""
    from diffmem.testbed import labelled_prompts
    from diffmem.testbed.broad import read_broad_labels
    from diffmem.testbed.index import testbed_fingerprint

    labels = Path(labels).resolve() if labels is not None else None
    if labels is not None and labels.is_file():
        clean = [r["prompt"] for r in read_broad_labels(labels) if r["group"] == "clean"
                 and not r["memorized"]]
    else:
        labels = None
        clean = [p.prompt for p in labelled_prompts(spec, folder) if p.kind == "heldout"]
    return ModelProfile(name=name or testbed_name(spec), clean_prompts=tuple(clean), criterion="tiled_l2",
                        training_set=testbed_fingerprint(spec), labels=labels,
                        data=spec.to_dict(),
                        sscd_lowpass=spec.resolution // 2 if spec.counts else None)


def write_testbed_profile(folder: str | Path, spec: TestbedSpec | None = None, **kwargs) -> Path:
    """Write ``folder``'s testbed profile (``spec``: default its ``testbed.json``)."""
    from diffmem.testbed.locate import testbed_spec_of

    spec = spec or testbed_spec_of(folder)
    return testbed_profile(folder, spec, **kwargs).save(folder)


def ensure_testbed_profile(folder: str | Path) -> ModelProfile:
    """The profile of a testbed folder, written first if the folder predates profiles."""
    profile = read_profile(folder)
    if not profile.is_testbed and (Path(folder) / "testbed.json").is_file():
        write_testbed_profile(folder)
        profile = read_profile(folder)
    return profile
