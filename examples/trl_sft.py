"""FGM inside TRL's ``SFTTrainer``: ``adversarial_trainer(SFTTrainer)(adversary=FGM(model), ...)``.

A tiny Llama (random weights, built from a config) and a word-level tokenizer built in memory (nothing
is downloaded) learn to continue counting sequences ("w5 w6 w7 ..."). ``adversarial_trainer`` puts
``AdversarialTrainingMixin`` in front of ``SFTTrainer``: SFT's own ``training_step`` and ``compute_loss``
run, and every micro-batch's clean and adversarial passes go through them. SFT's logged ``num_tokens``
counts each micro-batch once. Nothing is saved.

Run it (about a minute on a CPU):

    python examples/trl_sft.py
"""

from __future__ import annotations

import tempfile

import torch
import transformers
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers.trainer_callback import PrinterCallback
from trl import SFTConfig, SFTTrainer

from fastadv import FGM
from fastadv.integrations.hf import adversarial_trainer

VOCAB = 64


def word_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """ "<pad>" 0, "<eos>" 1, then the words "w2" .. "w63"."""
    vocab = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, VOCAB)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>")


def tiny_llama() -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0, eos_token_id=1, bos_token_id=1,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


def counting_texts(count: int, seed: int = 0) -> Dataset:
    """Runs of 4 to 11 consecutive words, each text starting at a random word."""
    gen = torch.Generator().manual_seed(seed)
    texts = []
    for i in range(count):
        start = int(torch.randint(2, VOCAB - 12, (1,), generator=gen))
        texts.append(" ".join(f"w{j}" for j in range(start, start + 4 + i % 8)))
    return Dataset.from_dict({"text": texts})


def main() -> None:
    model = tiny_llama()
    fgm = FGM(model, epsilon=0.3)  # on the object passed as model=, before training
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(
            output_dir=out,
            per_device_train_batch_size=8,
            gradient_accumulation_steps=2,
            max_steps=40,
            learning_rate=3e-3,
            lr_scheduler_type="constant",
            logging_steps=10,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            bf16=False,
            use_cpu=True,
        )
        trainer = adversarial_trainer(SFTTrainer)(
            adversary=fgm, model=model, args=args, train_dataset=counting_texts(640), processing_class=word_tokenizer()
        )
        trainer.remove_callback(PrinterCallback)  # the lines below say what happened
        result = trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    print(
        f"{type(trainer).__name__} + FGM: {result.global_step} optimizer steps, each over 2 micro-batches of 8 "
        f"(a clean and an FGM pass each); FGM skipped {fgm.skipped_steps} steps"
    )
    print("loss every 10 steps:", ", ".join(f"{entry['loss']:.3f}" for entry in logged))
    print("tokens seen (SFT's num_tokens):", ", ".join(str(int(entry["num_tokens"])) for entry in logged))


if __name__ == "__main__":
    main()
