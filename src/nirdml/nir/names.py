"""The names of the NIR options, in one torch-free place.

``nirdml.training.config`` types its ``NIRConfig`` fields from these tuples (so a config can be
validated without importing torch); ``nirdml.nir.conditioning`` and ``nirdml.nir.regularizer``
check their arguments against them.
"""

from __future__ import annotations

#: Conditioning modes of ``ConditionalGlowFlow`` (one ``nirdml.nir.conditioning.Conditioning``
#: class each): ``dense`` feeds the raw condition to every block, ``dense_embed`` feeds the
#: output of one shared condition MLP to every block, ``dense_embed_multi`` gives every block its
#: own condition MLP, ``start`` / ``mid`` / ``end`` condition only the first / middle (index
#: ``num_blocks // 2``) / last block and leave the others unconditional.
COND_MODES = ("dense", "dense_embed", "dense_embed_multi", "start", "mid", "end")

#: How ``NIRLoss`` combines the NIR term and the proxy loss (see ``nirdml.nir.regularizer``).
NIR_MODES = ("release", "paper", "selfnorm", "disc", "kl")
#: The base distribution's scale ``sigma`` (see ``nirdml.nir.regularizer``).
BASE_SCALES = ("standard", "sphere", "learned")
#: Input noise distributions.
NOISE_KINDS = ("gaussian", "uniform")
