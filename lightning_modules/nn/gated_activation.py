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
        grad = grad.to(tanh_a.dtype)  # the fused kernels want one dtype (mixed precision)
        grad_y = torch.empty(*tanh_a.shape[:ctx.dim], 2 * tanh_a.shape[ctx.dim], *tanh_a.shape[ctx.dim + 1:],
                             dtype=grad.dtype, device=grad.device)
        grad_a, grad_b = grad_y.chunk(2, dim=ctx.dim)
        # Fused elementwise backward kernels: g * (1 - t^2) and g * s * (1 - s), one pass each.
        torch.ops.aten.tanh_backward.grad_input(grad * sigmoid_b, tanh_a, grad_input=grad_a)
        torch.ops.aten.sigmoid_backward.grad_input(grad * tanh_a, sigmoid_b, grad_input=grad_b)
        return grad_y, None


def gated_tanh_sigmoid(y, dim=2):
    """``tanh(a) * sigmoid(b)`` for ``a, b = y.chunk(2, dim)``."""
    return GatedTanhSigmoid.apply(y, dim)
