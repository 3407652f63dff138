"""The foundation-model families and their poolings, as plain names: featstore/foundation.py builds them, the
registry (featstore/backbone_specs.py) lists and checks them without importing a model library."""

FAMILIES = ("hf", "timm", "open_clip")
POOLINGS = ("cls", "mean", "pooler")
# generic entries: (default pooling, valid poolings). open_clip gives the model's own image embedding
# only (its projection to the joint image-text space); hf/timm models that lack a CLS token or a
# pooler say so when built; a generic hf: SigLIP defaults to its pooler (generic_spec_fields)
GENERIC_POOLING = {"hf": ("cls", POOLINGS), "timm": ("pooler", POOLINGS), "open_clip": ("pooler", ("pooler",))}
# Hugging Face model types whose checkpoint is a whole image-text model (the zero-shot head's text tower)
HF_JOINT = {"siglip", "siglip_vision_model"}
