"""ComfyUI-LI-DiT: LI-DiT (LLM-infused diffusion transformer, NeurIPS 2024) as ComfyUI nodes.

ComfyUI's entry point: registers the model folders and the nodes, nothing else.
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from .nodes.folders import register_model_folders

register_model_folders()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
