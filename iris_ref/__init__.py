"""IRIS reference implementation: Interpolative Rényi Iterative Self-play.

The mathematics lives in `objectives` (pure functions of four log-prob vectors) and
`schedule` (the order α per iteration); everything else is the self-play pipeline around it.
"""

__version__ = "0.1.0"
