"""EDM preconditioning (Karras et al. 2022, Table 1): how a denoiser is built around its network F.

    D(x, sigma) = c_skip x + c_out F(c_in x, c_noise)

with sigma_data the standard deviation of the clean training data. The scalings keep F's input and
training target at unit variance at every sigma; the loss weight makes the effective loss on F
unit-weighted. Every function broadcasts over tensors of sigma and sigma_data.
"""
import torch


def c_skip(sigma, sigma_data):
    return sigma_data**2 / (sigma**2 + sigma_data**2)


def c_out(sigma, sigma_data):
    return sigma * sigma_data / torch.sqrt(sigma**2 + sigma_data**2)


def c_in(sigma, sigma_data):
    return 1 / torch.sqrt(sigma**2 + sigma_data**2)


def c_noise(sigma):
    return torch.log(sigma) / 4


def loss_weight(sigma, sigma_data):
    """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 = 1 / c_out^2."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
