"""Tiny Hugging Face checkpoints of three chat families, with real tokenizers, real chat templates and
scripted weights, so a test can publish each family end to end in seconds.

    python -m tests.material.scripted FAMILY OUT_DIR      # FAMILY: chatml, llama3 or gemma

What each folder holds (config.json, model.safetensors, tokenizer.json, tokenizer_config.json with
the chat template, special_tokens_map.json, generation_config.json, and tokenizer.model for Gemma):

- chatml: Qwen2ForCausalLM, the Qwen2 tokenizer (llama.cpp's models/ggml-vocab-qwen2.gguf) and
  Qwen2.5-7B-Instruct's chat template; a turn ends with <|im_end|>.
- llama3: LlamaForCausalLM, the Llama 3 tokenizer (ggml-vocab-llama-bpe.gguf) and Llama 3.3's chat
  template; a turn ends with <|eot_id|>.
- gemma: Gemma3ForCausalLM, the Gemma 4 tokenizer (ggml-vocab-gemma-4.gguf) and Gemma 4's chat
  template; a turn ends with <turn|>. The Gemma 3 architecture is the newest one that both llama.cpp's
  converter and Ollama 0.11.4 load (Ollama 0.11.4 has no gemma4), and Gemma 4's vocabulary is the
  only Gemma vocabulary llama.cpp ships: it has no <start_of_turn>/<end_of_turn>, so Gemma 2's template
  cannot be used with it, while Gemma 4's own template can.

The tokenizers are rebuilt from llama.cpp's vocabulary files (tokens, types, merges): byte-level BPE
with each family's pre-tokenizer for Qwen2 and Llama 3 (so that the converter recognises the
pre-tokenizer hash, as for the real repositories), and for Gemma a SentencePiece BPE model whose piece
scores follow the merge ranks, next to a tokenizer.json of the same BPE. The chat templates are
llama.cpp's copies in models/templates. Both come from $LLAMA_CPP_DIR: nothing is downloaded.

Why scripted weights: a random tiny model babbles until it hits the token limit, so a smoke test ("the
answer must stop by itself") could never pass, and a real model of each family is gigabytes. Here
every weight is set by hand (hidden size 64, one layer) so that greedy decoding answers one fixed word
and then the family's end-of-turn token, for any prompt that ends in the template's assistant header:

- the attention and MLP output projections are zero (and so are the other projections), so the
  residual stream at the last position is just the last token's embedding (times sqrt(hidden) in
  Gemma, which RMSNorm cancels);
- every embedding is zero except three: the header's last token H, the answer token A and the
  end-of-turn token T, which use two dimensions a and b;
- untied output (llama3): E[H] = a, E[A] = b, and the output rows are lm_head[A] = 2a, lm_head[T] = 2b;
- tied output (chatml, gemma; the output matrix is the embedding matrix): E[H] = a, E[A] = 2a + b,
  E[T] = 10b. After RMSNorm (weights 1; Gemma stores 0 for its 1 + weight), H gives logits
  A 16 > H 8 > others 0, and A gives T 35.8 > A 17.9 > H 7.2 > others 0.

build() checks its work before returning: the rebuilt tokenizers must split llama.cpp's tokenizer test
strings (models/ggml-vocab-*.gguf.inp) exactly as the real Hugging Face tokenizers did (the .out files),
and in transformers the chat template rendered for a question, tokenized by the built tokenizer, must
make the model generate exactly [A, T].
"""

from __future__ import annotations

import dataclasses
import os
import struct
import sys
from pathlib import Path
from typing import Any

from entrypoint.gguf_header import read_metadata

HIDDEN = 64
DIM_A, DIM_B = 0, 1
QUESTION = "What is the capital of France?"


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    architecture: str
    vocab: str  # llama.cpp's models/ggml-vocab-<vocab>.gguf
    template: str  # llama.cpp's models/templates/<template>.jinja
    header_last: str  # the last token of the template's assistant header (generation prompt)
    answer: str  # the one word the model answers
    end_of_turn: str  # the token that closes an assistant turn: the model emits it after the answer
    begin_of_turn: tuple[str, ...]  # tokens that open a turn (never stop tokens)
    bos: str | None
    eos: str  # tokenizer_config's eos_token
    generation_eos: tuple[str, ...]  # generation_config's eos_token_id, as tokens
    tied: bool
    # A reply of several tokens instead of `answer` (chain families below): the text the model writes,
    # whatever it is asked, before end_of_turn, in pieces tokenized one by one, so that a text that repeats
    # ("<", "\n") can be written with different tokens.
    reply: tuple[str, ...] = ()
    extra_tokens: tuple[tuple[int, str, bool], ...] = ()  # (id, text, special): added, replacing [PAD<id>]
    bos_token: str = ""  # tokenizer_config's bos_token when the tokenizer does not prepend one (`bos` unset)


# The added tokens of Qwen 2.5 and Qwen 3 (id, text, special) that llama.cpp's Qwen 2 vocabulary lacks: its
# [PAD<id>] entries stand where they are. Tool and thinking tags are not special (written as text).
QWEN3_ADDED = tuple((151646 + i, text, not text.startswith(("<tool", "</tool", "<think", "</think", "<|fim", "<|repo",
                                                              "<|file"))) for i, text in enumerate((
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>",
    "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>")))

# Qwen 3's chain family (below), of which Qwen 3.5's differs only by its template and reply.
QWEN3_TOOLS = Family(
    name="qwen3-tools", architecture="Qwen3ForCausalLM", vocab="qwen2", template="Qwen-Qwen3-0.6B",
    header_last="\n", answer="", end_of_turn="<|im_end|>", begin_of_turn=("<|im_start|>",), bos=None,
    eos="<|im_end|>", generation_eos=("<|im_end|>", "<|endoftext|>"), tied=False,
    reply=('<think>Weather lookup.</think>\n\n<tool_call>{"name":"get_weather","arguments":{"city": "Paris"}}'
           "</tool_call>",),
    extra_tokens=QWEN3_ADDED)

LLAMA31_TOOLS = Family(
    name="llama3.1-tools", architecture="LlamaForCausalLM", vocab="llama-bpe",
    template="meta-llama-Llama-3.1-8B-Instruct", header_last="\n\n", answer="", end_of_turn="<|eot_id|>",
    begin_of_turn=("<|begin_of_text|>", "<|start_header_id|>"), bos="<|begin_of_text|>", eos="<|eot_id|>",
    generation_eos=("<|end_of_text|>", "<|eot_id|>"), tied=False,
    reply=('{"name":"get_weather","parameters":{"city": "Paris"}}',))

FAMILIES = {
    "chatml": Family(
        name="chatml", architecture="Qwen2ForCausalLM", vocab="qwen2", template="Qwen-Qwen2.5-7B-Instruct",
        header_last="\n", answer="Paris", end_of_turn="<|im_end|>", begin_of_turn=("<|im_start|>",), bos=None,
        eos="<|im_end|>", generation_eos=("<|im_end|>", "<|endoftext|>"), tied=True),
    "llama3": Family(
        name="llama3", architecture="LlamaForCausalLM", vocab="llama-bpe", template="meta-llama-Llama-3.3-70B-Instruct",
        header_last="\n\n", answer="Paris", end_of_turn="<|eot_id|>",
        begin_of_turn=("<|begin_of_text|>", "<|start_header_id|>"), bos="<|begin_of_text|>", eos="<|eot_id|>",
        generation_eos=("<|end_of_text|>", "<|eot_id|>"), tied=False),
    "gemma": Family(
        name="gemma", architecture="Gemma3ForCausalLM", vocab="gemma-4", template="google-gemma-4-31B-it",
        header_last="<channel|>", answer="Paris", end_of_turn="<turn|>", begin_of_turn=("<bos>", "<|turn>"),
        bos="<bos>", eos="<eos>", generation_eos=("<eos>", "<turn|>"), tied=True),
    # Chain families: the reply is a tool call (with Qwen 3 thinking first), for the tool round trip. The
    # reply's tokens must all differ (each token's embedding picks the next one), so the JSON mixes spacing.
    "qwen3-tools": QWEN3_TOOLS,
    # Qwen 3.5's template (Ollama 0.34.3 has a built-in renderer and parser for it) on Qwen 3's body and
    # tokenizer (llama.cpp's Qwen 3.5 test vocabulary is Qwen 2's, and the converter hashes it as Qwen 2's).
    # The prompt ends in "<think>\n", so the reply starts inside the thinking block. Its XML call has no
    # newlines between the tags (Ollama's parser, like Qwen's, does not need them): the "\n" token is the
    # header's, and the tags' repeated "<", ">" and names are written with different tokens.
    "qwen3.5-tools": dataclasses.replace(
        QWEN3_TOOLS, name="qwen3.5-tools", template="Qwen3.5-4B",
        reply=("Weather lookup.", "</think>", "\n\n", "<tool_call>", "<f", "unction", "=get_weather", "><", "parameter",
               "=c", "ity", ">P", "aris", "</", "param", "eter", "></", "function", ">", "</tool_call>")),
    # Bielik 11B v3's template (ChatML, JSON tool calls, thinking in <think>) on Qwen 3's body and tokenizer:
    # no TEMPLATE writes its tools, so Ollama renders its Jinja in llama-server, which parses the call and
    # the reasoning. The prompt ends in "<think>\n" (think: true), so the reply starts inside the block.
    # llama-server's parser, read off the template, wants "<tool_call>\n": the "\n" token is the prompt's
    # last, so the call opens with "\n\n". The template writes bos_token first: tokenizer_config names one
    # (the GGUF's BOS, which llama-server writes).
    "bielik-tools": dataclasses.replace(
        QWEN3_TOOLS, name="bielik-tools", template="Bielik-11B-v3.0-Instruct", bos_token="<|endoftext|>",
        reply=("Weather lookup.", "</think>", "<tool_call>", "\n\n",
               '{"name":"get_weather","arguments":{"city": "Paris"}}', "</tool_call>")),
    "llama3.1-tools": LLAMA31_TOOLS,
    # Llama 3.2's template writes today's date as "01 Dec 2026", which no Go template can: published with
    # no TEMPLATE, its prompts rendered and its tool calls parsed by llama-server.
    "llama3.2-tools": dataclasses.replace(LLAMA31_TOOLS, name="llama3.2-tools",
                                          template="meta-llama-Llama-3.2-3B-Instruct"),
}
CHAIN_FAMILIES = {name for name, family in FAMILIES.items() if family.reply}

# The byte-level BPE pre-tokenizers of the real tokenizer.json files (the converter hashes their output).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# GGUF token types (the same numbers as SentencePiece's piece types).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def llama_cpp_dir() -> Path:
    root = os.environ.get("LLAMA_CPP_DIR", "")
    if not root or not (Path(root) / "models").is_dir():
        raise RuntimeError("$LLAMA_CPP_DIR is not set to a llama.cpp source tree (source scripts/bootstrap's env)")
    return Path(root)


@dataclasses.dataclass
class Vocab:
    tokens: list[str]
    types: list[int]
    merges: list[tuple[str, str]]

    def id(self, token: str) -> int:
        return self.tokens.index(token)


def read_vocab(name: str) -> Vocab:
    """Tokens, token types and merges of llama.cpp's models/ggml-vocab-<name>.gguf."""
    metadata = read_metadata(llama_cpp_dir() / "models" / f"ggml-vocab-{name}.gguf")
    merges = [tuple(m.split(" ")) for m in metadata["tokenizer.ggml.merges"]]
    assert all(len(m) == 2 for m in merges)
    return Vocab(tokens=metadata["tokenizer.ggml.tokens"], types=metadata["tokenizer.ggml.token_type"],
                 merges=merges)  # type: ignore[arg-type]


def _is_padding(vocab: Vocab, i: int) -> bool:
    # ggml-vocab-qwen2.gguf pads its 151646 tokens to 151936 with [PAD<i>] entries its converter invented.
    return vocab.tokens[i] == f"[PAD{i}]"


def _byte_level_tokenizer(family: Family, vocab: Vocab):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    base = {t: i for i, (t, k) in enumerate(zip(vocab.tokens, vocab.types, strict=True)) if k == NORMAL}
    assert sorted(base.values()) == list(range(len(base))), "the added tokens must follow the BPE vocabulary"
    llama3 = family.vocab == "llama-bpe"
    tokenizer = Tokenizer(models.BPE(vocab=base, merges=vocab.merges, ignore_merges=llama3, byte_fallback=False,
                                     fuse_unk=False))
    if not llama3:
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT if llama3 else QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    added = [(i, t, k) for i, (t, k) in enumerate(zip(vocab.tokens, vocab.types, strict=True))
             if k in (CONTROL, USER_DEFINED) and not _is_padding(vocab, i)]
    # With extra tokens, as in the real tokenizer, some added tokens are not special (written as text).
    tokenizer.add_tokens([AddedToken(t, special=k == CONTROL or not family.extra_tokens, normalized=False)
                          for _, t, k in added])
    added = [(i, t) for i, t, _ in added]
    assert all(tokenizer.token_to_id(t) == i for i, t in added)
    if family.bos:  # Llama 3's tokenizer prepends <|begin_of_text|>
        bos = [family.bos, vocab.id(family.bos)]
        tokenizer.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{family.bos} $A", pair=f"{family.bos} $A {family.bos}:1 $B:1",
                                          special_tokens=[tuple(bos)])])
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


def _merge_scores(vocab: Vocab) -> list[float]:
    """SentencePiece BPE merges the adjacent pair whose joined piece scores highest: a piece scores
    minus the rank of the first merge that makes it, so merges happen in the BPE's order."""
    index = {t: i for i, t in enumerate(vocab.tokens)}
    scores = [-float(len(vocab.merges) + 1)] * len(vocab.tokens)  # pieces no merge makes: merged last
    for rank, (left, right) in reversed(list(enumerate(vocab.merges))):
        scores[index[left + right]] = -float(rank)
    for i, kind in enumerate(vocab.types):
        if kind != NORMAL or len(vocab.tokens[i]) == 1:
            scores[i] = 0.0
    return scores


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, value: Any) -> bytes:
    """One protobuf field: int/bool as varint, float as fixed32, str/bytes as length-delimited."""
    if isinstance(value, float):
        return _varint(number << 3 | 5) + struct.pack("<f", value)
    if isinstance(value, (bool, int)):
        return _varint(number << 3) + _varint(int(value))
    data = value.encode("utf-8") if isinstance(value, str) else value
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def sentencepiece_model(vocab: Vocab, unk: str, bos: str, eos: str, pad: str) -> bytes:
    """A SentencePiece ModelProto (BPE, byte fallback, no dummy prefix, whitespace as ▁), written
    field by field (sentencepiece's own protobuf module needs a newer protobuf than the converter's)."""
    pieces = b"".join(_field(1, _field(1, token) + _field(2, score) + _field(3, UNKNOWN if token == unk else kind))
                      for token, kind, score in zip(vocab.tokens, vocab.types, _merge_scores(vocab), strict=True))
    trainer = b"".join([
        _field(3, 2),  # model_type: BPE
        _field(4, len(vocab.tokens)),  # vocab_size
        _field(35, True),  # byte_fallback
        _field(40, vocab.id(unk)), _field(41, vocab.id(bos)), _field(42, vocab.id(eos)), _field(43, vocab.id(pad)),
        _field(45, unk), _field(46, bos), _field(47, eos), _field(48, pad),
    ])
    normalizer = b"".join([
        _field(1, "identity"), _field(3, False),  # add_dummy_prefix
        _field(4, False), _field(5, True),  # remove_extra_whitespaces, escape_whitespaces
    ])
    return pieces + _field(2, trainer) + _field(3, normalizer)


def _sentencepiece_style_tokenizer(vocab: Vocab, unk: str):
    """tokenizer.json of the same BPE: spaces become ▁, merges run on the whole text, bytes fall back."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(vocab.tokens)}, merges=vocab.merges,
                                     byte_fallback=True, fuse_unk=True, unk_token=unk))
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    special = [(t, k) for t, k in zip(vocab.tokens, vocab.types, strict=True) if k in (CONTROL, USER_DEFINED)]
    tokenizer.add_special_tokens([AddedToken(t, special=k == CONTROL, normalized=False) for t, k in special])
    return tokenizer


def _config(family: Family, vocab: Vocab):
    import torch
    from transformers import Gemma3TextConfig, LlamaConfig, Qwen2Config, Qwen3Config

    ids = {t: vocab.id(t) for t in {family.eos, *family.generation_eos} | ({family.bos} if family.bos else set())}
    common = dict(vocab_size=len(vocab.tokens), hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=HIDDEN // 4, rms_norm_eps=1e-6,
                  tie_word_embeddings=family.tied, architectures=[family.architecture], dtype=torch.bfloat16,
                  eos_token_id=[ids[t] for t in family.generation_eos])
    if family.name == "chatml":
        return Qwen2Config(**common, max_position_embeddings=32768, rope_theta=1000000.0,
                           bos_token_id=ids["<|endoftext|>"])
    if family.architecture == "Qwen3ForCausalLM":
        return Qwen3Config(**common, max_position_embeddings=40960, rope_theta=1000000.0,
                           bos_token_id=ids["<|endoftext|>"])
    if family.architecture == "LlamaForCausalLM":
        return LlamaConfig(**common, max_position_embeddings=8192, rope_theta=500000.0, bos_token_id=ids[family.bos])
    return Gemma3TextConfig(**common, max_position_embeddings=32768, query_pre_attn_scalar=HIDDEN // 4,
                            sliding_window=512, layer_types=["sliding_attention"], bos_token_id=ids[family.bos],
                            pad_token_id=vocab.id("<pad>"))


def _script_weights(model, family: Family, h: int, a: int, t: int) -> None:
    """Set every weight (see the module docstring)."""
    import torch

    gemma = family.name == "gemma"
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            # RMSNorm weights: 1, or Gemma's 0 (it multiplies by 1 + weight); everything else 0.
            tensor.fill_(1.0 if name.endswith("norm.weight") and not gemma else 0.0)
        embed = model.get_input_embeddings().weight
        if family.tied:
            embed[h, DIM_A] = 1.0
            embed[a, DIM_A], embed[a, DIM_B] = 2.0, 1.0
            embed[t, DIM_B] = 10.0
        else:
            embed[h, DIM_A] = 1.0
            embed[a, DIM_B] = 1.0
            out = model.get_output_embeddings().weight
            out[a, DIM_A] = 2.0
            out[t, DIM_B] = 2.0


def _script_chain(model, chain: list[int]) -> None:
    """Chain families: token chain[i] makes the model write chain[i + 1] (untied output). Each token of the
    chain but the last gets a dimension of its own: E[chain[i]] = e_i, lm_head[chain[i + 1]] += 2 e_i,
    so after RMSNorm (e_i becomes 8 e_i) the next token's logit is 16 and every other 0."""
    import torch

    assert len(set(chain[:-1])) == len(chain) - 1, "a token that appears twice would need two successors"
    assert len(chain) - 1 <= HIDDEN, f"a chain of {len(chain)} tokens needs a wider model"
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            tensor.fill_(1.0 if name.endswith("norm.weight") else 0.0)
        embed, out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        for i, token in enumerate(chain[:-1]):
            embed[token, i] = 1.0
            out[chain[i + 1], i] = 2.0


def _check_tokenizer(family: Family, backend, sentencepiece_file: Path | None) -> None:
    """The rebuilt tokenizer must split llama.cpp's test strings (models/ggml-vocab-<name>.gguf.inp) into the
    token ids that the real Hugging Face tokenizer gave (the .out file next to it)."""
    models = llama_cpp_dir() / "models"
    inp = (models / f"ggml-vocab-{family.vocab}.gguf.inp").read_text(encoding="utf-8")
    texts = inp.split("\n__ggml_vocab_test__\n")[:-1]  # the file ends with a separator
    expected = [[int(i) for i in line.split()] for line in
                (models / f"ggml-vocab-{family.vocab}.gguf.out").read_text(encoding="utf-8").splitlines()]
    encoders = {"tokenizer.json": lambda text: backend.encode(text, add_special_tokens=False).ids}
    if sentencepiece_file is not None:
        from sentencepiece import SentencePieceProcessor

        processor = SentencePieceProcessor(model_file=str(sentencepiece_file))
        encoders["tokenizer.model"] = processor.encode
    assert len(texts) >= 40 and len(expected) >= len(texts), (len(texts), len(expected))
    for name, encode in encoders.items():
        wrong = [text for text, ids in zip(texts, expected, strict=False) if encode(text) != ids]  # .out may be longer
        if wrong:
            raise AssertionError(f"{family.name}: the rebuilt {name} splits {len(wrong)} of llama.cpp's {len(texts)} "
                                 f"{family.vocab} test strings differently from the real tokenizer, e.g. {wrong[0]!r}")


def _verify(model, tokenizer, family: Family, expected: list[int]) -> None:
    """transformers' own greedy generation on the rendered chat must give exactly `expected` (the answer
    or the reply, then T)."""
    import torch

    prompt = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False,
                                           add_generation_prompt=True)
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    assert tokenizer.convert_ids_to_tokens(int(ids[0, -1])) == tokenizer.convert_ids_to_tokens(
        tokenizer(family.header_last, add_special_tokens=False).input_ids[-1]), prompt
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=len(expected) + 2,
                             do_sample=False, eos_token_id=[expected[-1]], pad_token_id=expected[-1])
    generated = out[0, ids.shape[1]:].tolist()
    if generated != expected:
        raise AssertionError(f"{family.name}: the scripted model generates {tokenizer.convert_ids_to_tokens(generated)}"
                             f" after {prompt!r}, not {tokenizer.convert_ids_to_tokens(expected)}")


def build(family: str, out_dir: Path) -> Path:
    """Write the checkpoint of `family` (chatml, llama3 or gemma) into out_dir; returns out_dir."""
    import torch
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    spec = FAMILIES[family]
    vocab = read_vocab(spec.vocab)
    for token_id, text, special in spec.extra_tokens:
        assert _is_padding(vocab, token_id), token_id
        vocab.tokens[token_id], vocab.types[token_id] = text, CONTROL if special else USER_DEFINED
    template = (llama_cpp_dir() / "models" / "templates" / f"{spec.template}.jinja").read_text(encoding="utf-8")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    sentencepiece_file = None
    if spec.name == "gemma":
        sentencepiece_file = out_dir / "tokenizer.model"
        sentencepiece_file.write_bytes(sentencepiece_model(vocab, "<unk>", "<bos>", "<eos>", "<pad>"))
        backend = _sentencepiece_style_tokenizer(vocab, "<unk>")
        specials = dict(bos_token="<bos>", eos_token=spec.eos, unk_token="<unk>", pad_token="<pad>",
                        add_bos_token=True, add_eos_token=False)
    else:
        backend = _byte_level_tokenizer(spec, vocab)
        specials = dict(eos_token=spec.eos, pad_token="<|endoftext|>" if spec.name == "chatml" else None)
        if spec.bos or spec.bos_token:
            specials["bos_token"] = spec.bos or spec.bos_token
    _check_tokenizer(spec, backend, sentencepiece_file)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=template,
                                        clean_up_tokenization_spaces=False, model_max_length=32768,
                                        **{k: v for k, v in specials.items() if v is not None})

    h = tokenizer(spec.header_last, add_special_tokens=False).input_ids[-1]
    t = vocab.id(spec.end_of_turn)
    torch.manual_seed(0)  # from_config initialises randomly before every weight is overwritten
    model = AutoModelForCausalLM.from_config(_config(spec, vocab), dtype=torch.float32)
    if spec.reply:
        chain = [h, *(i for piece in spec.reply for i in tokenizer(piece, add_special_tokens=False).input_ids), t]
        _script_chain(model, chain)
        expected = chain[1:]
    else:
        a = vocab.id(spec.answer)
        assert tokenizer(spec.answer, add_special_tokens=False).input_ids == [a]
        _script_weights(model, spec, h, a, t)
        expected = [a, t]
    model.generation_config.eos_token_id = [vocab.id(x) for x in spec.generation_eos]
    model.generation_config.bos_token_id = vocab.id(spec.bos) if spec.bos else None
    _verify(model, tokenizer, spec, expected)

    model.to(torch.bfloat16).save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir, save_jinja_files=False)  # the template inside tokenizer_config.json
    (out_dir / "README.md").write_text(
        f"# tiny-{spec.name}\n\nA test checkpoint made by ollama-publish's tests/material/scripted.py: the "
        f"{spec.vocab} tokenizer and the {spec.template} chat template from llama.cpp, with scripted weights that "
        f"write {''.join(spec.reply) or spec.answer!r} and then {spec.end_of_turn} to any question.\n",
        encoding="utf-8")
    return out_dir


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in FAMILIES:
        print(f"usage: python -m tests.material.scripted {{{','.join(FAMILIES)}}} OUT_DIR", file=sys.stderr)
        return 2
    print(build(argv[0], Path(argv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
