"""GroupedTransformer: causality, cached decoding, sampling, per-model independence, likelihood, errors."""
import pytest
import torch

from lightning_modules.nn.latent_transformer import GroupedTransformer, TransformerConfig

K, CONTEXT, N = 16, 32, 3
CFG = TransformerConfig(vocab_size=K, context=CONTEXT, width=32, n_layers=2, n_heads=2, dropout=0.0)


def make_model(seed=0, cfg=CFG):
    torch.manual_seed(seed)
    return GroupedTransformer(N, cfg).eval()


def random_codes(batch=2, length=CONTEXT, seed=1):
    return torch.randint(0, K, (batch, N, length), generator=torch.Generator().manual_seed(seed))


def test_parameters_are_grouped():
    model = make_model()
    for name, param in model.named_parameters():
        assert param.shape[0] == N, name
    assert model.token_embedding.shape == (N, K + 1, CFG.width)
    assert model.position_embedding.shape == (N, CONTEXT, CFG.width)


def test_changing_a_code_only_changes_later_predictions():
    model, codes, t = make_model(), random_codes(), 10
    changed = codes.clone()
    changed[:, :, t] = (codes[:, :, t] + 1) % K
    with torch.no_grad():
        before, after = model(codes), model(changed)
    assert before.shape == (2, N, CONTEXT, K)
    # Position t predicts code t from codes < t, so it must not see the change.
    torch.testing.assert_close(after[:, :, :t + 1], before[:, :, :t + 1], rtol=0, atol=0)
    assert (after[:, :, t + 1] - before[:, :, t + 1]).abs().amax(dim=-1).min() > 1e-4


def test_no_gradient_flows_from_the_future():
    model, codes, t = make_model(), random_codes(), 12
    captured = {}

    def make_leaf(module, args):  # the block input [N, B, S, width] becomes a leaf we can read grads of
        captured["x"] = args[0].detach().requires_grad_()
        return (captured["x"],) + args[1:]

    handle = model.blocks[0].register_forward_pre_hook(make_leaf)
    try:
        model(codes)[:, :, :t + 1].sum().backward()
    finally:
        handle.remove()
    grad = captured["x"].grad
    assert torch.all(grad[:, :, t + 1:] == 0)
    assert torch.all(grad[:, :, :t + 1].abs().amax(dim=-1) > 0)


def test_cached_steps_equal_full_forward():
    model, codes = make_model(), random_codes()
    with torch.no_grad():
        full = model(codes)
        cache = model.new_cache(codes.shape[0], codes.device)
        stepped = [model.step(None, cache)]
        stepped += [model.step(codes[:, :, s - 1], cache) for s in range(1, CONTEXT)]
    torch.testing.assert_close(torch.stack(stepped, dim=2), full, rtol=0, atol=1e-4)
    assert cache.position == CONTEXT
    with pytest.raises(ValueError, match="context"):
        model.step(codes[:, :, -1], cache)
    # An explicit start token is the same first step as None.
    with torch.no_grad():
        first = model.step(torch.full((2, N), K), model.new_cache(2, codes.device))
    torch.testing.assert_close(first, full[:, :, 0], rtol=0, atol=1e-5)


def test_sampling_is_reproducible_and_in_range():
    model = make_model()
    draws = [model.sample(5, 20, generator=torch.Generator().manual_seed(s), temperature=0.8) for s in (3, 3, 4)]
    assert draws[0].shape == (5, N, 20) and draws[0].dtype == torch.long
    assert draws[0].min() >= 0 and draws[0].max() < K
    assert torch.equal(draws[0], draws[1])
    assert not torch.equal(draws[0], draws[2])


def test_first_sampled_code_follows_the_model():
    model = make_model()
    with torch.no_grad():
        model.head.bias.normal_(0.0, 1.0)  # a peaked first distribution, or a wrong sampler would pass
        probs = model(random_codes(batch=1))[0, :, 0].softmax(dim=-1)  # the first prediction ignores the codes
    codes = model.sample(4000, 1, generator=torch.Generator().manual_seed(0))
    counts = torch.stack([torch.bincount(codes[:, k, 0], minlength=K) for k in range(N)]).float()
    torch.testing.assert_close(counts / 4000, probs, rtol=0, atol=0.03)


def test_other_groups_codes_do_not_matter():
    model, codes, j = make_model(), random_codes(), 1
    others = [k for k in range(N) if k != j]
    changed = codes.clone()
    changed[:, j] = (codes[:, j] + 5) % K
    with torch.no_grad():
        before, after = model(codes), model(changed)
    torch.testing.assert_close(after[:, others], before[:, others], rtol=0, atol=0)
    assert (after[:, j] - before[:, j]).abs().max() > 1e-3


@pytest.mark.parametrize("j", [0, N - 1])
def test_each_parameter_slice_drives_only_its_own_model(j):
    model, codes = make_model(), random_codes()
    others = [k for k in range(N) if k != j]
    with torch.no_grad():
        before = model(codes)
        for name, param in model.named_parameters():
            saved = param[j].clone()
            param[j].add_(0.1 * torch.randn_like(saved))
            after = model(codes)
            param[j].copy_(saved)
            torch.testing.assert_close(after[:, others], before[:, others], rtol=0, atol=1e-6, msg=name)
            # Every slice must matter to its own model, so no model silently reads another's slice.
            assert (after[:, j] - before[:, j]).abs().max() > 1e-4, name


def test_log_prob_codes_matches_brute_force():
    model, codes = make_model(), random_codes(batch=3, length=20)
    with torch.no_grad():
        log_probs = model(codes).log_softmax(dim=-1)
        expected = torch.zeros(3, N)
        for b in range(3):
            for k in range(N):
                for s in range(20):
                    expected[b, k] += log_probs[b, k, s, codes[b, k, s]]
        got = model.log_prob_codes(codes)
    assert got.shape == (3, N) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def test_training_learns_a_pattern_that_sampling_reproduces():
    model = make_model().train()
    # A different fixed sequence per model, so each has to learn its own.
    pattern = torch.stack([(torch.arange(CONTEXT) * (k + 1) + 3 * k) % K for k in range(N)])
    codes = pattern.expand(8, N, CONTEXT)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    with torch.no_grad():
        initial = -model.log_prob_codes(codes).mean()
    for _ in range(100):
        loss = -model.log_prob_codes(codes).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        final = -model.log_prob_codes(codes).mean()
    assert final < 0.1 * initial, (initial, final)
    sampled = model.sample(2, CONTEXT, generator=torch.Generator().manual_seed(0), temperature=0.05)
    assert torch.equal(sampled, pattern.expand(2, N, CONTEXT))


def test_invalid_inputs_raise():
    model = make_model()
    with pytest.raises(ValueError, match="sequence of 33 codes is longer than the Transformer context 32"):
        model(random_codes(length=CONTEXT + 1))
    with pytest.raises(ValueError, match="longer than the Transformer context"):
        model.sample(1, CONTEXT + 1)
    for bad in (K, -1):
        codes = random_codes()
        codes[0, 1, 3] = bad
        with pytest.raises(ValueError, match="outside"):
            model(codes)
    with pytest.raises(ValueError, match="group dim"):
        model(torch.zeros(2, N + 1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        model(torch.zeros(2, N, 4))
    cache = model.new_cache(2)
    with pytest.raises(ValueError, match="start token"):
        model.step(torch.zeros(2, N, dtype=torch.long), cache)
    model.step(None, cache)
    with pytest.raises(ValueError, match="None only at the first step"):
        model.step(None, cache)
    with pytest.raises(ValueError, match="outside"):
        model.step(torch.full((2, N), K), cache)
    with pytest.raises(ValueError, match=r"previous must be \[2, 3\]"):
        model.step(torch.zeros(1, N, dtype=torch.long), cache)
