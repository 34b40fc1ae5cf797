"""WaveNet's gated activation ``tanh(a) * sigmoid(b)`` for ``y = [a; b]`` split on the channel axis,
as one autograd node.

Autograd on the plain expression keeps the same two activations but builds the input gradient from
two half-size gradients that a split's backward then concatenates (one more full-size copy per layer
and step). Here the backward writes both halves straight into one gradient tensor:

    d/da = g * sigmoid(b) * (1 - tanh(a)^2),     d/db = g * tanh(a) * sigmoid(b) * (1 - sigmoid(b)).

Second derivatives (``create_graph=True``) are exact: the node also returns tanh(a) and sigmoid(b) (the
caller drops them), so the saved activations are its own outputs and autograd differentiates a backward
written in plain ops back through this node. The fused kernels serve the usual first-order backward.
"""
import torch


class GatedTanhSigmoid(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, dim):
        a, b = y.chunk(2, dim=dim)
        tanh_a, sigmoid_b = torch.tanh(a), torch.sigmoid(b)
        ctx.save_for_backward(tanh_a, sigmoid_b)
        ctx.dim = dim
        # The dropped outputs get None, not full-size zeros, in the first-order backward.
        ctx.set_materialize_grads(False)
        return tanh_a * sigmoid_b, tanh_a, sigmoid_b

    @staticmethod
    def backward(ctx, grad, grad_tanh, grad_sigmoid):
        tanh_a, sigmoid_b = ctx.saved_tensors
        if grad is None or grad_tanh is not None or grad_sigmoid is not None or torch.is_grad_enabled():
            # Plain ops: a graph of this backward is wanted (create_graph), or a second-order pass reached
            # the activations themselves.
            grad = 0 if grad is None else grad.to(tanh_a.dtype)
            grad_tanh = grad * sigmoid_b + (0 if grad_tanh is None else grad_tanh)
            grad_sigmoid = grad * tanh_a + (0 if grad_sigmoid is None else grad_sigmoid)
            grad_y = torch.cat([grad_tanh * (1 - tanh_a * tanh_a), grad_sigmoid * sigmoid_b * (1 - sigmoid_b)],
                               dim=ctx.dim)
            return grad_y, None
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
    return GatedTanhSigmoid.apply(y, dim)[0]
