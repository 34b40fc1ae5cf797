"""Pure nn.Module building blocks (no Lightning), usable and testable alone.

Every prior family keeps one layout: tensors are ``[batch, n_priors, channels, time]``
and the ``n_priors`` independent priors (one per source class) share one module through
grouped convolutions, so log-dets stay per example and per source.
"""
