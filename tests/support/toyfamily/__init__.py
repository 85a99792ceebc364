"""A toy model family defined outside svdray, the way a third family would be: its config section
and rules (`config.py`, no torch) and its `ModelFamily` (`family.py`: a tiny pixel-space denoiser
with attention projections LoRA adapts, a flow-matching loss, an Euler sampler). A config selects
it with `model.family: "tests.support.toyfamily.config:ToyFamilyConfig"` and sets its options in
`toy:`; nothing in svdray names it (tests/unit/test_family.py, tests/integration/test_toy_family.py)."""
