"""The model: `MoEConfig` and its presets, routing, the MoE block and `MoEForCausalLM`.

Exactly the files an export carries for `trust_remote_code`: they import only each other
(sibling relative imports, as `save_pretrained` copies them flat) and nothing distributed.
"""

from .configuration import PRESETS, MoEConfig
from .modeling import MoEForCausalLM, MoEModel

__all__ = ["PRESETS", "MoEConfig", "MoEForCausalLM", "MoEModel"]
