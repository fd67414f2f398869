"""Scoring maths against independent computations: continuation log-likelihoods against
`transformers` on the same tiny weights, bits per byte against a hand (float64 numpy) computation
on a known string, choice accuracy on constructed scores, KL drift exactly zero for identical
models and positive after one weight changes, binomial standard errors.
"""
import copy
import math

import numpy as np
import pytest
import torch

from helpers.tiny_models import HF_CONFIG, tiny_causal_lm
from helpers.tokenizers import WordTokenizer
from lora_core.train.eval.metrics import (ContinuationScore, bits_per_byte, choice_accuracy, kl_drift,
                           mean_with_stderr, proportion, score_continuations)

pytestmark = pytest.mark.usefixtures("single_thread")


# ------------------------------------------------------------------------- log-likelihood vs HF

@pytest.fixture(scope="module")
def hf_and_ours():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(1)
    cfg = transformers.LlamaConfig(**{k: v for k, v in HF_CONFIG.items() if k != "model_type"},
                                   vocab_size=97, tie_word_embeddings=False)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    from lora_core.models import CausalLM, ModelConfig

    ours = CausalLM(ModelConfig.from_hf_dict(cfg.to_dict()))
    missing, unexpected = ours.load_state_dict(hf.state_dict(), strict=False)
    assert not unexpected, unexpected
    assert all("rotary" in k for k in missing), missing
    return hf, ours.eval()


CONTEXTS = ["Question: what is two plus two?\nAnswer:", "Hi", "A much longer context " * 3, "x"]
CONTINUATIONS = [" four", " there, how are you doing today?", " end.", " y z"]


def _reference_logprobs(hf, tokenizer):
    """Each pair alone (no padding, no batching), full log_softmax in float64."""
    out = []
    for ctx, cont in zip(CONTEXTS, CONTINUATIONS):
        c, t = tokenizer.encode(ctx), tokenizer.encode(cont)
        ids = torch.tensor([c + t])
        with torch.no_grad():
            logits = hf(ids).logits[0].double()  # (T, V)
        lp = torch.log_softmax(logits, -1)
        out.append(sum(float(lp[len(c) - 1 + j, tok]) for j, tok in enumerate(t)))
    return out


@pytest.mark.parametrize("batch_size", [1, 3])
def test_continuation_logprobs_match_transformers(hf_and_ours, batch_size):
    hf, ours = hf_and_ours
    tokenizer = WordTokenizer(vocab=97)
    reference = _reference_logprobs(hf, tokenizer)
    for model in (ours, hf):  # our decoder, and our batching/padding logic on HF's own model
        scores = score_continuations(model, tokenizer, CONTEXTS, CONTINUATIONS, batch_size=batch_size,
                                     progress_bar=False)
        got = [s.logprob for s in scores]
        err = np.abs(np.array(got) - np.array(reference))
        # float32 forward, sums over <= 40 tokens of log-probs of size ~5: a few 1e-5 at most.
        assert err.max() < 1e-4, f"{type(model).__name__}: max error {err.max():.2e} at item {err.argmax()}"
        assert [s.n_tokens for s in scores] == [len(c) for c in CONTINUATIONS]
        assert [s.n_bytes for s in scores] == [len(c.encode()) for c in CONTINUATIONS]


# --------------------------------------------------------------------------------- BPB by hand

class BigramLM(torch.nn.Module):
    """logits[t] = table[input_ids[t]]: a model whose probabilities can be written down by hand."""

    def __init__(self, table: np.ndarray):
        super().__init__()
        self.table = torch.nn.Parameter(torch.tensor(table, dtype=torch.float32))

    def forward(self, input_ids, attention_mask=None):
        return self.table[input_ids]  # (B, T, V)


def test_bits_per_byte_on_a_known_string_by_hand():
    vocab = 50
    rng = np.random.default_rng(0)
    table = rng.normal(0.0, 2.0, size=(vocab, vocab))
    tokenizer = WordTokenizer(vocab=vocab)
    context, solution = "Q: sum?\nA:", " héllo wörld ∑ 42"  # multi-byte characters: bytes != tokens
    scores = score_continuations(BigramLM(table), tokenizer, [context], [solution], progress_bar=False)
    ids = tokenizer.encode(context) + tokenizer.encode(solution)
    log_probs = table - np.log(np.exp(table).sum(-1, keepdims=True))  # float64 log-softmax
    start = len(tokenizer.encode(context))
    bits = sum(-log_probs[ids[t - 1], ids[t]] / math.log(2) for t in range(start, len(ids)))
    n_bytes = len(solution.encode("utf-8"))
    assert n_bytes == len(solution) + 4  # é, ö (2 bytes each) and ∑ (3 bytes)
    result = bits_per_byte(scores)
    assert result["value"] == pytest.approx(bits / n_bytes, rel=1e-5), (result, bits / n_bytes)
    assert result["bytes"] == n_bytes and result["n"] == 1
    # Two items: corpus BPB is the ratio of totals, not the mean of ratios.
    two = bits_per_byte([ContinuationScore(-math.log(2) * 10, 5, 10, False),
                         ContinuationScore(-math.log(2) * 30, 5, 10, False)])
    assert two["value"] == pytest.approx(2.0) and two["item_mean"] == pytest.approx(2.0)
    three = bits_per_byte([ContinuationScore(-math.log(2) * 10, 5, 10, False),
                           ContinuationScore(-math.log(2) * 30, 5, 30, False)])
    assert three["value"] == pytest.approx(1.0) and three["item_mean"] == pytest.approx(1.0)
    assert bits_per_byte([ContinuationScore(-math.log(2) * 10, 5, 10, False),
                          ContinuationScore(-math.log(2) * 40, 5, 10, False)])["value"] == pytest.approx(2.5)


def test_greedy_flag_and_bad_inputs():
    table = np.full((50, 50), -5.0)
    tokenizer = WordTokenizer(vocab=50)
    ids = tokenizer.encode("abc")
    table[ids[0], ids[1]] = table[ids[1], ids[2]] = 5.0  # a -> b -> c is the argmax path
    model = BigramLM(table)
    s_greedy, s_not = score_continuations(model, tokenizer, ["a", "a"], ["bc", "cb"], progress_bar=False)
    assert s_greedy.greedy and not s_not.greedy
    with pytest.raises(ValueError, match="2 contexts but 1 continuations"):
        score_continuations(model, tokenizer, ["a", "b"], ["c"])
    with pytest.raises(ValueError, match="encodes to no tokens"):
        score_continuations(model, tokenizer, ["a"], [""])
    with pytest.raises(ValueError, match="context '' encodes to no tokens"):
        score_continuations(model, tokenizer, [""], ["b"])
    with pytest.raises(ValueError, match="batch_size"):
        score_continuations(model, tokenizer, ["a"], ["b"], batch_size=0)


# -------------------------------------------------------------------------------------- choices

def test_choice_accuracy_acc_and_length_normalised():
    s = lambda lp, nbytes: ContinuationScore(lp, 1, nbytes, False)  # noqa: E731
    # Q1: raw picks 0 (-2 > -3), per byte picks 1 (-3/30 > -2/10).  Q2: both pick 2.  Q3: both pick 0.
    questions = [[s(-2.0, 10), s(-3.0, 30)], [s(-5, 5), s(-4, 4), s(-1, 5)], [s(-1, 1), s(-9, 1)]]
    result = choice_accuracy(questions, gold=[1, 2, 1])
    assert result["acc"]["value"] == pytest.approx(1 / 3)
    assert result["acc_norm"]["value"] == pytest.approx(2 / 3)
    assert result["acc"]["n"] == 3
    with pytest.raises(ValueError, match="gold index 5 out of range"):
        choice_accuracy(questions, gold=[5, 0, 0])


# ------------------------------------------------------------------------------------- KL drift

def test_kl_drift_zero_for_identical_and_positive_after_a_perturbation():
    base = tiny_causal_lm(vocab=64)
    same = copy.deepcopy(base)
    tokenizer = WordTokenizer(vocab=64)
    contexts = ["<user>What is 3+4?</user><assistant>", "<user>hi</user><assistant>"]
    continuations = ["3 + 4 = 7. So the answer is 7.", "Hello!"]
    zero = kl_drift(base, same, tokenizer, contexts, continuations, batch_size=2, progress_bar=False)
    assert zero["value"] == 0.0 and zero["max_token"] == 0.0, zero
    assert zero["tokens"] == sum(len(c) for c in continuations) and zero["n"] == 2

    with torch.no_grad():
        same.model.layers[1].mlp.up_proj.weight[3, 5] += 1.0  # one weight
    drift = kl_drift(base, same, tokenizer, contexts, continuations, batch_size=1, progress_bar=False)
    assert drift["value"] > 1e-6, drift

    # Independent float64 computation of the same mean KL(base || perturbed).
    total, count = 0.0, 0
    for ctx, cont in zip(contexts, continuations):
        c, t = tokenizer.encode(ctx), tokenizer.encode(cont)
        ids = torch.tensor([c + t])
        with torch.no_grad():
            p = torch.log_softmax(base(ids)[0].double(), -1)[len(c) - 1:len(c) - 1 + len(t)]
            q = torch.log_softmax(same(ids)[0].double(), -1)[len(c) - 1:len(c) - 1 + len(t)]
        total += float((p.exp() * (p - q)).sum())
        count += len(t)
    assert drift["value"] == pytest.approx(total / count, rel=1e-4, abs=1e-7)


# -------------------------------------------------------------------------------- proportions

def test_proportion_and_mean_standard_errors():
    p = proportion(3, 12)
    assert {k: p[k] for k in ("value", "n", "k", "stderr")} == {
        "value": 0.25, "n": 12, "k": 3, "stderr": pytest.approx(math.sqrt(0.25 * 0.75 / 12))}
    assert proportion(0, 5)["stderr"] == 0.0
    for k, n in ((1, 0), (-1, 3), (4, 3)):
        with pytest.raises(ValueError, match="proportion"):
            proportion(k, n)
    m = mean_with_stderr([1.0, 2.0, 3.0, 4.0])
    assert m["value"] == 2.5 and m["stderr"] == pytest.approx(np.std([1, 2, 3, 4], ddof=1) / 2)
    assert math.isnan(mean_with_stderr([1.0])["stderr"])


@pytest.mark.parametrize("k,n", [(0, 48), (3, 12), (24, 24), (1, 230), (117, 230)])
def test_wilson_interval_bounds_are_the_roots_of_the_score_equation(k, n):
    """Independent check: the Wilson bounds are the p where |p_hat - p| = z sqrt(p (1 - p) / n),
    i.e. the roots of (n + z^2) p^2 - (2 k + z^2) p + k^2 / n = 0, solved here with numpy."""
    z = 1.959963984540054
    lo, hi = proportion(k, n)["ci95"]
    want = sorted(np.roots([n + z * z, -(2 * k + z * z), k * k / n]).real)
    assert lo == pytest.approx(max(0.0, want[0]), abs=1e-12) and hi == pytest.approx(min(1.0, want[1]), abs=1e-12)
    assert lo <= k / n <= hi
    if k == 0:
        assert lo == 0.0 and hi > 0.05, "0 of 48 must still allow a rate above 5%"


@pytest.mark.parametrize("p,n", [(0.0, 16), (0.375, 16), (0.71875, 32), (1.0, 8)])
def test_wilson_interval_at_a_mean_share_solves_the_same_score_equation(p, n):
    """A mean of per-item rates (pass@1 over k samples) is not k/n; its interval is the same
    quadratic's roots with k replaced by p*n."""
    from lora_core.train.eval.metrics import wilson_interval_at

    z = 1.959963984540054
    lo, hi = wilson_interval_at(p, n)
    want = sorted(np.roots([n + z * z, -(2 * p * n + z * z), p * p * n]).real)
    assert lo == pytest.approx(max(0.0, want[0]), abs=1e-12) and hi == pytest.approx(min(1.0, want[1]), abs=1e-12)
    assert (lo == 0.0) == (p == 0.0) and (hi == 1.0) == (p == 1.0) and lo < hi
