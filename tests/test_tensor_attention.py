"""tensor_attention: determinism, fused == reference (outputs and gradients, float64, odd sizes, sink and the matrix
special case), a brute-force triple loop, the polynomial factorisation against the n^3 Taylor sum, the approximation
error below the bound, Match3/Match2 labels by brute force, the hand-set Match3 head, bad arguments."""

import itertools
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_usage_error, load, run_script, smoke_determinism, without_timing

m = load("tensor_attention")


def inputs(n=7, m1=8, m2=5, d=3, B=2, H=3, seed=0, bound=1.0):
    """Random Q (B,H,n,d), K1, V1 (B,H,m1,d), K2, V2 (B,H,m2,d) in float64 with gradients."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(B, H, n, d), (B, H, m1, d), (B, H, m2, d), (B, H, m1, d), (B, H, m2, d)]
    return [(bound * torch.randn(*s, generator=g, dtype=torch.float64)).requires_grad_(True) for s in shapes]


def test_same_seed_same_numbers_other_seed_other_numbers(tmp_path):
    first, _, other = smoke_determinism(m, tmp_path)
    assert without_timing(first["results"])["tensor"] != without_timing(other["results"])["tensor"]
    assert first["history"][-1]["train/loss"] != other["history"][-1]["train/loss"]


@pytest.mark.parametrize("shape", [dict(), dict(n=9, m1=10, m2=10, d=5), dict(n=5, m1=6, m2=1, d=4)])
def test_fused_equals_reference_outputs_and_gradients(shape):
    x = inputs(**shape)
    scale = 1 / math.sqrt(x[0].shape[-1])
    out_ref, out_fused = m.attention_reference(*x, scale), m.attention_fused(*x, scale)
    torch.testing.assert_close(out_fused, out_ref, atol=1e-12, rtol=1e-10)
    g = torch.randn_like(out_ref)
    for a, b in zip(torch.autograd.grad(out_fused, x, g), torch.autograd.grad(out_ref, x, g)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


def test_reference_equals_a_brute_force_triple_loop():
    q, k1, k2, v1, v2 = (t.detach()[0, 0] for t in inputs(n=3, m1=4, m2=3, d=2, B=1, H=1))
    scale = 0.5
    for i in range(3):  # Att_i = sum_{j1,j2} exp(s_ij1j2) (V1_j1 o V2_j2) / sum_{j1,j2} exp(s_ij1j2)
        num, den = torch.zeros(2, dtype=torch.float64), 0.0
        for j1, j2 in itertools.product(range(4), range(3)):
            w = math.exp(scale * sum(q[i, l] * k1[j1, l] * k2[j2, l] for l in range(2)))
            num, den = num + w * v1[j1] * v2[j2], den + w
        got = m.attention_reference(q[None, None], k1[None, None], k2[None, None], v1[None, None], v2[None, None],
                                    scale)[0, 0, i]
        torch.testing.assert_close(got, num / den, atol=1e-13, rtol=1e-12)


def test_column_kronecker_rows_are_hadamard_products():
    a, b = torch.randn(4, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    ab = m.column_kronecker(a, b)
    assert ab.shape == (20, 3)
    for j1, j2 in itertools.product(range(4), range(5)):
        torch.testing.assert_close(ab[j1 * 5 + j2], a[j1] * b[j2])


def test_matrix_attention_is_the_special_case_with_one_all_ones_key():
    q, k1, _, v1, _ = (t.detach() for t in inputs(n=7, m1=9, m2=1, d=4))
    ones = torch.ones_like(k1[:, :, :1])
    torch.testing.assert_close(m.attention_fused(q, k1, ones, v1, ones, 0.5),
                               F.scaled_dot_product_attention(q, k1, v1, scale=0.5), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("d, g", [(4, 4), (3, 7), (2, 1)])
def test_monomial_count_and_factorisation_equal_the_n3_taylor_sum(d, g):
    """P(Q (K1 (/) K2)^T s) = U1 (U2 (/) U3)^T exactly (multinomial theorem): attention_poly must equal the n^3 sum with
    exp replaced by its degree-g Taylor polynomial, for ANY B (here large entries, where P is a poor exp)."""
    x = [t.detach() for t in inputs(n=5, m1=6, m2=4, d=d, bound=1.5)]
    assert m.monomials(x[0], g)[0].shape[-1] == m.n_monomials(d, g) == math.comb(d + g, g)
    s = torch.einsum("bhid,bhjd,bhkd->bhijk", *x[:3]) * 0.3  # (B, H, n, m1, m2)
    p = sum(s**t / math.factorial(t) for t in range(g + 1))  # Taylor polynomial of exp, entrywise
    num = torch.einsum("bhijk,bhjd,bhkd->bhid", p, x[3], x[4])
    torch.testing.assert_close(m.attention_poly(*x, 0.3, g), num / p.sum((-1, -2))[..., None], atol=1e-9, rtol=1e-9)


def test_polynomial_error_small_below_the_bound_and_large_above():
    a = replace(m.Args(), bounds=(0.25, 0.5, 1.0, 3.0), degrees=(4, 8), approx_n=33)
    errs = m.approximation_study(a, torch.device("cpu"))
    assert errs[(0.25, 4)] < 1e-10 and errs[(0.5, 4)] < 1e-7 and errs[(1.0, 4)] < 1e-4 and errs[(1.0, 8)] < 1e-8
    assert errs[(3.0, 4)] > 1e-2 and errs[(3.0, 8)] > 1e-2  # B^3 = 27: far outside the Taylor polynomial's range
    for g in (4, 8):
        e = [max(errs[(b, g)], m.ROUNDOFF) for b in (0.25, 0.5, 1.0, 3.0)]  # round-off floor: order is noise
        assert e == sorted(e)


def test_exact_chunked_equals_one_call():
    x = [t.detach() for t in inputs(n=11, m1=7, m2=7, d=3)]
    torch.testing.assert_close(m.exact_chunked(*x, 0.25), m.attention_fused(*x, 0.25), atol=1e-13, rtol=1e-12)


@pytest.mark.parametrize("order", [2, 3])
def test_match_labels_against_brute_force(order):
    x, y = m.make_match(20, 7, 11, order, torch.Generator().manual_seed(order))
    for b, i in itertools.product(range(20), range(7)):
        others = itertools.product(range(7), repeat=order - 1)  # j (and k) over all positions, repeats allowed
        want = any((x[b, i] + sum(x[b, j] for j in js)) % 11 == 0 for js in others)
        assert y[b, i].item() == float(want)


def test_hand_set_tensor_head_solves_match3_and_too_few_frequencies_do_not():
    a = replace(m.Args(), n_test=300)
    assert m.constructive_match3(a, 8, 16) == 1.0
    assert m.constructive_match3(a, 4, 16) < 0.9  # the card: with F <= 4 the gap to a near-miss is too small


def test_whole_model_same_output_on_both_paths():
    a = replace(m.PRESETS["smoke"], width=24, n_heads=3)
    x, _ = m.make_match(6, 9, a.modulus, 3, torch.Generator().manual_seed(0))
    for tensor in (True, False):
        torch.manual_seed(0)
        ref = m.OneLayer(a, m.attention_reference, tensor).double().eval()
        fused = m.OneLayer(a, m.attention_fused, tensor).double().eval()
        fused.load_state_dict(ref.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(fused(x), ref(x), atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("flags, words", [
    (["--width", "64", "--n-heads", "5"], ["divide"]),
    (["--degrees", "4", "0"], ["degree"]),
    (["--approx-d", "16", "--degrees", "8"], ["20000"]),
    (["--attn", "poly", "--poly-degree", "8"], ["poly-degree"]),
    (["--bounds", "1", "-1"], ["bounds"]),
])
def test_bad_arguments_are_one_clear_sentence(flags, words):
    assert_usage_error(run_script("tensor_attention", *flags), *words)


@pytest.mark.claim
def test_default_preset_reproduces_the_claim(tmp_path):
    record = m.main(replace(m.Args(), out_dir=str(tmp_path)))
    assert record["claim"]["passed"], record["claim"]
