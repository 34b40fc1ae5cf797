"""WaveNet's gated activation ``tanh(a) * sigmoid(b)`` for ``y = [a; b]`` split on the channel axis,
as one autograd node.

Autograd on the plain expression keeps the same two activations but builds the input gradient from
two half-size gradients that a split's backward then concatenates (one more full-size copy per layer
and step). Here the backward writes both halves straight into one gradient tensor:

    d/da = g * sigmoid(b) * (1 - tanh(a)^2),     d/db = g * tanh(a) * sigmoid(b) * (1 - sigmoid(b)).
"""
import torch


class GatedTanhSigmoid(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, dim):
        a, b = y.chunk(2, dim=dim)
        tanh_a, sigmoid_b = torch.tanh(a), torch.sigmoid(b)
        ctx.save_for_backward(tanh_a, sigmoid_b)
        ctx.dim = dim
        return tanh_a * sigmoid_b

    @staticmethod
    def backward(ctx, grad):
        tanh_a, sigmoid_b = ctx.saved_tensors
        grad_y = torch.empty(*tanh_a.shape[:ctx.dim], 2 * tanh_a.shape[ctx.dim], *tanh_a.shape[ctx.dim + 1:],
                             dtype=grad.dtype, device=grad.device)
        grad_a, grad_b = grad_y.chunk(2, dim=ctx.dim)
        gated_grad = grad * sigmoid_b
        # d/da: g * s * (1 - t^2)
        torch.mul(gated_grad, 1 - tanh_a * tanh_a, out=grad_a)
        # d/db: g * t * s * (1 - s)
        torch.mul(gated_grad * tanh_a, 1 - sigmoid_b, out=grad_b)
        return grad_y, None


def gated_tanh_sigmoid(y, dim=2):
    """``tanh(a) * sigmoid(b)`` for ``a, b = y.chunk(2, dim)``."""
    return GatedTanhSigmoid.apply(y, dim)
