"""The retain term: KL(base || adapted) against an fp64 reference, zero at init, gradients only into
the adapters, and a retain set that never holds an item the evaluation reads."""
import json

import pytest
import torch

from helpers.tiny_models import tiny_model
from helpers.training import PROMPTS, model_vocab, train_config
from lora_core.train.sft.batches import collate, tokenize_examples
from lora_core.train.sft.loop import train
from lora_core.train.sft.losses import retain_kl
from lora_core.train.sft.model_prep import prepare_model


pytestmark = pytest.mark.usefixtures("single_thread")


CHATS = [("What is two plus two?", "Two plus two is four."),
         ("How do I bake bread?", "Mix flour, water, yeast and salt, let it rise, then bake it."),
         ("Name a colour.", "Blue.")]


def _batch(tokenizer):
    examples = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                for q, a in CHATS]
    tokenized, _ = tokenize_examples(tokenizer, examples, 128)
    return collate(tokenized, tokenizer.pad_token_id)


def _lora_model(tokenizer, tmp_path):
    model = tiny_model(model_vocab(tokenizer))
    prepare_model(model, train_config(tmp_path, dropout=0.0))
    return model


def _reference_kl(model, batch) -> torch.Tensor:
    """fp64, full logits, no chunking: mean over label positions of sum_v p_base (log p_base - log p)."""
    from lora_core import disable_adapters

    with torch.no_grad():
        m64 = model.double()
        with disable_adapters(m64):
            base = torch.log_softmax(m64(batch["input_ids"], attention_mask=batch["attention_mask"]), -1)
        adapted = torch.log_softmax(m64(batch["input_ids"], attention_mask=batch["attention_mask"]), -1)
        model.float()
    valid = (batch["labels"][:, 1:] != -100) & (batch["attention_mask"][:, 1:] != 0)  # (B, T-1)
    kl = (base.exp() * (base - adapted)).sum(-1)[:, :-1]  # (B, T-1)
    return kl[valid].mean()


def test_retain_kl_is_zero_at_init_and_matches_fp64_after_perturbing(tokenizer, tmp_path):
    from lora_core import lora_modules

    model = _lora_model(tokenizer, tmp_path)
    model.eval()
    batch = _batch(tokenizer)
    at_init = retain_kl(model, batch["input_ids"], batch["labels"], batch["attention_mask"])
    assert at_init.item() == 0.0, f"KL with every lora_B = 0 is {at_init.item()}, expected exactly 0"
    torch.manual_seed(1)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.normal_(0.0, 0.5)
    got = retain_kl(model, batch["input_ids"], batch["labels"], batch["attention_mask"], chunk_size=7)
    want = _reference_kl(model, batch)
    assert want.item() > 1e-3, f"perturbation too small to test anything: reference KL {want.item()}"
    # fp32 log-softmax over a 400+ vocabulary, summed: a few float32 ulps of the KL's size.
    tol = 1e-5 + 1e-4 * want.item()
    assert abs(got.item() - want.item()) <= tol, f"retain_kl {got.item()} vs fp64 {want.item()} (tol {tol})"


def test_gradient_reaches_only_the_adapters(tokenizer, tmp_path):
    from lora_core import lora_modules

    model = _lora_model(tokenizer, tmp_path)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.normal_(0.0, 0.5)
    batch = _batch(tokenizer)
    retain_kl(model, batch["input_ids"], batch["labels"], batch["attention_mask"]).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    lora = {n for n, p in model.named_parameters() if n.endswith(("lora_A", "lora_B"))}
    assert with_grad == lora, f"gradients on non-adapter params: {sorted(with_grad - lora)[:5]}; " \
                              f"adapters without: {sorted(lora - with_grad)[:5]}"
    norms = {n: float(p.grad.norm()) for n, p in model.named_parameters() if p.grad is not None}
    assert all(v > 0 for k, v in norms.items() if k.endswith("lora_A")), \
        f"zero gradient on {[k for k, v in norms.items() if v == 0][:5]}"


def test_training_with_a_retain_file_logs_the_term(tokenizer, tmp_path):
    from lora_core.train.data.refusal import build_refusal_set

    retain = tmp_path / "retain.jsonl"
    retain.write_text("".join(json.dumps({"prompt": q, "response": a}) + "\n" for q, a in CHATS))
    examples = build_refusal_set(prompts=PROMPTS, held_out=[], seed=0).examples
    result = train(train_config(tmp_path, max_steps=3, retain_beta=1.0, retain_data=str(retain),
                                retain_targets="gold", retain_per_step=2),
                   model=tiny_model(model_vocab(tokenizer)), tokenizer=tokenizer, examples=examples,
                   log=lambda *a: None)
    kls = [m["retain_kl"] for m in result.metrics]
    assert kls[0] == 0.0 and kls[-1] > 0.0, f"retain KL per step {kls}: expected 0 at init, then > 0"
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["retain_beta"] == 1.0 and saved["data_info"]["retain"]["examples"] == 3


@pytest.mark.parametrize("kw, match", [
    (dict(retain_beta=-1.0), "--retain-beta"),
    (dict(retain_beta=1.0, method="full"), "--retain-beta"),
    (dict(retain_beta=1.0, retain_per_step=0), "--retain-per-step"),
])
def test_bad_retain_config_is_a_clear_error(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        train_config(tmp_path, **kw)


@pytest.mark.parametrize("limit, seed", [(None, 0), (5, 3)])
def test_retain_set_excludes_every_gsm8k_item_the_evaluation_reads(tokenizer, monkeypatch, limit, seed):
    """Run the real evaluate() with its model calls replaced by cheap fakes and record which GSM8K
    items it loads: the retain set must hold none of them (and nearly all the others)."""
    import lora_core.train.data.registry as registry
    import lora_core.train.eval.context as context
    import lora_core.train.eval.reasoning_tasks as reasoning
    import lora_core.train.eval.runner as ev
    from lora_core.train.data.registry import load_records
    from lora_core.train.sft.retain_set import build_retain_set
    from lora_core.train.eval.context import EvalRun

    read: set[str] = set()

    def spy(name, *args, **kwargs):
        records = load_records(name, *args, **kwargs)
        if name == "gsm8k":
            read.update(r["id"] for r in records)
        return records

    fake_score = None  # only ever handed to the faked metric functions below
    # Every task loads through the registry: EvalRun.records (eval.context's import) or, for the
    # drift items, reasoning_tasks' own import.
    monkeypatch.setattr(registry, "load_records", spy)
    monkeypatch.setattr(context, "load_records", spy)
    monkeypatch.setattr(reasoning, "load_records", spy)
    monkeypatch.setattr(EvalRun, "generate", lambda self, prompts, *a, **k: [""] * len(prompts))
    monkeypatch.setattr(reasoning, "score_continuations", lambda m, t, ctx, cont, *a, **k: [fake_score] * len(ctx))
    monkeypatch.setattr(reasoning, "bits_per_byte", lambda scores: {"value": 0.0})
    monkeypatch.setattr(reasoning, "item_bits_per_byte", lambda scores: [0.0] * len(scores))
    monkeypatch.setattr(reasoning, "choice_hits", lambda s, g: {"acc": [0] * len(g), "acc_norm": [0] * len(g)})
    monkeypatch.setattr(reasoning, "kl_drift", lambda *a, contexts=None, **k: ({"value": 0.0}, [0.0] * len(a[3])))
    model = torch.nn.Linear(1, 1)
    ev.evaluate(model, tokenizer, suite="quick", base_model=model, progress=False, limit=limit, seed=seed)
    monkeypatch.undo()  # the retain builder below reads GSM8K too; only the evaluation is spied on
    assert read, "the spy saw no GSM8K read: the test no longer observes the evaluation"

    _, info = build_retain_set(tokenizer, source="gsm8k", targets="gold", limit=None, seed=0,
                               exclude_suite="quick", eval_seed=seed, eval_limit=limit, max_length=512)
    overlap = read & set(info["ids"])
    assert not overlap, f"{len(overlap)} evaluation items in the retain set, e.g. {sorted(overlap)[:3]}"
    assert info["excluded_eval_items"] == len(read), (info["excluded_eval_items"], len(read))
    assert len(info["ids"]) == 1319 - len(read)


def test_diverse_retain_set_answers_with_the_model_and_avoids_every_evaluation_prompt(tokenizer):
    """Source "diverse": everyday prompts of many topics plus MATH problems outside MATH-500,
    targets from `answer_fn` (the base model in training); no prompt of any evaluation set: not
    the over-refusal set, no GSM8K test item, no MATH-500 problem."""
    from lora_core.train.data.benign import over_refusal_records
    from lora_core.train.data.registry import load_records
    from lora_core.train.sft.retain_set import build_retain_set

    asked: list[str] = []

    def answer_fn(prompts):
        asked.extend(prompts)
        return [f"Here is an answer to item {i}." for i in range(len(prompts))]

    _, info = build_retain_set(tokenizer, source="diverse", limit=None, seed=0, targets="self",
                               answer_fn=answer_fn, math_share=10, max_length=512)
    assert len(asked) == info["pool"] == len(info["ids"]) == info["benign_prompts"] + 10
    assert len(info["benign_topics"]) >= 10, info["benign_topics"]
    assert info["math_prompts"] == 10 and info["disjoint_from_every_evaluation_set"]
    forbidden = {r["id"] for r in over_refusal_records()} | {r["id"] for r in load_records("gsm8k")}
    assert not forbidden & set(info["ids"])
    assert not {r["prompt"] for r in over_refusal_records()} & set(asked)
    math500 = {" ".join(r["question"].split()) for r in load_records("math500")}
    asked_bare = {" ".join(q.split("\nPlease reason")[0].split()) for q in asked}
    assert not math500 & asked_bare, "a MATH-500 problem reached the retain set"
    prealgebra = {" ".join(r["question"].split()) for r in load_records("math-prealgebra")}
    assert prealgebra & math500, "MATH-500 shares problems with the prealgebra file: the filter has work to do"
    with pytest.raises(ValueError, match="--retain-targets self"):
        build_retain_set(tokenizer, source="diverse", targets="gold")
    with pytest.raises(ValueError, match="needs the model"):
        build_retain_set(tokenizer, source="diverse", targets="self", answer_fn=None)


def test_self_targets_are_generated_once_and_reused_on_resume(tokenizer, tmp_path, monkeypatch):
    """The base model's answers are cached in the run directory: a resumed run teacher-forces the
    very same targets instead of regenerating them (2-thread greedy decoding may differ)."""
    retain = tmp_path / "retain.jsonl"
    retain.write_text("".join(json.dumps({"prompt": q}) + "\n" for q, _ in CHATS))
    cfg = train_config(tmp_path, max_steps=2, retain_beta=1.0, retain_data=str(retain), retain_targets="self",
                       retain_target_tokens=4, retain_per_step=2, save_every=1)
    from lora_core.train.sft import retain_term

    # A tiny random model may answer with nothing at all; what is cached is what counts here.
    monkeypatch.setattr(retain_term, "generate",
                        lambda model, tok, prompts, **k: [f"Answer {i}." for i in range(len(prompts))])
    first = train(cfg, tokenizer=tokenizer, model=tiny_model(model_vocab(tokenizer)))
    cached = json.loads((first.run_dir / "retain_answers.json").read_text())
    assert cached == {"prompts": [q for q, _ in CHATS], "answers": ["Answer 0.", "Answer 1.", "Answer 2."]}

    monkeypatch.setattr(retain_term, "generate", lambda *a, **k: pytest.fail("regenerated the retain targets"))
    cfg2 = train_config(tmp_path, max_steps=3, retain_beta=1.0, retain_data=str(retain), retain_targets="self",
                        retain_target_tokens=4, retain_per_step=2, save_every=1)
    train(cfg2, tokenizer=tokenizer, model=tiny_model(model_vocab(tokenizer)), resume=True)


def test_retain_in_sft_mixes_the_base_answers_into_the_training_data(tokenizer, tmp_path, monkeypatch):
    """--retain-in-sft: every retain prompt the base model answered becomes one more SFT example
    (cross-entropy on that answer); the refusal examples stay as they were."""
    from lora_core.train.sft import retain_term
    from lora_core.train.sft.loop import Trainer

    retain = tmp_path / "retain.jsonl"
    retain.write_text("".join(json.dumps({"prompt": q}) + "\n" for q, _ in CHATS))
    monkeypatch.setattr(retain_term, "generate",
                        lambda model, tok, prompts, **k: [f"Sure {i}." for i in range(len(prompts))])
    refusals = [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": "I can't help."}]}
                for p in PROMPTS]
    kw = dict(max_steps=1, retain_beta=1.0, retain_data=str(retain), retain_targets="self", retain_per_step=2)
    plain = Trainer(train_config(tmp_path / "a", **kw), tiny_model(model_vocab(tokenizer)), tokenizer,
                    examples=refusals, log=lambda *a: None)
    mixed = Trainer(train_config(tmp_path / "b", retain_in_sft=True, **kw), tiny_model(model_vocab(tokenizer)),
                    tokenizer, examples=refusals, log=lambda *a: None)
    assert len(mixed.tokenized) == len(plain.tokenized) + len(CHATS)
    assert mixed.provenance["benign_sft_examples"] == len(CHATS)
    answers = [e["messages"][-1]["content"] for e in mixed.retain.chat_examples()]
    assert answers == [f"Sure {i}." for i in range(len(CHATS))]
    extra = mixed.tokenized[-len(CHATS):]
    assert [sum(label != -100 for label in t.labels) for t in extra] != [0] * len(CHATS)
    for bad in (dict(retain_in_sft=True), dict(retain_in_sft=True, retain_beta=1.0, retain_targets="gold")):
        with pytest.raises(ValueError, match="--retain-in-sft"):
            train_config(tmp_path, **bad)
    # Caught by the config, before a model is loaded, not by the retain-set builder afterwards.
    with pytest.raises(ValueError, match="--retain-data: diverse has no gold answers"):
        train_config(tmp_path, retain_beta=1.0, retain_data="diverse", retain_targets="gold")
