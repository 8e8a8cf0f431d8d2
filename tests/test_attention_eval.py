"""Evaluation kernels of tbps.models.attention (NAFS's non-local attention, ACSA's cross
attention): each against a literal per-pair loop of the paper's equations, to 1e-5.

The kernels pack each caption's valid features first and sort captions by their count, tile the
pair grid, skip the softmax normalisation and floor very negative exponents; the inputs here
make every one of those matter: captions of different lengths with garbage in their padding,
masked image features, tiles of a few entries, two worker threads, temperatures on both sides
of the exponent floor.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tbps.models.attention import (
    ContextualNonLocalAttention,
    bidirectional_non_local_similarity,
    fast_bidirectional_non_local_similarity,
    fast_candidate_bidirectional_non_local_similarity,
    fast_candidate_cross_attention_similarity,
    fast_cross_attention_similarity,
    linear_for_evaluation,
)

pytestmark = pytest.mark.usefixtures("single_thread")


# ------------------------------------------------------------------------------ literal references


def literal_non_local(q, v, q_mask, k, u, k_mask, lam, focal, scaling, epsilon=1e-8):
    """Eqs. 2-5 one pair and one feature at a time, in float64: ``[query items, key items]``."""
    result = torch.zeros(q.shape[0], k.shape[0], dtype=torch.float64)
    for i in range(q.shape[0]):
        for j in range(k.shape[0]):
            queries = [a for a in range(q.shape[1]) if q_mask[i, a]]
            keys = [b for b in range(k.shape[1]) if k_mask[j, b]]
            scale = 1.0
            if scaling == "counts":
                scale = len(queries) ** 2 / len(keys) if focal else len(queries)
            s = {(a, b): max(F.cosine_similarity(q[i, a].double(), k[j, b].double(), dim=0).item(), 0.0)
                 for a in queries for b in keys}  # eq. 2
            column = {b: sum(s[a, b] for a in queries) for b in keys}
            s_hat = {key: s[key] / (column[key[1]] + epsilon) for key in s}
            total = 0.0
            for a in queries:
                if focal:  # s~_ab = [sum_c (s^_ab - s^_ac)]_+ s^_ab
                    logit = {b: max(sum(s_hat[a, b] - s_hat[a, c] for c in keys), 0.0) * s_hat[a, b] for b in keys}
                else:
                    logit = {b: s_hat[a, b] for b in keys}
                top = max(logit.values())
                weight = {b: math.exp(lam * scale * (logit[b] - top)) for b in keys}  # eq. 3 (shift cancels)
                z = sum(weight.values())
                context = sum(weight[b] / z * u[j, b].double() for b in keys)
                total += F.cosine_similarity(v[i, a].double(), context, dim=0).item()  # eq. 4
            result[i, j] = total / len(queries)  # eq. 5
    return result


def literal_acam(visual, text, mask, lam, lam_prime):
    """ACSA eqs. 1-11 for one image (m x D) and one caption (n x D) with Python loops."""
    real = [j for j in range(text.shape[0]) if mask[j] > 0]
    if not real:
        return 0.0, 0.0
    visual, text = visual.double(), text.double()
    pos = {(i, j): max(float(F.cosine_similarity(visual[i], text[j], dim=0)), 0.0) for i in range(visual.shape[0]) for j in real}
    image_scores = []
    for i in range(visual.shape[0]):
        tilde = {j: pos[i, j] / max(math.sqrt(sum(pos[a, j] ** 2 for a in range(visual.shape[0]))), 1e-4) for j in real}
        top = max(tilde.values())
        z = sum(math.exp(lam * (tilde[j] - top)) for j in real)
        context = sum(math.exp(lam * (tilde[j] - top)) / z * text[j] for j in real)
        image_scores.append(float(F.cosine_similarity(visual[i], context, dim=0)))
    text_scores = []
    for j in real:
        tilde = {i: pos[i, j] / max(math.sqrt(sum(pos[i, b] ** 2 for b in real)), 1e-4) for i in range(visual.shape[0])}
        top = max(tilde.values())
        z = sum(math.exp(lam_prime * (tilde[i] - top)) for i in range(visual.shape[0]))
        context = sum(math.exp(lam_prime * (tilde[i] - top)) / z * visual[i] for i in range(visual.shape[0]))
        text_scores.append(float(F.cosine_similarity(text[j], context, dim=0)))
    return sum(image_scores) / len(image_scores), sum(text_scores) / len(text_scores)


def non_local_inputs(seed=0, images=5, texts=6, m=4, slots=7, dim=12):
    """Images with a masked feature or two; captions of 1-7 valid features scattered over the
    slots (as NAFS's sentence / sub-sentence / word slots are), garbage in the padding."""
    g = torch.Generator().manual_seed(seed)
    q, v = torch.randn(images, m, dim, generator=g), torch.randn(images, m, dim, generator=g)
    k, u = torch.randn(texts, slots, dim, generator=g), torch.randn(texts, slots, dim, generator=g)
    q_mask = torch.ones(images, m)
    q_mask[1, 2:] = 0
    q_mask[3, 0] = 0
    k_mask = (torch.rand(texts, slots, generator=g) > 0.45).float()
    k_mask[:, 0] = 1  # the sentence
    k_mask[2] = torch.tensor([1.0, 0, 0, 0, 0, 0, 0])  # a single feature
    k_mask[4] = 1.0  # every slot
    return q, v, q_mask, k, u, k_mask


# ------------------------------------------------------------------------------ NAFS


@pytest.mark.parametrize("scaling", ["counts", "none"])
@pytest.mark.parametrize("focal", [True, False])
def test_fast_non_local_equals_the_literal_equations(focal, scaling):
    q, v, q_mask, k, u, k_mask = non_local_inputs()
    # 7 x 4^2 = 112 > 40 (counts, focal): exponents are floored; 3 stays above the floor.
    lam_image, lam_text = 7.0, 3.0
    expected = literal_non_local(q, v, q_mask, k, u, k_mask, lam_image, focal, scaling)
    expected_t2i = literal_non_local(k, u, k_mask, q, v, q_mask, lam_text, focal, scaling).t()
    for max_elements, workers in ((None, 1), (20, 1), (20, 2), (3, 2)):
        s, s_prime = fast_bidirectional_non_local_similarity(
            q, v, q_mask, k, u, k_mask, lam_image, lam_text, focal, max_elements=max_elements,
            lambda_scaling=scaling, workers=workers,
        )
        assert torch.allclose(s.double(), expected, atol=1e-5), (max_elements, workers)
        assert torch.allclose(s_prime.double(), expected_t2i, atol=1e-5), (max_elements, workers)


def test_fast_non_local_directions_dtype_and_padding():
    q, v, q_mask, k, u, k_mask = non_local_inputs(seed=1)
    both = fast_bidirectional_non_local_similarity(q, v, q_mask, k, u, k_mask, 4.0, 4.0, lambda_scaling="counts")
    only_i2t = fast_bidirectional_non_local_similarity(
        q, v, q_mask, k, u, k_mask, 4.0, 4.0, text_to_image=False, lambda_scaling="counts"
    )
    assert only_i2t[1] is None and torch.equal(only_i2t[0], both[0])
    # float64 in, float64 out, the same scores.
    wide = fast_bidirectional_non_local_similarity(
        q.double(), v.double(), q_mask, k.double(), u.double(), k_mask, 4.0, 4.0, lambda_scaling="counts"
    )
    assert wide[0].dtype == torch.float64 and torch.allclose(wide[0].float(), both[0], atol=1e-5)
    # More padding slots with garbage in them change nothing.
    g = torch.Generator().manual_seed(9)
    padded = fast_bidirectional_non_local_similarity(
        q, v, q_mask, torch.cat([k, torch.randn(6, 5, 12, generator=g)], 1), torch.cat([u, torch.randn(6, 5, 12, generator=g)], 1),
        torch.cat([k_mask, torch.zeros(6, 5)], 1), 4.0, 4.0, lambda_scaling="counts",
    )
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(padded, both))


def test_fast_non_local_caption_without_features_scores_zero():
    q, v, q_mask, k, u, k_mask = non_local_inputs(seed=2)
    k_mask[3] = 0
    s, s_prime = fast_bidirectional_non_local_similarity(q, v, q_mask, k, u, k_mask, 4.0, 4.0)
    assert torch.equal(s[:, 3], torch.zeros(5)) and torch.equal(s_prime[:, 3], torch.zeros(5))
    keep = [0, 1, 2, 4, 5]
    reference = bidirectional_non_local_similarity(q, v, q_mask, k[keep], u[keep], k_mask[keep], 4.0, 4.0)
    assert torch.allclose(s[:, keep], reference[0], atol=1e-5) and torch.allclose(s_prime[:, keep], reference[1], atol=1e-5)


@pytest.mark.parametrize("scaling", ["counts", "none"])
def test_fast_candidate_non_local_equals_the_literal_equations(scaling):
    q, v, _, k, u, k_mask = non_local_inputs(seed=3)
    full_mask = torch.ones(q.shape[:2])
    expected = literal_non_local(q, v, full_mask, k, u, k_mask, 6.0, True, scaling).t()  # [texts, images]
    expected_t2i = literal_non_local(k, u, k_mask, q, v, full_mask, 2.0, True, scaling)
    candidates = torch.tensor([[4, 0, 2], [1, 1, 3], [0, 2, 4], [3, 3, 0], [2, 1, 0], [4, 4, 1]])
    full = fast_bidirectional_non_local_similarity(q, v, None, k, u, k_mask, 6.0, 2.0, lambda_scaling=scaling)
    for max_elements, workers in ((None, 1), (30, 2)):
        s, s_prime = fast_candidate_bidirectional_non_local_similarity(
            q, v, k, u, k_mask, candidates, 6.0, 2.0, max_elements=max_elements, lambda_scaling=scaling, workers=workers
        )
        assert torch.allclose(s.double(), expected.gather(1, candidates), atol=1e-5)
        assert torch.allclose(s_prime.double(), expected_t2i.gather(1, candidates), atol=1e-5)
        # The two-stage route gives the full score on the kept candidates.
        assert torch.allclose(s, full[0].t().gather(1, candidates), atol=1e-6)
        assert torch.allclose(s_prime, full[1].t().gather(1, candidates), atol=1e-6)


def test_fast_kernels_refuse_gradients_and_negative_temperatures():
    q, v, q_mask, k, u, k_mask = non_local_inputs()
    with pytest.raises(RuntimeError, match="torch.no_grad"):
        fast_bidirectional_non_local_similarity(q.requires_grad_(), v, q_mask, k, u, k_mask, 4.0, 4.0)
    with pytest.raises(ValueError, match=">= 0"):
        fast_bidirectional_non_local_similarity(q.detach(), v, q_mask, k, u, k_mask, -1.0, 4.0)
    with pytest.raises(ValueError, match=">= 0"):
        ContextualNonLocalAttention(8, image_inverse_temperature=-2.0)
    with pytest.raises(ValueError, match="workers"):
        fast_cross_attention_similarity(torch.randn(2, 3, 4), torch.randn(2, 2, 4), None, 5.0, 5.0, workers=0)


def test_module_scores_with_the_kernel_without_autograd():
    torch.manual_seed(0)
    module = ContextualNonLocalAttention(12)
    q, _, _, k, _, k_mask = non_local_inputs(seed=4)
    projected = module.project(q, k)
    trained = module.similarities_from_projections(projected[0], projected[1], None, projected[2], projected[3], k_mask)
    assert trained[0].grad_fn is not None  # training: the differentiable reference
    with torch.no_grad():
        evaluated = module.similarities_from_projections(*projected[:2], None, *projected[2:], k_mask, max_elements=10)
        evaluation_projections = module.project_for_evaluation(q, k, k_mask)
    assert all(torch.allclose(a, b.detach(), atol=1e-5) for a, b in zip(evaluated, trained))
    # Evaluation projections: the same on real features, 0 on padding.
    for fast, reference, mask in zip(evaluation_projections, projected, (None, None, k_mask, k_mask)):
        reference = reference.detach() if mask is None else reference.detach() * mask.unsqueeze(-1)
        assert torch.allclose(fast, reference, atol=1e-5)
    with pytest.raises(RuntimeError, match="torch.no_grad"):
        linear_for_evaluation(q, module.image_query)


# ------------------------------------------------------------------------------ ACSA


def acsa_inputs(seed=0, images=6, texts=7, m=5, slots=6, dim=10):
    g = torch.Generator().manual_seed(seed)
    visual = torch.randn(images, m, dim, generator=g) * torch.rand(images, m, 1, generator=g).add(0.3)
    text = torch.randn(texts, slots, dim, generator=g) * torch.rand(texts, slots, 1, generator=g).add(0.3)
    mask = (torch.rand(texts, slots, generator=g) > 0.4).float()
    mask[1] = 0  # a caption without any phrase
    mask[2] = torch.tensor([0.0, 0, 0, 1, 0, 0])  # one phrase, not in the first slot
    mask[5] = 1.0
    return visual, text, mask  # garbage stays in the padding slots


@pytest.mark.parametrize("lambdas", [(20.0, 20.0), (90.0, 4.0)])
def test_fast_cross_attention_equals_the_literal_equations(lambdas):
    visual, text, mask = acsa_inputs()
    expected = torch.tensor([[literal_acam(visual[a], text[b], mask[b], *lambdas) for b in range(7)] for a in range(6)],
                            dtype=torch.float64)
    candidates = torch.tensor([[0, 5, 2], [1, 1, 3], [4, 0, 5], [2, 3, 3], [5, 4, 1], [0, 1, 2], [3, 2, 0]])
    for max_elements, workers in ((None, 1), (25, 2), (4, 1)):
        s, s_prime = fast_cross_attention_similarity(visual, text, mask, *lambdas, max_elements=max_elements, workers=workers)
        assert torch.allclose(s.double(), expected[..., 0], atol=1e-5), (max_elements, workers)
        assert torch.allclose(s_prime.double(), expected[..., 1], atol=1e-5), (max_elements, workers)
        picked = fast_candidate_cross_attention_similarity(
            visual, text, mask, candidates, *lambdas, max_elements=max_elements, workers=workers
        )
        assert torch.allclose(picked[0].double(), expected[..., 0].t().gather(1, candidates), atol=1e-5)
        assert torch.allclose(picked[1].double(), expected[..., 1].t().gather(1, candidates), atol=1e-5)
    assert torch.equal(s[:, 1], torch.zeros(6)) and torch.equal(s_prime[:, 1], torch.zeros(6))


def test_fast_cross_attention_directions():
    visual, text, mask = acsa_inputs(seed=1)
    both = fast_cross_attention_similarity(visual, text, mask, 20.0, 20.0)
    one = fast_cross_attention_similarity(visual, text, mask, 20.0, 20.0, image_to_text=False)
    assert one[0] is None and torch.equal(one[1], both[1])
    assert fast_cross_attention_similarity(visual, text, mask, 20.0, 20.0, False, False) == (None, None)


def test_evaluation_cache_reuses_only_the_same_unmodified_tensors():
    from tbps.models.attention import EvaluationCache

    cache, computed = EvaluationCache(), []
    gallery = torch.ones(3)

    def derive(x):
        computed.append(1)
        return x * 2

    first = cache.get((gallery, None), "a", lambda: derive(gallery))
    assert cache.get((gallery, None), "a", lambda: derive(gallery)) is first and len(computed) == 1
    gallery.add_(1)  # in place: the version counter moves
    assert torch.equal(cache.get((gallery, None), "a", lambda: derive(gallery)), torch.full((3,), 4.0))
    assert len(computed) == 2
    cache.get((gallery, None), "b", lambda: derive(gallery))  # another key
    cache.get((gallery.clone(), None), "b", lambda: derive(gallery))  # equal values, another tensor
    assert len(computed) == 4


def test_evaluation_cache_takes_inference_tensors_and_sees_their_changes():
    """Features encoded under torch.inference_mode have no version counter (reading it raised
    "Inference tensors do not track version counter" in ACSA's evaluation); the cache keeps a copy
    of such inputs and compares."""
    from tbps.models.attention import EvaluationCache

    cache, computed = EvaluationCache(), []

    def derive(x):
        computed.append(1)
        return x * 2

    with torch.inference_mode():
        gallery = torch.ones(4, 3)
    view = gallery[1:]
    first = cache.get((view, None), "a", lambda: derive(view))
    assert cache.get((view, None), "a", lambda: derive(view)) is first and len(computed) == 1
    with torch.inference_mode():
        gallery[2].add_(1)  # in place, inside inference mode: no version counter moves
    assert torch.equal(cache.get((view, None), "a", lambda: derive(view))[1], torch.full((3,), 4.0))
    assert len(computed) == 2
    # The kernels on inference tensors, outside and inside inference mode, equal ordinary tensors'.
    visual, text, mask = acsa_inputs(seed=7, images=1000)  # 3 groups of 2048 // m images: 3 work items
    expected = fast_cross_attention_similarity(visual, text, mask, 20.0, 20.0)
    # Small tiles and two worker threads: results allocated under inference mode are written
    # from the workers (grad and inference modes are thread-local).
    tiles = {"max_elements": 2_000, "workers": 2}
    with torch.inference_mode():
        visual_i, text_i, mask_i = visual.clone(), text.clone(), mask.clone()
        inside = fast_cross_attention_similarity(visual_i, text_i, mask_i, 20.0, 20.0, **tiles)
    outside = fast_cross_attention_similarity(visual_i, text_i, mask_i, 20.0, 20.0, **tiles)
    assert all(torch.allclose(a, b, atol=1e-6) and torch.allclose(a, c, atol=1e-6) for a, b, c in zip(expected, inside, outside))
    q, v, q_mask, k, u, k_mask = non_local_inputs(seed=8, images=1200)
    expected = fast_bidirectional_non_local_similarity(q, v, None, k, u, k_mask, 4.0, 4.0)
    with torch.inference_mode():
        q_i, v_i, k_i, u_i, k_mask_i = (x.clone() for x in (q, v, k, u, k_mask))
        inside = fast_bidirectional_non_local_similarity(q_i, v_i, None, k_i, u_i, k_mask_i, 4.0, 4.0, **tiles)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(expected, inside))


def test_kernels_follow_a_gallery_changed_in_place():
    q, v, q_mask, k, u, k_mask = non_local_inputs(seed=5)
    before = fast_bidirectional_non_local_similarity(q, v, None, k, u, k_mask, 4.0, 4.0)
    q[0].mul_(-1.0)
    v[1].add_(1.0)
    after = fast_bidirectional_non_local_similarity(q, v, None, k, u, k_mask, 4.0, 4.0)
    fresh = fast_bidirectional_non_local_similarity(q.clone(), v.clone(), None, k, u, k_mask, 4.0, 4.0)
    assert not torch.allclose(after[0], before[0])
    assert all(torch.equal(a, b) for a, b in zip(after, fresh))
    visual, text, mask = acsa_inputs(seed=6)
    before = fast_cross_attention_similarity(visual, text, mask, 20.0, 20.0)
    visual[2].mul_(-1.0)
    after = fast_cross_attention_similarity(visual, text, mask, 20.0, 20.0)
    fresh = fast_cross_attention_similarity(visual.clone(), text, mask, 20.0, 20.0)
    assert not torch.allclose(after[0], before[0])
    assert all(torch.equal(a, b) for a, b in zip(after, fresh))


def test_kernels_compute_in_float32_inside_autocast():
    """A bf16-mixed validation loop runs under autocast; the kernels keep float32."""
    q, v, q_mask, k, u, k_mask = non_local_inputs(seed=7)
    visual, text, mask = acsa_inputs(seed=7)
    plain = (
        fast_bidirectional_non_local_similarity(q, v, q_mask, k, u, k_mask, 4.0, 4.0),
        fast_candidate_bidirectional_non_local_similarity(q, v, k, u, k_mask, torch.tensor([[0, 1]] * 6), 4.0, 4.0),
        fast_cross_attention_similarity(visual, text, mask, 20.0, 20.0),
        fast_candidate_cross_attention_similarity(visual, text, mask, torch.tensor([[0, 1]] * 7), 20.0, 20.0),
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = (
            fast_bidirectional_non_local_similarity(q, v, q_mask, k, u, k_mask, 4.0, 4.0),
            fast_candidate_bidirectional_non_local_similarity(q, v, k, u, k_mask, torch.tensor([[0, 1]] * 6), 4.0, 4.0),
            fast_cross_attention_similarity(visual, text, mask, 20.0, 20.0),
            fast_candidate_cross_attention_similarity(visual, text, mask, torch.tensor([[0, 1]] * 7), 20.0, 20.0),
        )
    for reference, result in zip(plain, mixed):
        for a, b in zip(reference, result):
            assert b.dtype == torch.float32 and torch.equal(a, b)
