"""tsfd-jax: TSFD-Net (Ilyas et al., Neural Networks 151, 2022) for nuclei instance segmentation
and classification in H&E histology, in JAX/Flax."""

__version__ = "0.1.0"
