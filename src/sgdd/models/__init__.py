"""The trainable model: VIB head, AdaLN-Zero decoder (scratch or pretrained-encoder init), length head."""

from sgdd.models.decoder import Decoder
from sgdd.models.layers import DiTBlock, FinalLayer, PretrainedBlock, modulate, timestep_embedding
from sgdd.models.net import LengthHead, SGDDNet
from sgdd.models.vib import VIB, gaussian_kl

__all__ = [
    "VIB",
    "Decoder",
    "DiTBlock",
    "FinalLayer",
    "LengthHead",
    "PretrainedBlock",
    "SGDDNet",
    "gaussian_kl",
    "modulate",
    "timestep_embedding",
]
