"""SGDD: semantic-guided discrete diffusion."""
