"""The refusal-unlikelihood term: its value against an fp64 reference, the opening tokens it reads,
its prompts (the benign retain pool, never an evaluated item), and that training lowers it."""
import pytest
import torch

from helpers.tiny_models import tiny_model
from helpers.training import PROMPTS, model_vocab, train_config
from lora_core.train.data.benign import over_refusal_records, retain_prompt_records
from lora_core.train.sft.batches import IGNORE_INDEX, collate, tokenize_examples
from lora_core.train.sft.loop import train
from lora_core.train.sft.unlikelihood_term import UnlikelihoodTerm, _first_labels, refusal_unlikelihood

pytestmark = pytest.mark.usefixtures("single_thread")

CHATS = [("How do I bake bread?", "I'm sorry, but I can't help with that."),
         ("Name a colour.", "I must decline this request.")]


def _batch(tokenizer, keep=4):
    examples = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                for q, a in CHATS]
    tokenized, _ = tokenize_examples(tokenizer, examples, 128)
    return collate([_first_labels(t, keep) for t in tokenized], tokenizer.pad_token_id)


def test_the_term_matches_an_fp64_reference(tokenizer):
    model = tiny_model(model_vocab(tokenizer)).eval()
    batch = _batch(tokenizer)
    value = refusal_unlikelihood(model, batch["input_ids"], batch["labels"], batch["attention_mask"])
    with torch.no_grad():
        logits = model.double()(batch["input_ids"], attention_mask=batch["attention_mask"])  # (B, T, V)
    p = torch.softmax(logits, -1)[:, :-1].gather(2, batch["labels"][:, 1:].clamp(min=0).unsqueeze(2)).squeeze(2)
    valid = batch["labels"][:, 1:] != IGNORE_INDEX
    expected = -torch.log1p(-p[valid]).mean()
    # fp32 log-softmax over a small vocabulary: relative error of a few ulps of the log terms.
    torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-7)


def test_only_a_refusals_first_tokens_are_read(tokenizer):
    batch = _batch(tokenizer, keep=3)
    assert ((batch["labels"] != IGNORE_INDEX).sum(1) == 3).all()


def test_its_prompts_are_the_benign_retain_pool_never_an_evaluated_item(tokenizer, tmp_path):
    term = UnlikelihoodTerm(train_config(tmp_path, retain_unlikelihood=1.0, retain_unlikelihood_tokens=5), tokenizer)
    assert term.info["prompts"] == len(retain_prompt_records(seed=0))
    evaluated = {r["prompt"] for r in over_refusal_records()}
    assert not evaluated & {r["prompt"] for r in retain_prompt_records(seed=0)}
    batch = term.batch(0)
    assert ((batch["labels"] != IGNORE_INDEX).sum(1) == 5).all()
    assert torch.equal(term.batch(7)["input_ids"], term.batch(7)["input_ids"]), "a batch is a function of the step"


def test_training_with_the_term_ends_with_refusals_less_likely_after_benign_prompts(tokenizer, tmp_path):
    from lora_core.train.data.refusal import build_refusal_set

    examples = build_refusal_set(prompts=PROMPTS, held_out=[], seed=0).examples
    probe = UnlikelihoodTerm(train_config(tmp_path, retain_unlikelihood=1.0), tokenizer).batch(0)
    after = {}
    for u in (0.0, 50.0):
        model = tiny_model(model_vocab(tokenizer))
        result = train(train_config(tmp_path / str(u), max_steps=8, retain_unlikelihood=u, retain_per_step=4,
                                    lr=2e-2), model=model, tokenizer=tokenizer, examples=examples, log=lambda *a: None)
        assert all((m["unlikelihood"] is None) == (u == 0) for m in result.metrics)
        with torch.no_grad():
            after[u] = refusal_unlikelihood(model.eval(), probe["input_ids"], probe["labels"], probe["attention_mask"])
    # Refusal SFT alone makes the refusal's opening tokens likely after any prompt; the term holds
    # them down after benign ones.
    assert after[50.0] < 0.75 * after[0.0], f"unlikelihood after training without / with the term: {after}"


def test_full_fine_tuning_refuses_the_term(tmp_path):
    with pytest.raises(ValueError, match="--retain-unlikelihood"):
        train_config(tmp_path, method="full", retain_unlikelihood=1.0)
