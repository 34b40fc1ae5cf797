"""The noise levels the samplers anneal over and the priors are fine-tuned at: one spelling of a sigma (three
significant digits, which also names its run folder) and paper 004's geometric BASIS grid."""
import numpy as np


def canonical_sigma(sigma):
    """Three significant digits, so 0.0774 and the BASIS grid's 0.07742... name the same run."""
    return float(f"{sigma:.3g}")


def basis_sigmas(levels=10, largest=1.0, smallest=0.01):
    """Paper 004: L geometric levels from 1.0 down to 0.01, returned smallest first (fine-tuning order)."""
    return [canonical_sigma(s) for s in np.geomspace(smallest, largest, levels)]
