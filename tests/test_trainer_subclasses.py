"""AdversarialTrainingMixin on Trainer subclasses: TRL's SFTTrainer, transformers' Seq2SeqTrainer and
sentence-transformers' SentenceTransformerTrainer.

Each trainer runs 3 optimizer steps of SGD (micro-batches of 2, 2 per step, no clipping, a constant learning
rate, sequential order) on tiny random-weight models and is compared with a hand-written loop that runs the
same passes through the adversary on the same batches: the subclass's loss for every pass, its bookkeeping
(TRL's token count) once per micro-batch.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import transformers
from conftest import relative_difference
from torch import nn

from fastadv import FGM, PGD
from fastadv.integrations.hf import AdversarialTrainer, AdversarialTrainingMixin, adversarial_trainer

VOCAB, MICRO, ACCUM, STEPS, LR = 64, 2, 2, 3, 0.1
MATCH = 1e-5  # relative difference of the weight updates, trainer against the hand loop
ADVERSARIES: dict[str, Callable[[nn.Module], FGM | PGD]] = {
    "fgm": lambda model: FGM(model, epsilon=1.0),
    "pgd": lambda model: PGD(model, epsilon=1.0, alpha=0.3, steps=2),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def assert_same_training(trained: nn.Module, reference: nn.Module, initial: torch.Tensor, what: str) -> float:
    update = relative_difference(flat(trained) - initial, flat(reference) - initial)
    assert update <= MATCH, f"{what}: weight updates differ by {update:.3g}, want <= {MATCH}"
    return update


def common_args() -> dict:
    return dict(
        report_to=[],
        use_cpu=True,
        per_device_train_batch_size=MICRO,
        gradient_accumulation_steps=ACCUM,
        max_steps=STEPS,
        optim="sgd",
        learning_rate=LR,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        train_sampling_strategy="sequential",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
    )


def hand_loop(model: nn.Module, adversary: FGM | PGD, batches: list[dict], loss_of: Callable, shifted: bool) -> None:
    """SGD every ACCUM micro-batches; each pass's loss ``loss_of(model, batch, tokens)`` with ``tokens`` the
    label count of the optimizer step's micro-batches (what Trainer passes as num_items_in_batch; ``shifted``:
    a causal LM's, without each row's first label; 0 for batches without labels)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    model.train()
    for start in range(0, len(batches), ACCUM):
        group = batches[start : start + ACCUM]
        tokens = sum(int((batch["labels"][:, int(shifted) :] != -100).sum()) for batch in group if "labels" in batch)
        for batch in group:
            adversary.step(
                lambda batch=batch, tokens=tokens: loss_of(model, batch, tokens), backward=torch.Tensor.backward
            )
        optimizer.step()
        model.zero_grad()


def train_batches(trainer: transformers.Trainer) -> list[dict]:
    """The micro-batches the trainer's own loader and collator yield, in order."""
    return [dict(batch) for _, batch in zip(range(ACCUM * STEPS), trainer.get_train_dataloader(), strict=False)]


# ------------------------------------------------------------ TRL's SFTTrainer on a tiny Llama


def tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer built in memory: "<pad>" 0, "<eos>" 1, "w2" .. "w63"."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, VOCAB)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>")


def llama(lora: bool) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=1,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config)
    if lora:
        from peft import LoraConfig, get_peft_model

        # init_lora_weights=False: B random, so A has a gradient too.
        lora_config = LoraConfig(
            r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], init_lora_weights=False
        )
        model = get_peft_model(model, lora_config)
    return model


def sft_dataset():
    """Pre-tokenized sequences of 5 to 9 ids, ending in eos (TRL adds none to tokenized data)."""
    from datasets import Dataset

    gen = torch.Generator().manual_seed(4)
    rows = []
    for i in range(MICRO * ACCUM * STEPS):
        ids = torch.randint(2, VOCAB, (5 + i % 5,), generator=gen).tolist()
        rows.append({"input_ids": [*ids, 1]})
    return Dataset.from_list(rows)


def sft_trainer(trainer_class: type, model: nn.Module, tmp_path, **kwargs) -> transformers.Trainer:
    from trl import SFTConfig

    # bf16=False: SFTConfig defaults to bf16, and the comparison is in fp32 (its default gradient checkpointing stays).
    args = SFTConfig(output_dir=str(tmp_path), **common_args(), bf16=False)
    return trainer_class(model=model, args=args, train_dataset=sft_dataset(), processing_class=tokenizer(), **kwargs)


def causal_lm_loss(model: nn.Module, batch: dict, tokens: int) -> torch.Tensor:
    """SFT's default loss by hand: the summed next-token cross-entropy over the step's label count."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(), ignore_index=-100, reduction="sum"
    ) / max(tokens, 1)


def logged_token_counts(trainer: transformers.Trainer) -> list[int]:
    return [int(entry["num_tokens"]) for entry in trainer.state.log_history if "num_tokens" in entry]


@pytest.mark.parametrize("method", list(ADVERSARIES))
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_sft_trainer_with_the_mixin_trains_to_the_hand_loops_weights(tmp_path, method, lora):
    from trl import SFTTrainer

    model, reference = llama(lora), llama(lora)
    initial = flat(model)
    trainer = sft_trainer(adversarial_trainer(SFTTrainer), model, tmp_path, adversary=ADVERSARIES[method](model))
    trainer.train()
    assert trainer.state.global_step == STEPS

    plain = sft_trainer(SFTTrainer, llama(lora), tmp_path / "plain")
    batches = train_batches(plain)
    hand_loop(reference, ADVERSARIES[method](reference), batches, causal_lm_loss, shifted=True)
    update = assert_same_training(model, reference, initial, f"SFTTrainer + {method} against the hand loop")
    print(f"sft {method} lora={lora}: updates differ by {update:.3g}")

    # TRL counts the tokens in compute_loss: once per micro-batch (attention_mask), not once per pass.
    tokens = [int(batch["attention_mask"].sum()) for batch in batches]
    want = [sum(tokens[: ACCUM * (step + 1)]) for step in range(STEPS)]
    assert logged_token_counts(trainer) == want, f"num_tokens logged {logged_token_counts(trainer)}, want {want}"
    if not lora and method == "fgm":
        plain.train()
        assert logged_token_counts(plain) == want, "the plain SFTTrainer counts what the adversarial one does"
        # SFT's metrics come from the clean passes alone: the first step's clean passes see the initial weights in
        # both trainers, so the first logged means agree (an adversarial pass averaged in would move them).
        for metric in ("entropy", "mean_token_accuracy"):
            first, first_plain = (next(e[metric] for e in t.state.log_history if metric in e) for t in (trainer, plain))
            assert first == pytest.approx(first_plain, rel=1e-6), f"{metric}: {first} against plain {first_plain}"


def test_sft_trainer_activation_offload_context_wraps_every_pass(tmp_path):
    from trl import SFTTrainer

    model = llama(lora=False)
    trainer = sft_trainer(adversarial_trainer(SFTTrainer), model, tmp_path, adversary=FGM(model))
    inside, forwards = [], []

    class Context:
        def __enter__(self) -> None:
            inside.append(True)

        def __exit__(self, *exc: object) -> None:
            inside.pop()

    trainer.maybe_activation_offload_context = Context()
    model.model.embed_tokens.register_forward_hook(lambda *args: forwards.append(bool(inside)))
    trainer.train()
    assert forwards == [True] * (2 * ACCUM * STEPS), f"every FGM pass inside SFT's context, got {forwards}"


# ------------------------------------------------------------ transformers' Seq2SeqTrainer on a tiny T5


def t5() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=40, num_layers=2, num_heads=4, dropout_rate=0.0, pad_token_id=0,
        eos_token_id=1, decoder_start_token_id=0,
    )  # fmt: skip
    return transformers.T5ForConditionalGeneration(config)


class Seq2SeqExamples(torch.utils.data.Dataset):
    """Source and target ids of fixed lengths (no padding: the default collator stacks them)."""

    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(5)
        n = MICRO * ACCUM * STEPS
        self.sources = torch.randint(2, VOCAB, (n, 9), generator=gen)
        self.targets = torch.randint(2, VOCAB, (n, 5), generator=gen)

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.sources[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": self.targets[i]}


def seq2seq_loss(model: nn.Module, batch: dict, tokens: int) -> torch.Tensor:
    """What Trainer backpropagates for T5: its forward takes **kwargs, so Trainer passes num_items_in_batch and
    counts the loss as normalized (no division by the accumulation steps), but T5 takes the mean over its
    micro-batch."""
    return model(**batch).loss


@pytest.mark.parametrize("method", list(ADVERSARIES))
def test_seq2seq_trainer_with_the_mixin_trains_to_the_hand_loops_weights(tmp_path, method):
    model, reference = t5(), t5()
    initial = flat(model)
    args = transformers.Seq2SeqTrainingArguments(output_dir=str(tmp_path), **common_args())
    trainer_class = adversarial_trainer(transformers.Seq2SeqTrainer)
    trainer = trainer_class(
        adversary=ADVERSARIES[method](model), model=model, args=args, train_dataset=Seq2SeqExamples()
    )
    trainer.train()

    hand_loop(reference, ADVERSARIES[method](reference), train_batches(trainer), seq2seq_loss, shifted=False)
    assert trainer.model_accepts_loss_kwargs
    update = assert_same_training(model, reference, initial, f"Seq2SeqTrainer + {method} against the hand loop")
    print(f"seq2seq {method}: updates differ by {update:.3g}")


# ------------------------------------------------------------ sentence-transformers on a tiny BERT


def sentence_transformer(folder) -> nn.Module:
    """A SentenceTransformer (a BertModel, mean pooling) loaded from a folder with random weights; the FGM it gets
    finds the word embeddings through the BertModel's get_input_embeddings()."""
    from sentence_transformers import SentenceTransformer

    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        config = transformers.BertConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0,
        )  # fmt: skip
        transformers.BertModel(config).save_pretrained(folder)
        tokenizer().save_pretrained(folder)
    return SentenceTransformer(str(folder), device="cpu")


def sentence_pairs():
    """(anchor, positive) texts of 4 to 6 words."""
    from datasets import Dataset

    gen = torch.Generator().manual_seed(3)
    words = lambda n: " ".join(f"w{int(i)}" for i in torch.randint(2, VOCAB, (n,), generator=gen))  # noqa: E731
    return Dataset.from_list([{"anchor": words(4 + i % 3), "positive": words(5)} for i in range(MICRO * ACCUM * STEPS)])


@pytest.mark.parametrize("method", list(ADVERSARIES))
def test_sentence_transformer_trainer_with_the_mixin_trains_to_the_hand_loops_weights(tmp_path, method):
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer import losses

    model, reference, plain = (sentence_transformer(tmp_path / "model") for _ in range(3))
    initial = flat(model)
    args = SentenceTransformerTrainingArguments(output_dir=str(tmp_path / "out"), **common_args())
    trainer = adversarial_trainer(SentenceTransformerTrainer)(
        adversary=ADVERSARIES[method](model),
        model=model,
        args=args,
        train_dataset=sentence_pairs(),
        loss=losses.MultipleNegativesRankingLoss(model),
    )
    trainer.train()

    # Its batches have no labels for Trainer to count (num_items_in_batch None): each pass's loss is divided by the
    # accumulation steps.
    def hand_loss(loss: nn.Module) -> Callable:
        def loss_of(model: nn.Module, batch: dict, tokens: int) -> torch.Tensor:
            return loss(*trainer.collect_features(dict(batch))) / ACCUM

        return loss_of

    batches = train_batches(trainer)
    hand_loop(
        reference,
        ADVERSARIES[method](reference),
        batches,
        hand_loss(losses.MultipleNegativesRankingLoss(reference)),
        shifted=False,
    )
    update = assert_same_training(
        model, reference, initial, f"SentenceTransformerTrainer + {method} against the hand loop"
    )
    print(f"sentence-transformers {method}: updates differ by {update:.3g}")

    class NoAttack:  # the same loop without the adversary's passes: the attack changes the update
        def step(self, closure: Callable, backward: Callable) -> None:
            backward(closure())

    hand_loop(plain, NoAttack(), batches, hand_loss(losses.MultipleNegativesRankingLoss(plain)), shifted=False)
    assert relative_difference(flat(plain) - initial, flat(model) - initial) > 1e-3


# ------------------------------------------------------------ the class builder and its errors


def test_adversarial_trainer_builds_one_named_class_per_trainer_class():
    from trl import SFTTrainer

    built = adversarial_trainer(SFTTrainer)
    assert built is adversarial_trainer(SFTTrainer)
    assert built.__name__ == "AdversarialSFTTrainer"
    assert built.__mro__[1:3] == (AdversarialTrainingMixin, SFTTrainer)
    assert adversarial_trainer(transformers.Trainer) is AdversarialTrainer
    assert adversarial_trainer(built) is built


def test_adversarial_trainer_refuses_what_is_not_a_trainer_class():
    with pytest.raises(TypeError, match="found the class Module"):
        adversarial_trainer(nn.Module)
    with pytest.raises(TypeError, match="found an instance of list"):
        adversarial_trainer([])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="put AdversarialTrainingMixin before the Trainer class"):

        class Backwards(transformers.Trainer, AdversarialTrainingMixin):
            pass


def test_a_compute_loss_override_that_skips_the_mixin_is_an_error(tmp_path):
    model = t5()

    class Bypass(AdversarialTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return model(**inputs).loss

    args = transformers.TrainingArguments(output_dir=str(tmp_path), **common_args())
    trainer = Bypass(adversary=FGM(model), model=model, args=args, train_dataset=Seq2SeqExamples())
    with pytest.raises(RuntimeError, match=r"never reached AdversarialTrainingMixin\.compute_loss"):
        trainer.train()


# ------------------------------------------------------------ a subclass's own counters (axolotl's kind)


class CountingTrainer(transformers.Trainer):
    """Counts inside compute_loss, as axolotl's trainer counts tokens for its tokens/s: an int, a tensor added
    to in place, a float, a dict of lists; none of them named to fastadv."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        tokens = int(inputs["attention_mask"].sum())
        self._tkps_trainable_acc = getattr(self, "_tkps_trainable_acc", 0) + tokens
        if not hasattr(self, "_tkps_total_acc"):
            self._tkps_total_acc = torch.zeros((), dtype=torch.long)
        self._tkps_total_acc += inputs["input_ids"].numel()
        self._seconds = getattr(self, "_seconds", 0.0) + 0.5
        self._token_log = getattr(self, "_token_log", {"train": []})
        self._token_log["train"].append(tokens)
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def counted(trainer: transformers.Trainer) -> tuple:
    return (
        trainer._tkps_trainable_acc,
        int(trainer._tkps_total_acc),
        trainer._seconds,
        list(trainer._token_log["train"]),
    )


@pytest.mark.parametrize("method", ["fgm", "pgd", "r3f"])
def test_a_subclasss_own_counters_count_the_clean_pass_only(tmp_path, method):
    from models import tiny_bert

    from fastadv import R3F

    def examples() -> list[dict]:
        gen = torch.Generator().manual_seed(3)
        return [
            {"input_ids": torch.randint(1, 50, (7,), generator=gen),
             "attention_mask": (torch.arange(7) < 7 - i % 3).long(), "labels": torch.tensor(i % 2)}
            for i in range(MICRO * ACCUM * STEPS)
        ]  # fmt: skip

    args = transformers.TrainingArguments(output_dir=str(tmp_path), **common_args())
    plain = CountingTrainer(model=tiny_bert().to("cpu"), args=args, train_dataset=examples())
    plain.train()
    model = tiny_bert().to("cpu")
    adversary = {"fgm": FGM(model), "pgd": PGD(model, epsilon=1.0, alpha=0.3, steps=2), "r3f": R3F(model)}[method]
    trainer = adversarial_trainer(CountingTrainer)(
        adversary=adversary, model=model, args=args, train_dataset=examples()
    )
    trainer.train()
    want = counted(plain)
    assert want[0] > 0 and len(want[3]) == MICRO * ACCUM * STEPS // MICRO
    assert counted(trainer) == want, f"counted {counted(trainer)} under {method}, a plain Trainer {want}"


# ------------------------------------------------------------ VAT, SMART, R3F on T5: the decoder's positions


class PaddedSeq2SeqExamples(Seq2SeqExamples):
    """As Seq2SeqExamples (sources 9, targets 5), with padding: every third source ends in 3 pads (mask 0), every
    second target in 2 (labels -100, as Seq2Seq collators pad them)."""

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids, labels = self.sources[i].clone(), self.targets[i].clone()
        mask = torch.ones_like(ids)
        if i % 3 == 0:
            ids[6:], mask[6:] = 0, 0
        if i % 2 == 0:
            labels[3:] = -100
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("trainer_class", ["Seq2SeqTrainer", "Trainer"])
@pytest.mark.parametrize("method", ["vat", "smart", "r3f"])
def test_consistency_methods_on_t5_average_over_the_decoders_positions(tmp_path, monkeypatch, method, trainer_class):
    # The mixin gives the step the decoder's positions (labels != -100); the hand loop passes them itself, and
    # tests/test_seq2seq_consistency.py holds that step to a decoder-masked inputs_embeds reference.
    from test_seq2seq_consistency import shared_noise

    from fastadv import R3F, SMART, VAT

    make = {
        "vat": lambda m: VAT(m, epsilon=1.0, xi=0.3),
        "smart": lambda m: SMART(m, epsilon=0.05, step_size=0.02, noise_var=0.01),
        "r3f": lambda m: R3F(m, epsilon=0.3),
    }[method]
    restart = shared_noise(monkeypatch)
    model, reference = t5(), t5()
    initial = flat(model)
    args_class = {"Seq2SeqTrainer": transformers.Seq2SeqTrainingArguments, "Trainer": transformers.TrainingArguments}
    args = args_class[trainer_class](output_dir=str(tmp_path), **common_args())
    trainer = adversarial_trainer(getattr(transformers, trainer_class))(
        adversary=make(model), model=model, args=args, train_dataset=PaddedSeq2SeqExamples()
    )
    trainer.train()
    batches = train_batches(trainer)
    assert any((b["labels"] == -100).any() for b in batches) and any((b["attention_mask"] == 0).any() for b in batches)
    restart()
    adversary = make(reference)
    optimizer = torch.optim.SGD(reference.parameters(), lr=LR)
    reference.train()
    for i, batch in enumerate(batches):
        adversary.step(
            lambda batch=batch: reference(**batch),
            attention_mask=batch["attention_mask"],
            decoder_attention_mask=(batch["labels"] != -100).long(),
        )
        if (i + 1) % ACCUM == 0:
            optimizer.step()
            reference.zero_grad()
    assert_same_training(model, reference, initial, f"{trainer_class} + {method} on T5 against the hand loop")
