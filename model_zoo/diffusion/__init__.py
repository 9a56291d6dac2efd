"""Diffusion building blocks: noise types (:mod:`.noise`) and procedures (:mod:`.procedures`)."""
