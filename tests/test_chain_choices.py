import torch

from lightning_modules.separation import consensus_choice
from tests.test_mixture_consistency import separate


def test_the_consensus_choice_is_the_chain_the_others_agree_with_most():
    # Chains scattered around the truth by noise of different sizes: the least noisy chain is, on average, the
    # nearest to every other one, whatever its index; no prior and no reference is needed to find it.
    references = torch.randn(3, 2, 512, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(3, 5, 2, 512, generator=torch.Generator().manual_seed(1))
    sizes = torch.tensor([[1.0, 0.2, 0.6, 2.0, 0.9], [0.5, 1.0, 2.0, 0.9, 0.1], [0.1, 1.5, 1.0, 0.7, 3.0]])
    chains = references.unsqueeze(1) + noise * sizes[:, :, None, None]
    assert consensus_choice(chains).tolist() == [1, 4, 0]
    silent = chains.clone()
    silent[:, :, 1] = 0.0  # a source every chain leaves silent scores alike in every chain: it decides nothing
    assert consensus_choice(silent).tolist() == [1, 4, 0]


def test_the_loop_reports_the_consensus_row():
    rows, _, _, _ = separate(False)
    for index in range(2):  # the fixed separator's chain 2 is the least noisy
        assert rows[index, "fixed_consensus_of_3"]["chain"] == 2
