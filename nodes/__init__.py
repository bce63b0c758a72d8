"""The pack's nodes: thin adapters that parse inputs, call `lidit`, and wrap the outputs."""
from .clip_text import LIDiTInstructedEncodeCLIP
from .encode import LIDiTInstructedEncode
from .fusion import LIDiTCollaborativeFusion, LIDiTTokenRefiner
from .llm_loader import LIDiTLLMLoader
from .model_loader import LIDiTLoader
from .pixart import LIDiTFromPixArt
from .sample import LIDiTSampler

NODE_CLASS_MAPPINGS = {
    "LIDiTLLMLoader": LIDiTLLMLoader,
    "LIDiTInstructedEncode": LIDiTInstructedEncode,
    "LIDiTInstructedEncodeCLIP": LIDiTInstructedEncodeCLIP,
    "LIDiTTokenRefiner": LIDiTTokenRefiner,
    "LIDiTCollaborativeFusion": LIDiTCollaborativeFusion,
    "LIDiTLoader": LIDiTLoader,
    "LIDiTSampler": LIDiTSampler,
    "LIDiTFromPixArt": LIDiTFromPixArt,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "LIDiTLLMLoader": "LI-DiT LLM Loader",
    "LIDiTInstructedEncode": "LI-DiT Instructed Encode",
    "LIDiTInstructedEncodeCLIP": "LI-DiT Instructed Encode (CLIP)",
    "LIDiTTokenRefiner": "LI-DiT Linguistic Token Refiner",
    "LIDiTCollaborativeFusion": "LI-DiT Collaborative Fusion",
    "LIDiTLoader": "LI-DiT Loader",
    "LIDiTSampler": "LI-DiT Sampler",
    "LIDiTFromPixArt": "LI-DiT From PixArt",
}
