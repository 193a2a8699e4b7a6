"""moe-dist: train Mixture-of-Experts language models with expert parallelism on DeepSpeed.

Importing the package registers the model with the transformers Auto classes, so
`AutoModelForCausalLM.from_pretrained(run/hf)` works without `trust_remote_code`.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from .model.configuration import PRESETS, MoEConfig
from .model.modeling import MoEForCausalLM, MoEModel

__version__ = "0.1.0"

AutoConfig.register(MoEConfig.model_type, MoEConfig)
AutoModelForCausalLM.register(MoEConfig, MoEForCausalLM)
# Written into config.json as `auto_map`, with the model files copied beside the weights,
# so that a process that never imported moe_dist can load with trust_remote_code=True.
MoEConfig.register_for_auto_class()
MoEForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["MoEConfig", "MoEForCausalLM", "MoEModel", "PRESETS", "__version__"]
